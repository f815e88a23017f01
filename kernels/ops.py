"""The three omniace ops: contracts, input validation and the backend switch.

The models call only these functions for RoPE, attention and control injection, so a faster backend
speeds up everything. ``backend="auto"`` picks the highest-priority registered backend that can run on
the inputs' device and dtype: on a GPU the CUDA extension, then Triton, except attention, which goes to
Triton first (see ``ATTENTION_PRIORITY``); on the CPU the segment-by-segment PyTorch forms of
``cpu_ops.py`` for attention and injection (one SDPA call, or one fused LayerNorm, per segment; no
gathered rows) and the reference for rope3d. Triton runs on the CPU only under its interpreter, for
tests, and only when named. ``dense`` (``dense.py``: no host reads of cu_seqlens, so
``torch.compile(fullgraph=True)``, CUDA graphs and ONNX export trace through it; O(L^2) attention) is used
only when named. ``OMNIACE_BACKEND`` or the
:func:`use_backend` context overrides ``auto``. Kernel backends go through the ``torch.library`` custom
ops of ``custom_ops.py``; the reference (``reference.py``, the definition of every op) and the attention
baselines (``baselines.py``) are plain PyTorch.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference

OPS = ("rope3d", "segment_attention", "editnet_inject")
# float64 is accepted too (the reference computes in it, which gradcheck needs); kernels take the first three
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Backends and what they need; named in the error when one is asked for but not registered here.
KNOWN_BACKENDS = {
    "triton": "a CUDA GPU and the 'triton' package",
    "cuda": "a CUDA GPU and the compiled omniace CUDA extension (csrc/)",
    "dense": "nothing (kernels/dense.py: masked dense ops with no host reads, for tracing)",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention (attention only)",
    "sdpa_segments": "the CPU (one SDPA call per segment; attention only)",
    "segments": "the CPU (one fused LayerNorm per segment; editnet_inject only)",
    "flex": "torch FlexAttention on a CUDA GPU (attention only)",
    "varlen": "torch's varlen attention on a CUDA GPU (attention only)",
    "flash_attn": "pip install 'omniace[gpu]' (flash-attn; attention only)",
    "xformers": "pip install 'omniace[gpu]' (xformers; attention only)",
}


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    priority: int  # higher wins under "auto"
    available: Callable[[torch.device], bool]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    auto_on_cpu: bool = True  # False: on the CPU only when named (Triton's interpreter is for tests)


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}

# The CUDA cross-attention forward (csrc/cross_attention.cu) computes scores and outputs with scalar FMAs
# on CUDA cores, one query per warp; Triton's attention runs its dot products on tensor cores (tl.dot).
# Without a GPU run showing the CUDA kernel faster, ``auto`` ranks it below Triton for attention;
# ``backend="cuda"`` still runs it, for that A/B measurement (``omniace bench --providers triton,cuda``).
ATTENTION_PRIORITY = {"cuda": 5, "triton": 10}


def register_backend(
    op: str,
    name: str,
    fn: Callable,
    priority: int = 0,
    available: Callable[[torch.device], bool] = lambda device: True,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    auto_on_cpu: bool = True,
) -> None:
    """Register ``fn`` (same signature and semantics as the reference) as backend ``name`` of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    _REGISTRY[op][name] = Backend(name, fn, priority, available, dtypes, auto_on_cpu)


def _ranked(op: str) -> list[Backend]:
    return sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends of ``op`` that can run on ``device``, best first."""
    device = torch.device(device)
    return [b.name for b in _ranked(op) if b.available(device)]


_OVERRIDE: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``backend="auto"`` mean ``name`` inside the block (benchmarks, tests, A/B runs)."""
    _OVERRIDE.append(name)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _auto(op: str, device: torch.device, dtype: torch.dtype) -> Backend:
    for b in _ranked(op):
        if dtype in b.dtypes and (device.type != "cpu" or b.auto_on_cpu) and b.available(device):
            return b
    raise RuntimeError(f"{op}: no backend can run {dtype} on {device}")


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
    if backend == "auto":
        backend = _OVERRIDE[-1] if _OVERRIDE else (os.environ.get("OMNIACE_BACKEND", "auto") or "auto")
    if backend == "auto":
        return _auto(op, device, dtype).fn
    entry = _REGISTRY[op].get(backend)
    if entry is None:
        if backend in KNOWN_BACKENDS:
            raise RuntimeError(
                f"{op}: backend {backend!r} is not available in this build (needs {KNOWN_BACKENDS[backend]}); "
                f"available here: {available_backends(op, device)}"
            )
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {sorted(_REGISTRY[op])}")
    if not entry.available(device):
        raise RuntimeError(f"{op}: backend {backend!r} cannot run on device {device}"
                           + (" (Triton on the CPU needs TRITON_INTERPRET=1)" if backend == "triton" else ""))
    if dtype not in entry.dtypes:
        raise ValueError(f"{op}: backend {backend!r} takes {[str(d) for d in entry.dtypes]}, got {dtype}")
    return entry.fn


def _check_float(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp32/fp16/bf16 (or fp64), got {t.dtype}")


def _check_cu_seqlens(name: str, cu: Tensor, total: int | None = None) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
        raise ValueError(
            f"{name} must be a 1-D int32 tensor [S+1], got "
            f"{getattr(cu, 'dtype', type(cu).__name__)} shape {tuple(getattr(cu, 'shape', ()))}"
        )
    # value checks only where they cost no device sync, and not while torch.compile traces (data-dependent)
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu.tolist()}")
        if total is not None and int(cu[-1]) != total:
            raise ValueError(f"{name} must end at the row count {total}, got {int(cu[-1])}")


