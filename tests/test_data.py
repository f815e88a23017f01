"""The OmniEdit Parquet loader: buckets under a token budget, DALI = PIL, rank sharding, exact resume, bad data."""
import io

import pytest
import torch
from PIL import Image

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from omniace.engine.text import TinyTextEncoder  # noqa: E402
from omniace.train.data import DataConfig, EditLoader, RecordStream  # noqa: E402
from omniace.train.importance import ImportanceConfig, importance_weight  # noqa: E402
from omniace.train.omniedit_format import omniedit_schema, write_shard  # noqa: E402
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
        if len(b.ids) > 1:
            assert b.packed.tokens.shape[0] <= 900
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
    # a budget of one token: every sample is its own batch, flushed when the next record arrives
    loader = EditLoader(DataConfig([str(tmp_path)], token_budget=1, decoder="pil"), text_encode, log=logs.append)
    it = iter(loader)
    seen = set()
    while loader.stats["records"] < 14:  # two epochs: every good record has been flushed
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


def test_a_plain_omniedit_file_written_by_pyarrow_loads(tmp_path):
    """The released schema exactly (no extra columns), written by pyarrow directly."""
    def png(color, size=(64, 48)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": "x.png"}

    rows = [{"omni_edit_id": f"id{i}", "task": "attribute_modification", "src_img": png((200, 0, 0)),
             "edited_img": png((0, 0, 200)), "edited_prompt_list": ["make it blue", "turn it blue"], "width": 64,
             "height": 48, "sc_score_1": 9, "sc_score_2": 10, "sc_reasoning": "ok", "pq_score": 10,
             "pq_reasoning": "ok", "o_score": 9.5} for i in range(4)]
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
