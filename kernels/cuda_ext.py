"""The CUDA C++ kernels of ``csrc/``: just-in-time build, Python wrappers, and a self-check.

``load()`` builds ``csrc/*.cu`` + ``bindings.cpp`` with ``torch.utils.cpp_extension`` on first use (cached
by torch between runs; ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, ``MAX_JOBS`` the build
parallelism) and registers ``torch.ops.omniace_cuda.*``. Before the backend is offered to ``auto`` each
kernel is run once against the reference on small random inputs; a kernel that disagrees disables the
backend with a warning rather than returning wrong numbers.

Coverage: ``rope3d`` forward and backward, ``editnet_inject`` forward, and the short-key cross-attention
forward run in CUDA. The cross-attention kernel runs on CUDA cores (no tensor cores), so ``auto`` ranks
Triton above it for attention (``ops.ATTENTION_PRIORITY``); it runs only when ``backend="cuda"`` is named. Everything else this backend is asked for (attention with key segments longer
than ``CROSS_MAX_KEYS``, head dims over 128, both backward passes of attention and injection, shapes
that break 16-byte alignment) runs the Triton kernels, which share the saved-statistics layout.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .reference import rope3d_inv_freq

CROSS_MAX_KEYS = 128  # kCrossMaxKeys in csrc/launchers.h
CROSS_MAX_HEAD_DIM = 128
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "rope3d.cu", "editnet_inject.cu", "cross_attention.cu")


@functools.cache
def load() -> None:
    """Build (or reuse the cached build of) the extension; raises with the build log on failure."""
    from torch.utils.cpp_extension import load as jit_load

    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        raise RuntimeError(f"omniace CUDA sources not found in {CSRC} (missing {missing}); "
                           "install omniace from a source checkout (pip install -e .)")
    # no --use_fast_math: the rope kernel needs accurate sincosf for angles of tens of radians
    jit_load(name="omniace_cuda", sources=[str(CSRC / s) for s in SOURCES], is_python_module=False,
             extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=["-O3", "-std=c++17"],
             verbose=os.environ.get("OMNIACE_VERBOSE_BUILD") == "1")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _vec(x: Tensor) -> int:
    return 16 // x.element_size()


def _aligned(x: Tensor, *strides: int) -> bool:
    n = _vec(x)
    return x.data_ptr() % 16 == 0 and all(s % n == 0 for s in strides)


def _rope_ok(q: Tensor, k: Tensor) -> bool:
    D = q.shape[-1]
    return (q.stride(-1) == 1 and k.stride(-1) == 1 and D % _vec(q) == 0
            and _aligned(q, q.stride(0), q.stride(1)) and _aligned(k, k.stride(0), k.stride(1)))


def _rope(q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int], theta: float,
          sign: float) -> tuple[Tensor, Tensor]:
    if not _rope_ok(q, k):
        from . import triton_rope

        return triton_rope.rope3d_rotate(q, k, pos, axes_dims, theta, inverse=sign < 0)
    inv_freq = rope3d_inv_freq(tuple(axes_dims), float(theta), q.device)
    return tuple(torch.ops.omniace_cuda.rope3d(q, k, pos.to(torch.int32).contiguous(), inv_freq, axes_dims[0] // 2,
                                               axes_dims[1] // 2, sign, _stream(q.device)))


def rope3d_forward(q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                   theta: float) -> tuple[Tensor, Tensor]:
    return _rope(q, k, pos, axes_dims, theta, 1.0)


def rope3d_backward(dq: Tensor, dk: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                    theta: float) -> tuple[Tensor, Tensor]:
    return _rope(dq, dk, pos, axes_dims, theta, -1.0)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    if max_k <= CROSS_MAX_KEYS and q.shape[-1] <= CROSS_MAX_HEAD_DIM and all(x.stride(-1) == 1 for x in (q, k, v)):
        return tuple(torch.ops.omniace_cuda.cross_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale,
                                                                _stream(q.device)))
    from . import triton_attention

    return triton_attention.attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def inject_forward(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu: Tensor,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    C = h.shape[1]
    mods = [m.contiguous() for m in (shift, scale, gate)]
    ok = (all(m.dtype == h.dtype for m in mods) and h.stride(1) == 1 and ctrl.stride(1) == 1
          and C % _vec(h) == 0 and C <= 4096 * _vec(h)
          and _aligned(h, h.stride(0)) and _aligned(ctrl, ctrl.stride(0)) and all(_aligned(m) for m in mods))
    if not ok:
        from . import triton_inject

        return triton_inject.inject_forward(h, ctrl, shift, scale, gate, cu, eps)
    return tuple(torch.ops.omniace_cuda.editnet_inject(h, ctrl, *mods, cu.contiguous(), eps, _stream(h.device)))


def self_check(device: torch.device) -> list[str]:
    """Run every CUDA kernel once against the reference; returns the names of those that disagree."""
    from . import reference

    bad = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    cu = torch.tensor([0, 5, 5, 70], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 3, 20], dtype=torch.int32, device=device)
    q, k = rand(70, 3, 72), rand(70, 2, 72)
    pos = torch.randint(0, 9, (70, 3), generator=g, dtype=torch.int32).to(device)
    got = rope3d_forward(q, k, pos, (24, 24, 24), 10000.0)
    want = reference.rope3d(q, k, pos, (24, 24, 24))
    if any((a.float() - b.float()).abs().max() > 3e-2 for a, b in zip(got, want)):
        bad.append("rope3d")
    kk, vv = rand(20, 3, 72), rand(20, 3, 72)
    got_o, _ = attention_forward(q, kk, vv, cu, cu_k, 65, 17, 72 ** -0.5)
    if (got_o.float() - reference.segment_attention(q, kk, vv, cu, cu_k, 65, 17).float()).abs().max() > 3e-2:
        bad.append("cross_attention_fwd")
    h, c, mods = rand(70, 64), rand(70, 64), [rand(3, 64) for _ in range(3)]
    got = inject_forward(h, c, *mods, cu, 1e-6)[:2]
    want = reference.editnet_inject(h, c, *mods, cu)
    if any((a.float() - b.float()).abs().max() > 6e-2 for a, b in zip(got, want)):
        bad.append("editnet_inject")
    return bad


@functools.cache
def _usable(device_index: int) -> bool:
    if os.environ.get("OMNIACE_CUDA_EXT", "1") == "0":
        return False
    try:
        load()
        bad = self_check(torch.device("cuda", device_index))
    except Exception as err:  # a failed build must not take the Triton backend down with it
        warnings.warn(f"omniace CUDA extension unavailable, falling back to Triton: {err}", stacklevel=3)
        return False
    if bad:
        warnings.warn(f"omniace CUDA kernels {bad} disagree with the reference on this GPU; "
                      "the 'cuda' backend is disabled", stacklevel=3)
    return not bad


def cuda_ext_available(device: torch.device) -> bool:
    """True on a CUDA device where the extension builds and passes its self-check (set OMNIACE_CUDA_EXT=0 to skip)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _usable(device.index if device.index is not None else torch.cuda.current_device())
