"""The synthetic corpus: tasks, specialists and their failures, the judge, and the OmniEdit Parquet schema."""
import collections
import io

import pytest
from PIL import Image

from omniace.train.scenes import ASPECTS, frame_size
from omniace.train.scorer import score
from omniace.train.synthetic import FAILURES, TASKS, generate, write_corpus


@pytest.fixture(scope="module")
def clean():
    return list(generate(180, seed=3, failure_rate=0.0))


@pytest.fixture(scope="module")
def failed():
    return list(generate(180, seed=4, failure_rate=1.0))


def test_every_task_and_aspect_appears(clean):
    assert {r["task"] for r in clean} == set(TASKS)
    sizes = {(r["width"], r["height"]) for r in clean}
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    assert {a for a in ASPECTS for s in (64, 96) if frame_size(a, s) in sizes} == set(ASPECTS)
    assert any(r["history"] for r in clean), "some records carry a multi-turn history"
    assert all(r["mask_img"] is not None for r in clean if r["task"] in ("inpainting", "outpainting"))


def test_judge_passes_clean_edits_and_fails_broken_ones(clean, failed):
    """Importance weight lambda = [o_score >= 9] keeps almost every clean pair and drops almost every failure."""
    keep_clean = collections.defaultdict(list)
    for r in clean:
        keep_clean[r["task"]].append(r["o_score"] >= 9)
    for task, kept in keep_clean.items():
        assert sum(kept) / len(kept) >= 0.9, (task, kept)
    by_mode = collections.defaultdict(list)
    for r in failed:
        by_mode[r["failure"]].append(r["o_score"] >= 9)
    assert set(by_mode) == set(FAILURES)
    for mode, kept in by_mode.items():
        assert sum(kept) / len(kept) <= 0.1, (mode, sum(kept), len(kept))


def test_judge_reads_only_what_it_sees():
    img = Image.new("RGB", (32, 32), (150, 150, 150))
    s = score(img, img, "do something unusual")
    assert s.sc_score_1 == 0 and "cannot read" in s.sc_reasoning
    s = score(img, Image.new("RGB", (16, 32)), "remove the red circle")
    assert s.o_score == 0 and "size differs" in s.sc_reasoning


def test_generation_is_deterministic():
    a, b = list(generate(5, seed=9)), list(generate(5, seed=9))
    assert [r["src_img"]["bytes"] for r in a] == [r["src_img"]["bytes"] for r in b]
    assert [r["o_score"] for r in a] == [r["o_score"] for r in b]
    assert list(generate(1, seed=10))[0]["omni_edit_id"] != a[0]["omni_edit_id"]


def test_parquet_shards_follow_the_omniedit_schema(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from omniace.train.omniedit_format import REQUIRED, omniedit_schema

    paths = write_corpus(tmp_path, 7, shard_size=3, log=lambda m: None, seed=1, fmt="jpeg")
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(paths[0])
    released = omniedit_schema(extras=False)
    for name in REQUIRED:
        assert table.schema.field(name).type == released.field(name).type, name
    row = table.slice(0, 1).to_pylist()[0]
    img = Image.open(io.BytesIO(row["src_img"]["bytes"]))
    assert img.format == "JPEG" and img.size == (row["width"], row["height"])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_pyarrow_is_named_before_any_pair_is_drawn(tmp_path, monkeypatch, capsys):
    """A fresh user on the README's plain install got a traceback, after every pair had been drawn."""
    import sys

    from omniace.train import synthetic

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("pairs drawn before the check"))
    with pytest.raises(SystemExit) as exit:
        synthetic.main(["--out", str(tmp_path / "c"), "--pairs", "3"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "needs the optional package 'pyarrow'" in err and "omniace[train]" in err
    assert err.count("\n") == 1, err  # one line, no usage block
    assert not (tmp_path / "c").exists()
