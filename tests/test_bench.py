"""The bench CLI runs end to end on the CPU (small shapes, PyTorch providers) and its report logic is right."""
import json

from omniace.bench import report
from omniace.bench.op_bench import Row


def test_bench_cli_writes_table_json_and_plots(tmp_path, capsys):
    from omniace.engine.cli import main

    try:
        main(["bench", "--small", "--ops", "rope3d,editnet_inject", "--modes", "fwd,full", "--warmup", "1",
              "--rep", "2", "--out", str(tmp_path)])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "rope3d" in out and "editnet_inject" in out and "ace-tiny" in out
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["hardware"]["copy_gb_s"] > 0 and doc["hardware"]["torch"]
    timed = [r for r in doc["ops"] if r["median_ms"] is not None]
    assert {r["provider"] for r in timed} >= {"reference", "compile"}
    assert all(r["status"] == "ok" and r["max_rel_err"] < 1e-3 for r in timed)
    assert {s["mode"] for s in doc["denoiser"]} == {"inference", "training"}
    assert sorted(p.name.split("_", 2)[-1] for p in tmp_path.glob("*.svg")) == ["editnet_inject.svg", "rope3d.svg"]


def _row(provider, case, ms, frac=0.5, op="segment_attention", mode="fwd"):
    return Row(op, case, mode, provider, "torch.bfloat16", 1000, median_ms=ms, throughput=1.0,
               fraction_of_limit=frac, metric="TFLOP/s")


def test_targets_compare_against_the_right_baselines():
    rows = [_row("triton", "ace512-c2-self", 1.0), _row("varlen", "ace512-c2-self", 0.9),
            _row("flex", "ace512-c2-self", 1.5), _row("triton", "ace512-c2-cross", 1.0),
            _row("varlen", "ace512-c2-cross", 2.0), _row("cuda", "ace512-c2-cross", 0.5),
            _row("triton", "c", 1.0, 0.85, "rope3d"), _row("reference", "c", 3.0, 0.2, "rope3d")]
    got = {(t["target"], t["case"]): (t["measured"], t["met"]) for t in report.targets(rows, [])}
    assert got[("self-attention fwd: speedup over best of varlen/flash-attn", "ace512-c2-self")] == (0.9, False)
    assert got[("self-attention fwd: speedup over FlexAttention", "ace512-c2-self")] == (1.5, True)
    assert got[("cross-attention fwd: speedup over best varlen baseline", "ace512-c2-cross")] == (4.0, True)  # cuda
    assert got[("rope3d fwd: fraction of copy bandwidth", "c")] == (0.85, True)
    assert got[("rope3d fwd: speedup over eager reference", "c")] == (3.0, False)
