"""Triton ``editnet_inject``: gated residual + LayerNorm + adaLN in one pass over the rows.

Forward: one program per row reads ``h`` and ``ctrl`` once and writes ``h_out`` and ``y`` once; the
row's segment (which picks its shift/scale/gate) is found in-kernel by counting ``cu_seqlens`` bounds,
so no per-row index tensor is materialised. The per-row mean and 1/std are saved for backward.

Backward, deterministic (no atomics, so two runs are bit-identical, which bit-exact resume needs), in
two passes as Liger's LayerNorm backward reduces its weight gradients:
1. each program walks a run of ``ROWS`` consecutive rows, writes the per-row gradients directly and
   accumulates the per-segment sums (d shift, d scale, d gate) in fp32 registers while the segment stays
   the same; at each segment change it stores the partial sums to slot ``program + segment`` of three
   ``[programs + S, C]`` fp32 buffers. That slot is unique: along the rows both the program and the
   segment index only grow, so two different (program, segment) pairs that share a row never sum equal.
2. one program per (segment, column tile) adds the partials of the row programs the segment overlaps
   (``cu[s] // ROWS .. (cu[s+1] - 1) // ROWS``) in program order and writes the sums in the
   modulation dtype; an empty segment gets zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_utils import interpreting, next_pow2, unit_last_stride


@triton.jit
def _segment_of(cu, row, S, BLOCK_S: tl.constexpr):
    """Index of the segment holding ``row``: how many segment ends ``cu[1..S]`` are <= row."""
    idx = tl.arange(0, BLOCK_S)
    ends = tl.load(cu + 1 + idx, mask=idx < S, other=2147483647)
    return tl.sum((ends <= row).to(tl.int32), axis=0)


@triton.jit
def _inject_fwd_kernel(h, ctrl, shift, scale, gate, cu, h_out, y, mean_out, rstd_out,
                       C, S, eps, s_h, s_c,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    seg = _segment_of(cu, row, S, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    r64 = row.to(tl.int64)
    mod = seg.to(tl.int64) * C + cols
    x = tl.load(h + r64 * s_h + cols, mask=cm, other=0.0).to(tl.float32)
    c = tl.load(ctrl + r64 * s_c + cols, mask=cm, other=0.0).to(tl.float32)
    g = tl.load(gate + mod, mask=cm, other=0.0).to(tl.float32)
    ho = (x + g * c).to(h_out.dtype.element_ty)
    tl.store(h_out + r64 * C + cols, ho, mask=cm)
    xo = ho.to(tl.float32)  # normalise the stored (rounded) residual, as the reference does
    mean = tl.sum(xo, axis=0) / C
    diff = tl.where(cm, xo - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    sc = tl.load(scale + mod, mask=cm, other=0.0).to(tl.float32)
    sh = tl.load(shift + mod, mask=cm, other=0.0).to(tl.float32)
    tl.store(y + r64 * C + cols, (diff * rstd * (1.0 + sc) + sh).to(y.dtype.element_ty), mask=cm)
    tl.store(mean_out + row, mean)
    tl.store(rstd_out + row, rstd)


@triton.jit
def _store_partial(d_shift, d_scale, d_gate, slot, cols, cm, a_shift, a_scale, a_gate, C):
    off = slot.to(tl.int64) * C + cols
    tl.store(d_shift + off, a_shift, mask=cm)
    tl.store(d_scale + off, a_scale, mask=cm)
    tl.store(d_gate + off, a_gate, mask=cm)


@triton.jit
def _inject_bwd_kernel(dh_out, dy, h_out, ctrl, scale, gate, cu, mean, rstd,
                       dh, dctrl, d_shift, d_scale, d_gate,
                       L, C, S, s_c, s_dho, s_dy,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 1; ``d_shift``/``d_scale``/``d_gate`` are the fp32 partial-sum buffers ``[programs + S, C]``."""
    pid = tl.program_id(0)
    r0 = pid * ROWS
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    cur = _segment_of(cu, r0, S, BLOCK_S)
    a_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS):
        row = r0 + i
        if row < L:
            seg = _segment_of(cu, row, S, BLOCK_S)
            if seg != cur:  # crossed a segment boundary: the finished segment's partial goes to its slot
                _store_partial(d_shift, d_scale, d_gate, pid + cur, cols, cm, a_shift, a_scale, a_gate, C)
                a_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
                a_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
                a_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
                cur = seg
            r64 = row.to(tl.int64)
            mod = seg.to(tl.int64) * C + cols
            xo = tl.load(h_out + r64 * C + cols, mask=cm, other=0.0).to(tl.float32)
            n = tl.where(cm, (xo - tl.load(mean + row)) * tl.load(rstd + row), 0.0)
            g_y = tl.load(dy + r64 * s_dy + cols, mask=cm, other=0.0).to(tl.float32)
            sc = tl.load(scale + mod, mask=cm, other=0.0).to(tl.float32)
            dn = g_y * (1.0 + sc)
            dx = tl.load(rstd + row) * (dn - tl.sum(dn, axis=0) / C - n * (tl.sum(dn * n, axis=0) / C))
            dx = tl.where(cm, dx + tl.load(dh_out + r64 * s_dho + cols, mask=cm, other=0.0).to(tl.float32), 0.0)
            c = tl.load(ctrl + r64 * s_c + cols, mask=cm, other=0.0).to(tl.float32)
            g = tl.load(gate + mod, mask=cm, other=0.0).to(tl.float32)
            tl.store(dh + r64 * C + cols, dx.to(dh.dtype.element_ty), mask=cm)
            tl.store(dctrl + r64 * C + cols, (dx * g).to(dctrl.dtype.element_ty), mask=cm)
            a_shift += g_y
            a_scale += g_y * n
            a_gate += dx * c
    _store_partial(d_shift, d_scale, d_gate, pid + cur, cols, cm, a_shift, a_scale, a_gate, C)


