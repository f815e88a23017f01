"""Triton 3D RoPE: one launch rotates q and k; angles are formed in registers from ``pos``.

Each program owns ``BLOCK_L`` tokens and a group of heads of q and k together. It computes the
``(token, pair)`` angles once (position x inverse frequency; the frequencies are a ``[P]`` fp32 vector,
not a cos/sin table) and reuses them for every head it rotates, so HBM traffic is one read and one
write of q and k. The backward pass is the same kernel rotating by the opposite angle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import rope3d_inv_freq
from .triton_attention import row_align
from .triton_utils import next_pow2, unit_last_stride


@triton.jit
def _rotate_one_head(src, dst, s_l, s_h, d_l, d_h, head, rows, row_ok, cos, sin, P: tl.constexpr, D: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HAS_REST: tl.constexpr):
    base = src + rows[:, None] * s_l + head * s_h
    obase = dst + rows[:, None] * d_l + head * d_h
    # The pairs (x0, x1) are interleaved: one contiguous load of the 2P rotated dims (vector loads once
    # the rows are proven 16-byte aligned), split into the two halves of each pair in registers.
    col = tl.arange(0, 2 * BLOCK_P)
    m = row_ok[:, None] & (col < 2 * P)[None, :]
    x = tl.load(base + col[None, :], mask=m, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_P, 2)))
    out = tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos)
    tl.store(obase + col[None, :], tl.reshape(out, (BLOCK_L, 2 * BLOCK_P)).to(dst.dtype.element_ty), mask=m)
    if HAS_REST:  # dims past sum(axes_dims) are copied unchanged
        rest = 2 * P + tl.arange(0, BLOCK_R)
        mr = row_ok[:, None] & (rest[None, :] < D)
        tl.store(obase + rest[None, :], tl.load(base + rest[None, :], mask=mr), mask=mr)


@triton.jit
def _rope3d_kernel(
    q, k, qo, ko, pos, inv_freq,
    L, H, HK,
    s_ql, s_qh, s_kl, s_kh, s_pl,
    SIGN: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_REST: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
):
    # q/k row and head strides arrive in units of ALIGN elements (``row_align``): the product proves
    # 16-byte aligned rows to the compiler, which a stride such as 72 alone does not (see triton_attention)
    s_ql, s_qh, s_kl, s_kh = s_ql * ALIGN, s_qh * ALIGN, s_kl * ALIGN, s_kh * ALIGN
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    pair = tl.arange(0, BLOCK_P)
    pair_ok = pair < P
    # pair j belongs to axis 0 (frame), 1 (row) or 2 (col) by its index range
    axis = (pair >= P0).to(tl.int32) + (pair >= P0 + P1).to(tl.int32)
    p_ptr = pos + rows[:, None].to(tl.int64) * s_pl + axis[None, :]
    p = tl.load(p_ptr, mask=row_ok[:, None] & pair_ok[None, :], other=0).to(tl.float32)
    angle = p * tl.load(inv_freq + pair, mask=pair_ok, other=0.0)[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle) * SIGN
    rows64 = rows.to(tl.int64)
    h0 = tl.program_id(1) * HEADS_PER_PROG
    for i in range(HEADS_PER_PROG):
        h = h0 + i
        if h < H:
            _rotate_one_head(q, qo, s_ql, s_qh, H * D, D, h, rows64, row_ok, cos, sin,
                             P, D, BLOCK_L, BLOCK_P, BLOCK_R, HAS_REST)
        elif h < H + HK:
            _rotate_one_head(k, ko, s_kl, s_kh, HK * D, D, h - H, rows64, row_ok, cos, sin,
                             P, D, BLOCK_L, BLOCK_P, BLOCK_R, HAS_REST)


def rope_meta(axes_dims: tuple[int, int, int], D: int, H: int, HK: int, inverse: bool, align: int = 1) -> dict:
    """Compile-time parameters and launch options of the kernel (shared with ``triton_aot``).

    ``align``: ``ALIGN``, which must divide every q/k row and head stride (``row_align``); the launch passes
    those strides divided by it.
    """
    P = sum(axes_dims) // 2
    rest = D - 2 * P
    return dict(SIGN=-1.0 if inverse else 1.0, P0=axes_dims[0] // 2, P1=axes_dims[1] // 2, P=P, D=D, ALIGN=align,
                BLOCK_L=16, BLOCK_P=max(2, next_pow2(P)), BLOCK_R=max(2, next_pow2(rest)), HAS_REST=rest > 0,
                HEADS_PER_PROG=min(4, H + HK), num_warps=4)


def rope3d_rotate(q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int], theta: float,
                  inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate (or, with ``inverse``, un-rotate) q ``[L, H, D]`` and k ``[L, Hk, D]``; outputs are contiguous.

    Inputs may be strided views (e.g. ``qkv.unbind``) as long as the head dim is contiguous.
    """
    q, k = unit_last_stride(q), unit_last_stride(k)
    pos = pos.contiguous()
    L, H, D = q.shape
    HK = k.shape[1]
    qo = torch.empty((L, H, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((L, HK, D), dtype=k.dtype, device=k.device)
    if L == 0:
        return qo, ko
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    align = row_align(q.dtype, strides)
    meta = rope_meta(axes_dims, D, H, HK, inverse, align)
    grid = (triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(H + HK, meta["HEADS_PER_PROG"]))
    _rope3d_kernel[grid](
        q, k, qo, ko, pos, rope3d_inv_freq(tuple(axes_dims), float(theta), q.device),
        L, H, HK, *(s // align for s in strides), pos.stride(0), **meta,
    )
    return qo, ko


def rope3d_forward(q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                   theta: float) -> tuple[Tensor, Tensor]:
    return rope3d_rotate(q, k, pos, axes_dims, theta)


def rope3d_backward(dq: Tensor, dk: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                    theta: float) -> tuple[Tensor, Tensor]:
    """The gradient of a rotation is the inverse rotation of the incoming gradient."""
    return rope3d_rotate(dq, dk, pos, axes_dims, theta, inverse=True)
