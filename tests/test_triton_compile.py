"""Every Triton kernel variant the launchers use compiles to a Hopper cubin (no GPU needed).

The interpreter tests check numerics but not what only real compilation checks: types, layouts, tile
shapes, shared memory. ``omniace.kernels.triton_aot`` lowers each variant with Triton's full pipeline and
the bundled ptxas; it must run in its own process because conftest turns the interpreter on.
"""
import os
import subprocess
import sys

import pytest


def _aot(tmp_path, *args):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "omniace.kernels.triton_aot", *args], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s)" in proc.stdout
    return proc.stdout


def test_kernels_compile_for_sm90(tmp_path):
    out = _aot(tmp_path, "--quick")
    assert "attention fwd D=72 short-keys" in out and "editnet_inject bwd" in out


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 100])
def test_all_variants_compile(tmp_path, arch):
    _aot(tmp_path, "--arch", str(arch))
