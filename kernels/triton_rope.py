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
from .triton_utils import next_pow2, unit_last_stride


@triton.jit
def _rotate_one_head(src, dst, s_l, s_h, d_l, d_h, head, rows, row_ok, cos, sin, pair, pair_ok,
                     P: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_REST: tl.constexpr):
    base = src + rows[:, None] * s_l + head * s_h
    obase = dst + rows[:, None] * d_l + head * d_h
    m = row_ok[:, None] & pair_ok[None, :]
    x0 = tl.load(base + 2 * pair[None, :], mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(base + 2 * pair[None, :] + 1, mask=m, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(obase + 2 * pair[None, :], (x0 * cos - x1 * sin).to(out_ty), mask=m)
    tl.store(obase + 2 * pair[None, :] + 1, (x0 * sin + x1 * cos).to(out_ty), mask=m)
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
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HAS_REST: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr,
):
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
            _rotate_one_head(q, qo, s_ql, s_qh, H * D, D, h, rows64, row_ok, cos, sin, pair, pair_ok,
                             P, D, BLOCK_R, HAS_REST)
        elif h < H + HK:
            _rotate_one_head(k, ko, s_kl, s_kh, HK * D, D, h - H, rows64, row_ok, cos, sin, pair, pair_ok,
                             P, D, BLOCK_R, HAS_REST)


def rope_meta(axes_dims: tuple[int, int, int], D: int, H: int, HK: int, inverse: bool) -> dict:
    """Compile-time parameters and launch options of the kernel (shared with ``triton_aot``)."""
    P = sum(axes_dims) // 2
    rest = D - 2 * P
    return dict(SIGN=-1.0 if inverse else 1.0, P0=axes_dims[0] // 2, P1=axes_dims[1] // 2, P=P, D=D,
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
    meta = rope_meta(axes_dims, D, H, HK, inverse)
    grid = (triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(H + HK, meta["HEADS_PER_PROG"]))
    _rope3d_kernel[grid](
        q, k, qo, ko, pos, rope3d_inv_freq(tuple(axes_dims), float(theta), q.device),
        L, H, HK, q.stride(0), q.stride(1), k.stride(0), k.stride(1), pos.stride(0), **meta,
    )
    return qo, ko


def rope3d_forward(q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                   theta: float) -> tuple[Tensor, Tensor]:
    return rope3d_rotate(q, k, pos, axes_dims, theta)


def rope3d_backward(dq: Tensor, dk: Tensor, pos: Tensor, axes_dims: tuple[int, int, int],
                    theta: float) -> tuple[Tensor, Tensor]:
    """The gradient of a rotation is the inverse rotation of the incoming gradient."""
    return rope3d_rotate(dq, dk, pos, axes_dims, theta, inverse=True)