@triton.jit
def _inject_reduce_kernel(p_shift, p_scale, p_gate, cu, d_shift, d_scale, d_gate, C,
                          ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second pass: segment ``s`` sums the partials of the row programs it overlaps, in program order."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    start = tl.load(cu + s)
    end = tl.load(cu + s + 1)
    p_first = start // ROWS
    p_last = tl.where(end > start, (end - 1) // ROWS, p_first - 1)  # an empty segment sums nothing: zeros
    a_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p in range(p_first, p_last + 1):
        off = (p + s).to(tl.int64) * C + cols
        a_shift += tl.load(p_shift + off, mask=cm, other=0.0)
        a_scale += tl.load(p_scale + off, mask=cm, other=0.0)
        a_gate += tl.load(p_gate + off, mask=cm, other=0.0)
    out = s.to(tl.int64) * C + cols
    tl.store(d_shift + out, a_shift.to(d_shift.dtype.element_ty), mask=cm)
    tl.store(d_scale + out, a_scale.to(d_scale.dtype.element_ty), mask=cm)
    tl.store(d_gate + out, a_gate.to(d_gate.dtype.element_ty), mask=cm)


def forward_meta(C: int, S: int) -> dict:
    """Compile-time parameters and launch options of the forward kernel (shared with ``triton_aot``)."""
    block_c = max(16, next_pow2(C))
    return dict(BLOCK_C=block_c, BLOCK_S=max(2, next_pow2(S)), num_warps=min(16, max(1, block_c // 256)))


def backward_meta(C: int, S: int, L: int, interpret: bool | None = None) -> dict:
    if interpreting() if interpret is None else interpret:
        rows = 8  # several rows per program, so tests cross segment boundaries inside one
    else:  # long runs keep the partial buffer small; keep >= 2 programs per SM (132 on an H100)
        rows = 32 if L >= 32 * 264 else max(1, triton.cdiv(L, 264))
    return dict(ROWS=rows, **forward_meta(C, S))


def reduce_meta(C: int, interpret: bool | None = None) -> dict:
    """Column tile of the second (reduction) pass: several tiles per segment, since segments are few."""
    widest = 16 if (interpreting() if interpret is None else interpret) else 256  # tests: several tiles
    return dict(BLOCK_C=min(widest, max(16, next_pow2(C))), num_warps=2)


def inject_forward(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu: Tensor,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(h_out, y, mean [L] fp32, rstd [L] fp32)``."""
    h, ctrl = unit_last_stride(h), unit_last_stride(ctrl)
    shift, scale, gate = shift.contiguous(), scale.contiguous(), gate.contiguous()
    L, C = h.shape
    S = cu.numel() - 1
    h_out, y = torch.empty((L, C), dtype=h.dtype, device=h.device), torch.empty((L, C), dtype=h.dtype, device=h.device)
    mean = torch.empty(L, dtype=torch.float32, device=h.device)
    rstd = torch.empty(L, dtype=torch.float32, device=h.device)
    if L:
        _inject_fwd_kernel[(L,)](h, ctrl, shift, scale, gate, cu, h_out, y, mean, rstd, C, S, float(eps),
                                 h.stride(0), ctrl.stride(0), **forward_meta(C, S))
    return h_out, y, mean, rstd


def inject_backward(dh_out: Tensor, dy: Tensor, h_out: Tensor, ctrl: Tensor, scale: Tensor, gate: Tensor,
                    cu: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(d h, d ctrl, d shift, d scale, d gate)``; the last three in the modulation dtype."""
    dh_out, dy, ctrl = (unit_last_stride(x) for x in (dh_out, dy, ctrl))
    scale, gate = scale.contiguous(), gate.contiguous()
    L, C = h_out.shape
    S = cu.numel() - 1
    dh = torch.empty((L, C), dtype=h_out.dtype, device=h_out.device)
    dctrl = torch.empty((L, C), dtype=ctrl.dtype, device=ctrl.device)
    mod = scale.dtype
    d_shift, d_scale, d_gate = (torch.empty((S, C), dtype=mod, device=h_out.device) for _ in range(3))
    meta = backward_meta(C, S, L)
    programs = triton.cdiv(L, meta["ROWS"])
    # slot p + s holds program p's partial sums for segment s: distinct for every (program, segment) pair
    # that shares a row, since both indices only grow along the rows; every written slot is read once
    parts = [torch.empty((programs + S, C), dtype=torch.float32, device=h_out.device) for _ in range(3)]
    if L:
        _inject_bwd_kernel[(programs,)](
            dh_out, dy, h_out, ctrl, scale, gate, cu, mean, rstd, dh, dctrl, *parts,
            L, C, S, ctrl.stride(0), dh_out.stride(0), dy.stride(0), **meta)
    if S:  # also when L == 0: every segment is empty and its sums are zeros
        rmeta = reduce_meta(C)
        _inject_reduce_kernel[(S, triton.cdiv(C, rmeta["BLOCK_C"]))](
            *parts, cu, d_shift, d_scale, d_gate, C, ROWS=meta["ROWS"], **rmeta)
    return dh, dctrl, d_shift, d_scale, d_gate
