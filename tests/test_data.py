"""The OmniEdit Parquet loader: buckets under a token budget, DALI = PIL, rank sharding, exact resume, bad data."""
import io
import re

import pytest
import torch
from PIL import Image

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from omniace.engine.text import TinyTextEncoder  # noqa: E402
from omniace.engine.config import get_config  # noqa: E402
from omniace.train.data import DataConfig, EditLoader, RecordStream, size_caps  # noqa: E402
from omniace.train.importance import ImportanceConfig, importance_weight  # noqa: E402
from omniace.train.omniedit_format import BadRow, check_row, omniedit_schema, write_shard  # noqa: E402
from omniace.train.synthetic import generate, write_corpus  # noqa: E402

ENC = TinyTextEncoder(32, max_len=32)


def text_encode(texts):
    return [e.tokens for e in ENC.encode(texts)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, 120, shard_size=50, log=lambda m: None, seed=5, fmt="jpeg")
    return d


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert [x.ids for x in a] == [x.ids for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x.packed.tokens, y.packed.tokens) and torch.equal(x.weights, y.weights)


def test_batches_respect_the_token_budget_and_group_aspects(corpus):
    loader = EditLoader(DataConfig([str(corpus)], token_budget=900, decoder="pil"), text_encode, log=lambda m: None)
    for b in _take(loader, 12):
        assert len({(h * 100) // w for h, w in b.packed.target_sizes}) <= 2  # one aspect ratio, rounding aside
        assert b.packed.tokens.shape[0] <= 900  # every batch: a row over the budget is skipped, not sent alone
        assert b.weights.min() > 0  # lambda = 0 pairs were dropped before decoding
    assert loader.stats["zero_weight"] > 0


def test_dali_and_pil_decoders_give_the_same_batches(corpus):
    pytest.importorskip("nvidia.dali")
    cfg = dict(paths=[str(corpus)], token_budget=700)
    dali = EditLoader(DataConfig(**cfg, decoder="dali"), text_encode, log=lambda m: None)
    pil = EditLoader(DataConfig(**cfg, decoder="pil"), text_encode, log=lambda m: None)
    assert type(dali.decoder).__name__ == "DALIDecoder"
    _same(_take(dali, 8), _take(pil, 8))


def test_ranks_see_disjoint_records_that_cover_the_epoch(corpus):
    def ids(rank, world, n):
        it = iter(RecordStream([str(corpus)], seed=1, rank=rank, world=world))
        return [next(it)[1]["omni_edit_id"] for _ in range(n)]

    whole = ids(0, 1, 120)
    r0, r1 = ids(0, 2, 60), ids(1, 2, 60)
    assert not set(r0) & set(r1) and set(r0) | set(r1) == set(whole)
    file_order = [i for f in sorted(corpus.glob("*.parquet")) for i in pq.read_table(f)["omni_edit_id"].to_pylist()]
    assert len(set(whole)) == 120 and whole != file_order  # every record once, shuffled


def test_resume_yields_exactly_the_same_batches(corpus):
    cfg = DataConfig([str(corpus)], token_budget=800, decoder="pil", seed=3)
    a = EditLoader(cfg, text_encode, log=lambda m: None)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    rest = [next(it) for _ in range(6)]
    b = EditLoader(cfg, text_encode, log=lambda m: None)
    b.load_state_dict(state)
    _same(_take(b, 6), rest)


def test_corrupt_images_and_bad_rows_are_skipped_counted_and_reported(tmp_path):
    recs = list(generate(6, seed=2, failure_rate=0.0))
    for r in recs:
        r["o_score"] = 10.0
    recs[1]["src_img"] = {"bytes": recs[1]["src_img"]["bytes"][:40] + b"\x00" * 64, "path": "broken.png"}
    recs[2]["width"] = recs[2]["width"] + 3
    recs[3]["edited_img"] = None
    write_shard(recs, tmp_path / "part-00000.parquet")
    logs = []
    # the largest record's tokens: every record fits, and a bucket flushes once its copies from later epochs
    # overflow it (at most 6 epochs here: no record has under a sixth of the largest one's tokens)
    budget = max(EditLoader(DataConfig([str(tmp_path)], decoder="pil"), text_encode).tokens(r) for r in recs)
    loader = EditLoader(DataConfig([str(tmp_path)], token_budget=budget, decoder="pil"), text_encode, log=logs.append)
    it = iter(loader)
    seen = set()
    while loader.stats["records"] < 6 * 6:
        seen.update(next(it).ids)
    assert loader.stats["corrupt_image"] >= 1 and loader.stats["bad_row"] >= 2
    assert recs[1]["omni_edit_id"] not in seen and recs[0]["omni_edit_id"] in seen
    assert any("corrupt_image" in m for m in logs) and any("bad_row" in m for m in logs)


def test_a_shard_missing_columns_is_refused(tmp_path):
    pq.write_table(pa.table({"omni_edit_id": ["a"], "task": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['src_img'"):
        RecordStream([str(tmp_path / "bad.parquet")], seed=0)
    with pytest.raises(FileNotFoundError, match="no such Parquet"):
        RecordStream([str(tmp_path / "nope")], seed=0)


def png(color, size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": "x.png"}


def row(i, size=(64, 48), **fields):
    """A good row of the released schema (``fields`` override), with tiny PNGs of ``size``."""
    return {"omni_edit_id": f"id{i}", "task": "attribute_modification", "src_img": png((200, 0, 0), size),
            "edited_img": png((0, 0, 200), size), "edited_prompt_list": ["make it blue", "turn it blue"],
            "width": size[0], "height": size[1], "sc_score_1": 9, "sc_score_2": 10, "sc_reasoning": "ok",
            "pq_score": 10, "pq_reasoning": "ok", "o_score": 9.5, **fields}


def test_a_plain_omniedit_file_written_by_pyarrow_loads(tmp_path):
    """The released schema exactly (no extra columns), written by pyarrow directly."""
    rows = [row(i) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows, schema=omniedit_schema(extras=False)), tmp_path / "omniedit.parquet")
    loader = EditLoader(DataConfig([str(tmp_path)], token_budget=200, decoder="pil"), text_encode, log=lambda m: None)
    b = _take(loader, 1)[0]
    assert b.packed.target_sizes == [(12, 16)] * len(b.ids) and b.tasks[0] == "attribute_modification"


def test_importance_weight_modes():
    row = {"omni_edit_id": "a", "o_score": 8.0, "sc_score_1": 9}
    assert importance_weight(row, ImportanceConfig()) == 0.0
    assert importance_weight(row, ImportanceConfig(column="sc_score_1")) == 1.0
    assert importance_weight(row, ImportanceConfig(mode="soft")) == pytest.approx(0.75)
    assert importance_weight(row, ImportanceConfig(mode="none")) == 1.0
    with pytest.raises(KeyError, match="pq_score"):
        importance_weight(row, ImportanceConfig(column="pq_score"))
    with pytest.raises(ValueError, match="importance mode"):
        ImportanceConfig(mode="median")
    for bad in (float("nan"), float("inf"), "high"):  # NaN read as "below the threshold" was a silent lambda = 0
        with pytest.raises(ValueError, match=f"o_score {bad!r} is not a finite score"):
            importance_weight({"omni_edit_id": "a", "o_score": bad}, ImportanceConfig())


# field overrides that make a row bad, and what the reason must say (field and value; plain text)
BAD = {
    "no usable prompt: [None]": ({"edited_prompt_list": [None]}, "edited_prompt_list [None] holds no"),
    "no usable prompt: ['']": ({"edited_prompt_list": [""]}, "edited_prompt_list [''] holds no"),
    "no prompt list": ({"edited_prompt_list": None}, "edited_prompt_list None is not a list"),
    "null task": ({"task": None}, "task None is not a non-empty string"),
    "null id": ({"omni_edit_id": None}, "omni_edit_id None"),
    "null history entry": ({"history": [None]}, "history[0] None is not"),
    "blank history prompt": ({"history": [{"prompt": " ", "image": png((1, 2, 3))}]}, "history[0].prompt ' '"),
    "history turn without an image": ({"history": [{"prompt": "x", "image": None}]}, "history[0].image None"),
    "8x4000": ({"width": 8, "height": 4000}, "size 8x4000 has aspect ratio 500.00, over the cap of 2.0"),
    "4096x4096": ({"width": 4096, "height": 4096}, "16777216 pixels, over the cap of 4194304"),
    "NaN o_score": ({"o_score": float("nan")}, "o_score nan is not a finite number"),
    "null sc_score_1": ({"sc_score_1": None}, "sc_score_1 None is not a finite number"),
    "null width": ({"width": None}, "width None is not a positive multiple of 8"),
    "width off the grid": ({"width": 60}, "width 60 is not a positive multiple of 8"),
    "source without bytes": ({"src_img": {"bytes": None, "path": "a.png"}}, "src_img {'bytes': None"),
    "null target": ({"edited_img": None}, "edited_img None is not an image struct"),
    "empty mask": ({"mask_img": {"bytes": b"", "path": "m.png"}}, "mask_img"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_field_of_a_row_is_checked(case):
    fields, reason = BAD[case]
    with pytest.raises(BadRow, match=re.escape(reason)):
        check_row(row(0, **fields), unit=8, max_pixels=2048 * 2048, max_aspect=2.0)


def test_a_good_row_keeps_only_its_usable_prompts_and_sizes_within_the_caps():
    good = row(0, edited_prompt_list=[None, "", "make it green", "  "], history=[{"prompt": "a", "image": png(1)}])
    assert check_row(good, unit=8, max_pixels=64 * 48, max_aspect=4 / 3)["edited_prompt_list"] == ["make it green"]
    with pytest.raises(BadRow, match="size 64x48 has a side over the cap of 56 pixels"):
        check_row(good, unit=8, max_pixels=64 * 48, max_aspect=2.0, max_side=56)
    # an SD3 preset's positional table caps a side (256 px for sd3-tiny); ACE has no such cap
    assert size_caps(get_config("sd3-tiny-editnet")) == {"max_side": 32 * 2 * 4} and size_caps(get_config("tiny")) == {}
    with pytest.raises(ValueError, match="max_aspect 0.5"):
        DataConfig(["x"], max_aspect=0.5)


def test_bad_rows_are_skipped_counted_and_each_one_reported(tmp_path):
    """The issue's rows (prompts [None] / [''], null task, a null history entry, 8x4000, NaN score) and
    rows over the token budget are skipped before decoding; every skip reaches on_skip, every epoch."""
    bad = ["no usable prompt: [None]", "no usable prompt: ['']", "null task", "null history entry", "8x4000",
           "NaN o_score", "null id"]
    rows = [row(i) for i in range(3)] + [row(3 + i, **BAD[case][0]) for i, case in enumerate(bad)]
    rows[0]["edited_prompt_list"] = [None, "", "make it green"]
    over = [row(20, size=(64, 64)), row(21, history=[{"prompt": "first", "image": png((9, 9, 9))}])]
    write_shard(rows + over, tmp_path / "part-00000.parquet")
    skipped, texts = [], []

    def encode(t):
        texts.extend(t)
        return text_encode(t)

    # 96 tokens per good row (two 64x48 images at 8 pixels per token): each one fills a batch
    loader = EditLoader(DataConfig([str(tmp_path)], token_budget=100, decoder="pil", prompt="first"), encode,
                        log=lambda m: None, on_skip=skipped.append)
    it, seen, tasks = iter(loader), set(), set()
    while loader.stats["records"] < 2 * (len(rows) + len(over)):  # two epochs
        b = next(it)
        seen.update(b.ids)
        tasks.update(b.tasks)
        assert b.packed.tokens.shape[0] <= 100
    assert seen == {"id0", "id1", "id2"} and tasks == {"attribute_modification"}
    assert "{image} make it green" in texts
    assert loader.stats["bad_row"] == 2 * len(bad) and loader.stats["over_budget"] == 2 * len(over)
    by_id = {}
    for s in skipped:
        by_id.setdefault(s["id"], []).append(s)
    for i, case in enumerate(bad[:-1]):
        reports = by_id[f"id{3 + i}"]
        assert len(reports) == 2 and reports[0]["kind"] == "bad_row", case
        assert BAD[case][1] in reports[0]["reason"], (case, reports)
    nameless = [k for k in by_id if k.startswith(f"{tmp_path / 'part-00000.parquet'}:row_group=0:row=")]
    assert len(nameless) == 1 and "omni_edit_id None" in by_id[nameless[0]][0]["reason"]
    assert [s["kind"] for s in by_id["id20"]] == ["over_budget"] * 2
    assert "128 image tokens at 64x64" in by_id["id20"][0]["reason"] and "budget of 100" in by_id["id20"][0]["reason"]
    assert "144 image tokens" in by_id["id21"][0]["reason"]


def test_a_bad_shard_is_skipped_and_reported_unless_every_shard_is(tmp_path):
    write_shard([row(i) for i in range(3)], tmp_path / "a.parquet")
    pq.write_table(pa.table({"omni_edit_id": ["x"], "task": ["t"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not a parquet file")
    skipped = []
    cfg = DataConfig([str(tmp_path)], token_budget=100, decoder="pil")
    loader = EditLoader(cfg, text_encode, log=lambda m: None, on_skip=skipped.append)
    assert loader.stats["bad_shard"] == 2
    assert [(s["id"], s["kind"]) for s in skipped] == [(str(tmp_path / f"{n}.parquet"), "bad_shard") for n in "bc"]
    assert "missing column(s) ['src_img'" in skipped[0]["reason"] and "not a readable Parquet" in skipped[1]["reason"]
    assert set(_take(loader, 1)[0].ids) <= {"id0", "id1", "id2"}
    # every rank scans the shards; rank 0 alone reports them, so stats summed over ranks count each shard once
    assert EditLoader(cfg, text_encode, rank=1, world=2, log=lambda m: None).stats["bad_shard"] == 0
    with pytest.raises(ValueError, match=r"no usable OmniEdit shard: .*/b\.parquet: .*missing.*/c\.parquet: not a"):
        RecordStream([str(tmp_path / "b.parquet"), str(tmp_path / "c.parquet")], seed=0)


def test_an_image_whose_header_disagrees_with_its_row_is_skipped_before_decoding(tmp_path, monkeypatch):
    """A small PNG that decodes to 4000x4000 in a row declaring 64x48: refused from its header alone."""
    def png(size, color=(200, 10, 0)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": "x.png"}

    rows = [{"omni_edit_id": f"id{i}", "task": "style_transfer", "src_img": png((64, 48)),
             "edited_img": png((4000, 4000) if i == 0 else (64, 48)), "edited_prompt_list": ["p"], "width": 64,
             "height": 48, "sc_score_1": 9, "sc_score_2": 9, "sc_reasoning": "", "pq_score": 9, "pq_reasoning": "",
             "o_score": 9.5} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=omniedit_schema(extras=False)), tmp_path / "x.parquet")
    decoded = []
    import omniace.train.data as data

    real = data.decode_rgb_array
    monkeypatch.setattr(data, "decode_rgb_array", lambda b, what="image": decoded.append(len(b)) or real(b, what))
    skipped = []
    loader = EditLoader(DataConfig([str(tmp_path)], token_budget=200, decoder="pil", prompt="first"), text_encode,
                        log=lambda m: None, on_skip=skipped.append)
    batch = next(iter(loader))
    assert "id0" not in batch.ids
    assert skipped[0]["id"] == "id0" and "edited_img is 4000x4000 (its header), the row says 64x48" in skipped[0]["reason"]
    assert decoded and max(decoded) < 1_000  # the 4000x4000 image (a larger PNG) was never decoded
