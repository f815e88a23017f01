"""The CUDA C++ sources compile (``nvcc -c``) and the torch bindings pass a C++ syntax check, on CPU CI.

Running them needs a GPU: see ``test_kernels.py::test_cuda_backend_self_check_and_ops``.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CSRC)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_all_sources_are_listed_for_the_build():
    from omniace.kernels.cuda_ext import SOURCES

    assert sorted(s for s in SOURCES if s.endswith(".cu")) == CUDA_SOURCES
    assert CUDA_SOURCES, "no CUDA sources found"


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # sm_90 (Hopper), with the flags torch's JIT build adds (no implicit half/bf16 conversions), and
    # warnings as errors so sloppy conversions fail here rather than on the GPU machine
    _run([nvcc, "-c", "-std=c++17", "-O3", "-arch=sm_90", *COMMON_NVCC_FLAGS, "-Xcompiler", "-Wall",
          "--Werror", "all-warnings", source, "-o", str(tmp_path / (source + ".o"))])


def test_bindings_syntax():
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    _run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", *[f"-I{p}" for p in include_paths()], "bindings.cpp"])
