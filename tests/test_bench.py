"""The bench CLI runs end to end on the CPU (small shapes, PyTorch providers) and its report logic is right."""
import json
import math
import re

import pytest
import torch

from omniace.bench import report
from omniace.bench.denoiser import StepRow
from omniace.bench.hardware import Hardware
from omniace.bench.op_bench import Row


def test_bench_cli_writes_table_json_and_plots(tmp_path, capsys, monkeypatch):
    from omniace.engine.cli import main

    monkeypatch.chdir(tmp_path)  # no --out: results land in ./bench_results, not in the installed package
    try:
        main(["bench", "--small", "--ops", "rope3d,editnet_inject", "--modes", "fwd,full", "--warmup", "1",
              "--rep", "2"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "rope3d" in out and "editnet_inject" in out and "ace-tiny" in out and "spread" in out
    (path,) = (tmp_path / "bench_results").glob("*.json")
    doc = json.loads(path.read_text())
    hw = doc["hardware"]
    assert hw["copy_gb_s"] > 0 and hw["torch"] and hw["cpu"] and hw["threads"] == torch.get_num_threads()
    assert len(hw["git_sha"]) == 40 and hw["versions"]["torch"] == torch.__version__
    timed = [r for r in doc["ops"] if r["median_ms"] is not None]
    assert {r["provider"] for r in timed} >= {"reference", "compile"}
    assert all(r["max_rel_err"] < 1e-3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in timed)
    assert all(r["status"] == "ok" or r["status"].startswith(report.IMPOSSIBLE) for r in timed)
    assert {s["mode"] for s in doc["denoiser"]} == {"inference", "training"}
    assert {s["provider"] for s in doc["denoiser"]} == {"reference", "omniace"}
    assert sorted(p.name.split("_", 2)[-1] for p in path.parent.glob("*.svg")) == [
        "editnet_inject_full.svg", "editnet_inject_fwd.svg", "rope3d_full.svg", "rope3d_fwd.svg"]


def _row(provider, case, ms, frac=0.5, op="segment_attention", mode="fwd", tokens=1000, spread=0.1):
    return Row(op, case, mode, provider, "torch.bfloat16", tokens, median_ms=ms, throughput=frac * 2.0,
               fraction_of_limit=frac, metric="TFLOP/s", p20_ms=ms * (1 - spread), p80_ms=ms * (1 + spread))


def _hw(**kw):
    base = dict(device="cuda", name="NVIDIA H100", driver="550.54", torch="2.13.0", triton="3.9.0", cuda="12.8",
                python="3.11.7", date="2026-11-29T12:00:00+00:00", copy_gb_s=3000.0, matmul_tflop_s=2.0,
                matmul_dtype="bfloat16", cpu="AMD EPYC", threads=16, git_sha="a" * 40, git_dirty=False,
                versions={"torch": "2.13.0"})
    return Hardware(**{**base, **kw})


def test_impossible_rows_are_flagged_not_quoted():
    """The issue's instances (full faster than fwd; above 100% of the limit) and one of ours (a training
    step faster than inference): flagged in the status, no throughput printed, left out of the targets."""
    rows = [_row("triton", "ace512-c2-self", 2.0, mode="fwd"), _row("triton", "ace512-c2-self", 1.5, mode="full"),
            _row("triton", "ace512-c2-self", 1.2, mode="bwd"), _row("varlen", "ace512-c2-self", 1.0, 1.07),
            _row("triton", "ace512-c1-self", 1.0, 0.6), _row("triton", "ace512-c1-self", 3.0, 0.6, mode="full")]
    steps = [StepRow("ace-0.6b-512", "inference", "omniace", "bf16", 2048, median_ms=10.0, mfu=0.4),
             StepRow("ace-0.6b-512", "training", "omniace", "bf16", 2048, median_ms=8.0, mfu=1.5),
             StepRow("sd3", "inference", "omniace", "bf16", 2048, median_ms=10.0, mfu=0.3, tokens_per_s=1.0,
                     tflop_s=0.6, p20_ms=9.0, p80_ms=11.0)]
    assert report.mark_impossible(rows, steps) == 5
    assert rows[0].status == "IMPOSSIBLE: fwd slower than full (fwd + the other half)"
    assert rows[1].status == "IMPOSSIBLE: full faster than fwd"
    assert rows[3].status == "IMPOSSIBLE: 107% of the measured limit"
    assert [r.status for r in (rows[2], rows[4], rows[5])] == ["ok"] * 3
    assert steps[0].status == "IMPOSSIBLE: inference slower than training"
    assert steps[1].status == "IMPOSSIBLE: training faster than inference; MFU 150%"
    assert steps[2].status == "ok"
    text = report.table(_hw(), rows, steps)
    line = next(ln for ln in text.splitlines() if "varlen" in ln)
    assert "TFLOP/s" not in line and "107%" in line and "2.14" not in line
    assert "5 row(s) flagged IMPOSSIBLE" in text and "-10/+10%" in text
    targets = report.targets(rows, steps)
    assert not [t for t in targets if t["case"] == "ace512-c2-self" or t["case"].startswith("ace-0.6b")]


def test_compare_two_results_files(tmp_path, capsys):
    a = {"hardware": _hw().to_dict(), "ops": [vars(_row("triton", "c1", 2.0)), vars(_row("triton", "c2", 1.0)),
                                                vars(_row("triton", "only-a", 1.0))],
         "denoiser": [vars(StepRow("ace-tiny", "inference", "omniace", "fp32", 64, median_ms=10.0,
                                   p20_ms=9.0, p80_ms=11.0))]}
    b = {"hardware": _hw(git_sha="b" * 40, threads=8).to_dict(),
         "ops": [vars(_row("triton", "c1", 1.0)), vars(_row("triton", "c2", 1.05))],
         "denoiser": [vars(StepRow("ace-tiny", "inference", "omniace", "fp32", 64, median_ms=5.0,
                                   p20_ms=4.0, p80_ms=6.0))]}
    paths = []
    for name, doc in (("a.json", a), ("b.json", b)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(doc))
    from omniace.bench.cli import main

    assert main(["--compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert f"differs: git_sha: A '{'a' * 40}' | B '{'b' * 40}'" in out and "differs: threads: A 16 | B 8" in out
    assert re.search(r"c1 .* 2 +1 +2\.00 *$", out, re.MULTILINE)  # B twice as fast, outside the spread
    assert re.search(r"c2 .* 0\.95 +within spread", out)
    assert re.search(r"ace-tiny .* 2\.00", out)
    assert "1 row(s) timed in only one" in out
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match=r"bad\.json: not an omniace bench results file"):
        main(["--compare", str(paths[0]), str(tmp_path / "bad.json")])


def test_plots_have_readable_axes_for_every_mode(tmp_path):
    """CPU-sized throughputs (well under 1 GB/s) once printed every y tick as 0; the limit is named when
    it is off scale; each mode gets its own plot."""
    rows = [vars(_row(p, f"c{n}", 1.0, frac=f, op="rope3d", mode=m, tokens=n))
            for p, f in (("reference", 0.0012), ("compile", 0.0031)) for n in (512, 1024, 1100, 4096)
            for m in ("fwd", "bwd")]
    for r in rows:
        r["metric"] = "GB/s"
        r["throughput"] = r["fraction_of_limit"] * 6.0
    path = tmp_path / "cpu_x.json"
    path.write_text(json.dumps({"hardware": _hw(device="cpu", name="cpu", copy_gb_s=6.0).to_dict(), "ops": rows,
                                "denoiser": []}))
    written = report.write_plots(path)
    assert [p.name for p in written] == ["cpu_x_rope3d_fwd.svg", "cpu_x_rope3d_bwd.svg"]
    svg = written[0].read_text()
    yticks = re.findall(r'text-anchor="end">([^<]+)<', svg)
    assert len(set(yticks)) == len(yticks) >= 3 and yticks[0] == "0" and "0.02" in yticks
    assert "measured limit 6 GB/s (off scale)" in svg and "throughput, GB/s" in svg
    xticks = re.findall(r'y="\d+\.?\d*" text-anchor="middle">([\d.k]+)<', svg)
    assert xticks == ["512", "1.02k", "4.1k"]  # 1100 sits too close to 1024 to get a label


def test_nice_ticks():
    assert report.nice_ticks(0.37) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert report.nice_ticks(1234) == [0, 500, 1000, 1500]
    assert all(math.isclose(t, i * 0.002) for i, t in enumerate(report.nice_ticks(0.0099)))


def test_measure_interleaved_runs_round_robin():
    from omniace.bench.timing import measure_interleaved

    calls = []
    got = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              torch.device("cpu"), warmup=1, rep=3)
    assert calls == ["a", "b"] * 4 and got["a"].runs == got["b"].runs == 3
    assert got["a"].min_ms <= got["a"].p20_ms <= got["a"].median_ms <= got["a"].p80_ms
    assert got["a"].cpu_ms is not None and got["a"].cpu_ms >= 0


def test_benchmark_suite_ids_name_the_cli_cases():
    import importlib.util
    from pathlib import Path

    import omniace.bench

    spec = importlib.util.spec_from_file_location("suite", Path(omniace.bench.__file__).parent / "test_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    ids = {p.id for p in suite._op_cases()} | {p.id for p in suite._denoiser_cases()}
    assert "rope3d-ace-small-c1-fwd-reference" in ids and "segment_attention-sd3-editnet-base-full-sdpa" in ids
    assert "denoiser-ace-tiny-inference-omniace" in ids and "denoiser-sd3-tiny-editnet-training-reference" in ids


def test_diffusers_comparison_smoke(tmp_path, capsys):
    """Both cases run, omniace matches diffusers on the same weights, and the padded batch computes more
    tokens than the packed one. (A smoke run: tiny latents say nothing about speed.)"""
    pytest.importorskip("diffusers")
    from omniace.bench.cli import main

    assert main(["diffusers", "--small", "--rep", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert "mixed-aspect  diffusers-padded" in capsys.readouterr().out
    (path,) = tmp_path.glob("diffusers_cpu_*.json")
    doc = json.loads(path.read_text())
    rows = {(r["case"], r["provider"]): r for r in doc["rows"]}
    assert set(rows) == {("one-image", "omniace"), ("one-image", "diffusers"), ("mixed-aspect", "omniace"),
                         ("mixed-aspect", "diffusers-loop"), ("mixed-aspect", "diffusers-padded")}
    assert rows["one-image", "omniace"]["max_rel_err"] < 1e-5 and rows["mixed-aspect", "omniace"]["max_rel_err"] < 1e-5
    assert rows["mixed-aspect", "diffusers-padded"]["tokens"] == 3 * 16 * 24 // 4 > rows["mixed-aspect", "omniace"]["tokens"]
    assert doc["host"]["versions"]["diffusers"] and len(doc["host"]["git_sha"]) == 40


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


def test_host_facts_name_the_commit_only_inside_a_checkout(tmp_path):
    from omniace.bench.hardware import describe_host, git_state

    assert git_state(tmp_path) == (None, None)  # an installed wheel: no commit to claim
    host = describe_host(torch.device("cpu"))
    assert re.fullmatch(r"[0-9a-f]{40}", host["git_sha"]) and isinstance(host["git_dirty"], bool)
    assert host["threads"] == torch.get_num_threads() and host["versions"]["python"]