def rope3d(
    q: Tensor,
    k: Tensor,
    pos: Tensor,
    axes_dims: tuple[int, int, int] | list[int],
    theta: float = 10000.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """3D rotary embedding of q and k over (frame, row, col).

    q ``[L, H, D]``, k ``[L, Hk, D]``, pos ``[L, 3]`` int32. ``axes_dims`` are three even ints with sum
    ``D' <= D``; dims past ``D'`` pass unchanged. Axis ``a`` covers dims from ``sum(axes_dims[:a])``;
    inside it interleaved pairs ``(x[2j], x[2j+1])`` rotate by ``pos[:, a] * theta ** (-2j / axes_dims[a])``
    (the complex convention of ACE and Flux). Angles in fp32; outputs keep the input dtype.
    """
    _check_float("q", q, 3)
    _check_float("k", k, 3)
    axes_dims = tuple(int(a) for a in axes_dims)
    if len(axes_dims) != 3 or any(a < 0 or a % 2 for a in axes_dims):
        raise ValueError(f"axes_dims must be three non-negative even ints, got {axes_dims}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be [L, Hk, D] with q's L and D; q {tuple(q.shape)}, k {tuple(k.shape)}")
    if sum(axes_dims) > q.shape[-1]:
        raise ValueError(f"sum(axes_dims)={sum(axes_dims)} exceeds the head dim {q.shape[-1]}")
    if pos.shape != (q.shape[0], 3) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be int32 [{q.shape[0]}, 3], got {pos.dtype} {tuple(pos.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    return _resolve("rope3d", backend, q.device, q.dtype)(q, k, pos, axes_dims, float(theta))


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Varlen block-diagonal attention: q segment ``s`` attends only to k/v segment ``s``.

    q ``[Lq, H, D]``, k and v ``[Lk, H, D]``, ``cu_seqlens_*`` int32 ``[S+1]``. Non-causal; a q segment
    whose k segment is empty outputs zeros; softmax in fp32; default scale ``1/sqrt(D)``. Returns
    ``[Lq, H, D]`` in q's dtype. ``max_seqlen_*`` are host ints (upper bounds) for kernel launch.
    """
    _check_float("q", q, 3)
    _check_float("k", k, 3)
    _check_float("v", v, 3)
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k and v must be [Lk, H, D] with q's H and D; q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} segments but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel() - 1}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _resolve("segment_attention", backend, q.device, q.dtype)(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale
    )


def editnet_inject(
    h: Tensor,
    ctrl: Tensor,
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
    cu_seqlens: Tensor,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Gated residual injection fused with the next sub-layer's LayerNorm and adaLN modulation.

    h, ctrl ``[L, C]``; shift, scale, gate ``[S, C]``; ``cu_seqlens [S+1]`` partitions the rows. For row
    ``r`` of segment ``s``: ``h_out = h + gate[s] * ctrl`` and
    ``y = LayerNorm(h_out, no affine, eps) * (1 + scale[s]) + shift[s]``. Returns ``(h_out, y)``.
    """
    _check_float("h", h, 2)
    _check_float("ctrl", ctrl, 2)
    if ctrl.shape != h.shape:
        raise ValueError(f"ctrl must match h {tuple(h.shape)}, got {tuple(ctrl.shape)}")
    _check_cu_seqlens("cu_seqlens", cu_seqlens, h.shape[0])
    segs = cu_seqlens.numel() - 1
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        _check_float(name, t, 2)
        if t.shape != (segs, h.shape[1]):
            raise ValueError(f"{name} must be [S={segs}, C={h.shape[1]}], got {tuple(t.shape)}")
    if not (h.dtype == ctrl.dtype and shift.dtype == scale.dtype == gate.dtype):
        raise ValueError(f"h and ctrl must share a dtype, and shift/scale/gate another; got h {h.dtype}, "
                         f"ctrl {ctrl.dtype}, shift {shift.dtype}, scale {scale.dtype}, gate {gate.dtype}")
    return _resolve("editnet_inject", backend, h.device, h.dtype)(h, ctrl, shift, scale, gate, cu_seqlens, eps)


def _register_kernel_backend(name: str, priority: int, available: Callable[[torch.device], bool]) -> None:
    """Route the three ops through the custom ops of ``custom_ops.py`` with kernels ``name``; attention
    ranks by ``ATTENTION_PRIORITY``, the other two by ``priority``."""
    from . import custom_ops as C

    register_backend(
        "rope3d", name, lambda q, k, pos, axes, theta: C.rope3d_op(q, k, pos, list(axes), theta, name),
        priority, available, KERNEL_DTYPES, auto_on_cpu=False)
    register_backend(
        "segment_attention", name,
        lambda q, k, v, cu_q, cu_k, max_q, max_k, scale: C.segment_attention_op(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, name)[0],
        ATTENTION_PRIORITY.get(name, priority), available, KERNEL_DTYPES, auto_on_cpu=False)
    register_backend(
        "editnet_inject", name,
        lambda h, ctrl, shift, scale, gate, cu, eps: C.editnet_inject_op(h, ctrl, shift, scale, gate, cu, eps, name)[:2],
        priority, available, KERNEL_DTYPES, auto_on_cpu=False)


def _register_builtin_backends() -> None:
    from . import baselines, cpu_ops
    from .cuda_ext import cuda_ext_available
    from .triton_utils import triton_can_run

    from . import dense

    for op in OPS:
        register_backend(op, "reference", getattr(reference, op), priority=0)
        # no host reads of cu_seqlens (torch.compile fullgraph, CUDA graphs, ONNX): only when named
        register_backend(op, "dense", getattr(dense, op), priority=-1)
    _register_kernel_backend("cuda", 20, cuda_ext_available)
    _register_kernel_backend("triton", 10, triton_can_run)
    baselines.register(register_backend)
    cpu_ops.register(register_backend)


_register_builtin_backends()
