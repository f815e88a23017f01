"""The kernel backends as ``torch.library`` custom ops with fake implementations and autograd.

``torch.ops.omniace.{rope3d, segment_attention, editnet_inject}`` (and their ``*_backward`` ops) are
what ``torch.compile``, FSDP and ``torch.export`` see: one opaque op per call, with a fake (meta)
implementation for shape propagation and a registered backward. A trailing ``backend`` string selects
the kernels (``"triton"`` or ``"cuda"``); the kernel modules are imported on first use, so importing
omniace never needs Triton or a GPU. The reference and the attention baselines are plain PyTorch and
need no custom op: autograd and the compilers already see through them.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
from torch import Tensor

# backend -> {kernel name -> "module:function"}; every kernel backend supplies all six
KERNEL_TABLES: dict[str, dict[str, str]] = {
    "triton": {
        "rope3d_fwd": "triton_rope:rope3d_forward",
        "rope3d_bwd": "triton_rope:rope3d_backward",
        "attention_fwd": "triton_attention:attention_forward",
        "attention_bwd": "triton_attention:attention_backward",
        "inject_fwd": "triton_inject:inject_forward",
        "inject_bwd": "triton_inject:inject_backward",
    },
    "cuda": {
        "rope3d_fwd": "cuda_ext:rope3d_forward",
        "rope3d_bwd": "cuda_ext:rope3d_backward",
        "attention_fwd": "cuda_ext:attention_forward",
        "attention_bwd": "triton_attention:attention_backward",  # no CUDA backward: Triton's reads the same lse
        "inject_fwd": "cuda_ext:inject_forward",
        "inject_bwd": "triton_inject:inject_backward",
    },
}


@functools.cache
def kernel(backend: str, name: str) -> Callable:
    table = KERNEL_TABLES.get(backend)
    if table is None:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {sorted(KERNEL_TABLES)}")
    module, fn = table[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


# ---- rope3d ------------------------------------------------------------------------------------------
@torch.library.custom_op("omniace::rope3d", mutates_args=())
def rope3d_op(q: Tensor, k: Tensor, pos: Tensor, axes_dims: list[int], theta: float,
              backend: str) -> tuple[Tensor, Tensor]:
    return kernel(backend, "rope3d_fwd")(q, k, pos, tuple(axes_dims), theta)


@rope3d_op.register_fake
def _(q, k, pos, axes_dims, theta, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("omniace::rope3d_backward", mutates_args=())
def rope3d_backward_op(dq: Tensor, dk: Tensor, pos: Tensor, axes_dims: list[int], theta: float,
                       backend: str) -> tuple[Tensor, Tensor]:
    return kernel(backend, "rope3d_bwd")(dq, dk, pos, tuple(axes_dims), theta)


@rope3d_backward_op.register_fake
def _(dq, dk, pos, axes_dims, theta, backend):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _rope3d_setup(ctx, inputs, output):
    _, _, pos, ctx.axes_dims, ctx.theta, ctx.backend = inputs
    ctx.save_for_backward(pos)


def _rope3d_grad(ctx, dq_out, dk_out):
    (pos,) = ctx.saved_tensors
    dq, dk = rope3d_backward_op(dq_out, dk_out, pos, ctx.axes_dims, ctx.theta, ctx.backend)
    return dq, dk, None, None, None, None


rope3d_op.register_autograd(_rope3d_grad, setup_context=_rope3d_setup)


# ---- segment_attention -------------------------------------------------------------------------------
@torch.library.custom_op("omniace::segment_attention", mutates_args=())
def segment_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         backend: str) -> tuple[Tensor, Tensor]:
    """Returns ``(out [Lq, H, D], lse [Lq, H] fp32)``; ``lse`` is saved for backward, not differentiable."""
    return kernel(backend, "attention_fwd")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


@segment_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("omniace::segment_attention_backward", mutates_args=())
def segment_attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                                  max_seqlen_k: int, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return kernel(backend, "attention_bwd")(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                            max_seqlen_q, max_seqlen_k, scale)


@segment_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _attention_grad(ctx, d_out, d_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = segment_attention_backward_op(d_out, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
                                               ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


segment_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---- editnet_inject ----------------------------------------------------------------------------------
@torch.library.custom_op("omniace::editnet_inject", mutates_args=())
def editnet_inject_op(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu_seqlens: Tensor,
                      eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(h_out, y, mean [L] fp32, rstd [L] fp32)``; the statistics are saved for backward."""
    return kernel(backend, "inject_fwd")(h, ctrl, shift, scale, gate, cu_seqlens, eps)


@editnet_inject_op.register_fake
def _(h, ctrl, shift, scale, gate, cu_seqlens, eps, backend):
    stat = h.new_empty(h.shape[:1], dtype=torch.float32)
    return h.new_empty(h.shape), h.new_empty(h.shape), stat, stat.new_empty(stat.shape)


@torch.library.custom_op("omniace::editnet_inject_backward", mutates_args=())
def editnet_inject_backward_op(dh_out: Tensor, dy: Tensor, h_out: Tensor, ctrl: Tensor, scale: Tensor,
                               gate: Tensor, cu_seqlens: Tensor, mean: Tensor, rstd: Tensor,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernel(backend, "inject_bwd")(dh_out, dy, h_out, ctrl, scale, gate, cu_seqlens, mean, rstd)


@editnet_inject_backward_op.register_fake
def _(dh_out, dy, h_out, ctrl, scale, gate, cu_seqlens, mean, rstd, backend):
    return (h_out.new_empty(h_out.shape), ctrl.new_empty(ctrl.shape), scale.new_empty(scale.shape),
            scale.new_empty(scale.shape), gate.new_empty(gate.shape))


def _inject_setup(ctx, inputs, output):
    _, ctrl, _, scale, gate, cu, _, ctx.backend = inputs
    h_out, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h_out, ctrl, scale, gate, cu, mean, rstd)


def _inject_grad(ctx, dh_out, dy, d_mean, d_rstd):
    h_out, ctrl, scale, gate, cu, mean, rstd = ctx.saved_tensors
    dh, dctrl, dshift, dscale, dgate = editnet_inject_backward_op(
        dh_out, dy, h_out, ctrl, scale, gate, cu, mean, rstd, ctx.backend)
    return dh, dctrl, dshift, dscale, dgate, None, None, None


editnet_inject_op.register_autograd(_inject_grad, setup_context=_inject_setup)
