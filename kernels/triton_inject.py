"""Triton ``editnet_inject``: gated residual + LayerNorm + adaLN in one pass over the rows.

Forward: one program per row reads ``h`` and ``ctrl`` once and writes ``h_out`` and ``y`` once; the
row's segment (which picks its shift/scale/gate) is found in-kernel by counting ``cu_seqlens`` bounds,
so no per-row index tensor is materialised. The per-row mean and 1/std are saved for backward.

Backward: each program walks a run of consecutive rows. Per-row gradients are written directly; the
per-segment sums (d shift, d scale, d gate) are accumulated in registers while the segment stays the
same and flushed with one fp32 atomic add per segment boundary, so the atomics are O(programs x C),
not O(rows x C).
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
def _flush(d_shift, d_scale, d_gate, seg, cols, cm, a_shift, a_scale, a_gate, C):
    off = seg.to(tl.int64) * C + cols
    tl.atomic_add(d_shift + off, a_shift, mask=cm)
    tl.atomic_add(d_scale + off, a_scale, mask=cm)
    tl.atomic_add(d_gate + off, a_gate, mask=cm)


@triton.jit
def _inject_bwd_kernel(dh_out, dy, h_out, ctrl, scale, gate, cu, mean, rstd,
                       dh, dctrl, d_shift, d_scale, d_gate,
                       L, C, S, s_c, s_dho, s_dy,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    r0 = tl.program_id(0) * ROWS
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
            if seg != cur:  # crossed a segment boundary: hand the partial sums over
                _flush(d_shift, d_scale, d_gate, cur, cols, cm, a_shift, a_scale, a_gate, C)
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
    _flush(d_shift, d_scale, d_gate, cur, cols, cm, a_shift, a_scale, a_gate, C)


def forward_meta(C: int, S: int) -> dict:
    """Compile-time parameters and launch options of the forward kernel (shared with ``triton_aot``)."""
    block_c = max(16, next_pow2(C))
    return dict(BLOCK_C=block_c, BLOCK_S=max(2, next_pow2(S)), num_warps=min(16, max(1, block_c // 256)))


def backward_meta(C: int, S: int, L: int, interpret: bool | None = None) -> dict:
    if interpreting() if interpret is None else interpret:
        rows = 8  # several rows per program, so tests cross segment boundaries inside one
    else:  # long runs amortise the flushes; keep >= 2 programs per SM (132 on an H100)
        rows = 32 if L >= 32 * 264 else max(1, triton.cdiv(L, 264))
    return dict(ROWS=rows, **forward_meta(C, S))


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
    sums = [torch.zeros((S, C), dtype=torch.float32, device=h_out.device) for _ in range(3)]  # separate: no aliasing
    if L:
        meta = backward_meta(C, S, L)
        _inject_bwd_kernel[(triton.cdiv(L, meta["ROWS"]),)](
            dh_out, dy, h_out, ctrl, scale, gate, cu, mean, rstd, dh, dctrl, sums[0], sums[1], sums[2],
            L, C, S, ctrl.stride(0), dh_out.stride(0), dy.stride(0), **meta)
    mod = scale.dtype
    return dh, dctrl, sums[0].to(mod), sums[1].to(mod), sums[2].to(mod)
