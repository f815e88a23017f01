"""Every Triton kernel variant the launchers use compiles to a Hopper cubin (no GPU needed), and what it
compiles to meets issue 13's targets.

The interpreter tests check numerics but not what only real compilation checks: types, layouts, tile
shapes, shared memory, registers, spills, the width of every global load. ``omniace.kernels.triton_aot``
captures the real launches at the bench's preset shapes and compiles them with the JIT's own
specialisation; it must run in its own process because conftest turns the interpreter on.
"""
import json
import os
import subprocess
import sys

import pytest


def _aot(tmp_path, *args) -> tuple[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "omniace.kernels.triton_aot", "--json", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failure(s)" in proc.stdout
    return proc.stdout, json.loads(out.read_text())


def _rows(report, kernel_prefix, dtype=None):
    return [r for r in report["variants"] if r["kernel"].startswith(kernel_prefix) and dtype in (None, r["dtype"])]


def test_aot_report_meets_the_targets_at_every_preset_shape(tmp_path):
    """Issue 13 items 1 and 2, over every heuristic choice at the bench's shapes (head dims 64, 72, 128).

    One AOT run (about 2 minutes on 2 cores). Half precision: zero spills and no 2-byte scalar loads in
    every variant (attention, rope3d, editnet_inject); fp32 at most 512 spilled bytes in every variant,
    the attention backward included (its exact fp32 dots spilled 1.3-7 KB before they were chunked).
    """
    out, report = _aot(tmp_path)
    assert "_attn_fwd_kernel" in out and "_inject_bwd_kernel" in out and "_rope3d_kernel" in out
    assert report["quick"] is False and report["arch"] == 90 and report["git_sha"]
    defaults = [r for r in report["variants"] if r["default"]]
    head_dims = {int(r["label"].split("D=")[1].split()[0]) for r in _rows(report, "_attn_") if r["default"]}
    assert {64, 72, 128} <= head_dims, head_dims
    for r in defaults:
        assert r["misses"] == [], (r["label"], r["dtype"], r["misses"])
    # fp32 backward at head dims 64, 72 and 128: both kernels, a few hundred spilled bytes at most
    fp32_bwd = [r for r in defaults if r["kernel"].startswith("_attn_bwd_") and r["dtype"] == "fp32"]
    assert {(r["kernel"], r["label"].split(" D=")[1].split()[0]) for r in fp32_bwd} >= {
        (k, d) for k in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel") for d in ("64", "72", "128")}, fp32_bwd
    assert all(r["spill_store_bytes"] + r["spill_load_bytes"] <= 512 for r in fp32_bwd), fp32_bwd
    # rope3d: one 16-byte vector load and store per 8 pair elements (not two 2-byte scalars per pair), also at
    # head dim 72 (ALIGN=8), forward and inverse
    rope = [r for r in defaults if r["kernel"] == "_rope3d_kernel" and r["dtype"] != "fp32"]
    assert {r["label"].split(" D=")[1].split()[0] for r in rope} >= {"72", "128"}, rope
    assert {r["label"].split("SIGN=")[1].split()[0] for r in rope} == {"1.0", "-1.0"}, rope
    for r in rope:
        mem = r["memory"]
        assert "2" not in mem["ld_global"] and "2" not in mem["st_global"], r
        assert mem["ld_global"].get("16", 0) > 0 and mem["st_global"].get("16", 0) > 0 and "ALIGN=8" in r["label"], r
    ace = [r for r in _rows(report, "_attn_", "bf16") if {"ace512-c1-self", "ace512-c1-cross"} & set(r["cases"])]
    # forward (general and short-key paths), dQ and dK/dV at the ACE preset (head dim 72)
    assert {r["kernel"] for r in ace} == {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    for r in ace:
        # the JIT's specialisation: i32 strides, 16-byte aligned rows (ALIGN=8 bf16 elements) at head dim 72
        assert r["signature"]["s_qm"] == "i32" and "ALIGN=8" in r["label"] and "D=72" in r["label"], r
        # item 1: 16-byte vector loads, no 2-byte scalar loads, tensor cores
        assert r["memory"]["ld_global"].get("2", 0) == 0 and r["memory"]["ld_global"].get("16", 0) > 0, r
        assert r["memory"]["mma"] > 0 and 0 < r["occupancy"]["warps_per_sm"] <= 64 and r["shared_bytes"] > 0, r
    # async copies in the pipelined loops (the short-key forward has no loop over keys)
    looped = [r for r in ace if "ONE_KV=True" not in r["label"]]
    assert looped and all(r["memory"]["cp_async"].get("16", 0) > 0 for r in looped), looped
    # SD3's D=64 forward as the JIT specialises it: 3-stage cp.async pipeline, 64 KB (the old AOT said 32 KB)
    sd3 = [r for r in _rows(report, "_attn_fwd_kernel", "bf16") if "sd3-editnet-base" in r["cases"]]
    assert [r["shared_bytes"] for r in sd3] == [65536], sd3


@pytest.mark.slow
def test_all_variants_compile_for_blackwell(tmp_path):
    _aot(tmp_path, "--arch", "100")
