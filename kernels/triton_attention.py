"""Triton varlen block-diagonal attention (FlashAttention-2 style), forward and backward.

Grid ``(query blocks, segments, heads)``: a program reads its segment's offsets from ``cu_seqlens`` and
walks only that segment's key blocks, so no FLOP is spent outside the block diagonal; programs past
the end of a short segment exit at once. Softmax is online in base 2 with fp32 statistics, and the
forward saves the natural-log ``lse [Lq, H]`` so the backward recomputes probabilities instead of
storing them.

Head dims that are not a power of two are tiled as two power-of-two parts (72 = 64 + 16, see
``split_head_dim``): every contraction over the head dim is two ``tl.dot``s, which for 72 wastes 10% of
the tensor-core work instead of the 44% a 128-wide padded tile would.

Short-key path (``ONE_KV``): when every key segment fits in one ``BLOCK_N`` tile (per-CU cross-attention:
a few dozen text tokens against thousands of image tokens), a program loads its segment's whole K/V once
and reuses it for ``Q_BLOCKS`` query blocks with a plain (not online) softmax.

Every loop over the other side's blocks runs the blocks that lie wholly inside the segment without a
mask (loads, scores) and only the segment's last, partial block with one (``MASK`` constexpr).

Backward, split in two kernels so that it stays deterministic (no atomics: bit-identical resume):
the dQ kernel (one program per query block) first computes ``delta = rowsum(dO * O)`` for its rows and
writes it, then recomputes S = QK^T and dP = dO V^T per key block and accumulates dQ = dS K (3 GEMMs);
the dK/dV kernel (one program per key block, launched after it) recomputes S^T and dP^T per query block
and accumulates dV = P^T dO and dK = dS^T Q (4 GEMMs). That is 7 GEMMs per (query block, key block)
pair against FlashAttention-2's 5, whose single pass adds dQ with fp32 atomics in a run-dependent
order. With a split head dim every GEMM that contracts over or produces the head dim is two ``tl.dot``.

Alignment: row/head strides are passed in units of ``ALIGN`` elements (``row_align``), so head dims
such as 72 get 16-byte vector loads and ``cp.async`` like 64 does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_tuning as tuning
from .triton_utils import interpreting, next_pow2, split_head_dim, unit_last_stride

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(p, cols, row_ok, D: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """``p [R, 1]`` row pointers plus ``cols [C]``; masks only what can be out of bounds (``constexpr``)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(p + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
        else:
            x = tl.load(p + cols[None, :], mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(p + cols[None, :], mask=cols[None, :] < D, other=0.0)
        else:
            x = tl.load(p + cols[None, :])
    return x


@triton.jit
def _load_rows(base, stride, rows, row_ok, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               HAS_D1: tl.constexpr, MASK_ROWS: tl.constexpr = True):
    """Rows ``[R, D]`` of a ``[*, D]`` head slice as two column tiles ``[R, D0]`` and ``[R, D1]``.

    ``MASK_ROWS=False`` for blocks known to lie inside the segment (the mask-free interior).
    """
    p = base + rows[:, None].to(tl.int64) * stride
    x0 = _load_tile(p, tl.arange(0, D0), row_ok, D, MASK_ROWS, D0 > D)
    if HAS_D1:
        x1 = _load_tile(p, D0 + tl.arange(0, D1), row_ok, D, MASK_ROWS, D0 + D1 > D)
    else:
        x1 = tl.zeros([rows.shape[0], D1], dtype=x0.dtype)
    return x0, x1


@triton.jit
def _store_rows(base, stride, rows, row_ok, x0, x1, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                HAS_D1: tl.constexpr):
    c0 = tl.arange(0, D0)
    p = base + rows[:, None].to(tl.int64) * stride
    tl.store(p + c0[None, :], x0.to(base.dtype.element_ty), mask=row_ok[:, None] & (c0[None, :] < D))
    if HAS_D1:
        c1 = D0 + tl.arange(0, D1)
        tl.store(p + c1[None, :], x1.to(base.dtype.element_ty), mask=row_ok[:, None] & (c1[None, :] < D))


@triton.jit
def _dot_qk(a0, a1, b0, b1, HAS_D1: tl.constexpr, PREC: tl.constexpr):
    """``a @ b.T`` contracted over the (split) head dim: ``[R, D] x [C, D] -> [R, C]`` in fp32."""
    s = tl.dot(a0, tl.trans(b0), input_precision=PREC)
    if HAS_D1:
        s += tl.dot(a1, tl.trans(b1), input_precision=PREC)
    return s


@triton.jit
def _dot_qk_chunked(A, s_a, rows, r_ok, B, s_b, cols, c_ok, D: tl.constexpr, PREC: tl.constexpr,
                    MASK_A: tl.constexpr, MASK_B: tl.constexpr, CHUNK: tl.constexpr = 16):
    """``a @ b.T`` like ``_dot_qk``, reading ``CHUNK`` head-dim columns of both from memory at a time.

    For exact fp32 (CUDA-core) dots: the operands' register copies then stay ``CHUNK`` wide instead of the
    whole head dim live across the loop, which spilled; the reloads hit L1/L2.
    """
    pa = A + rows[:, None].to(tl.int64) * s_a
    pb = B + cols[:, None].to(tl.int64) * s_b
    s = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for c0 in tl.static_range(0, D, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        a = _load_tile(pa, c, r_ok, D, MASK_A, c0 + CHUNK > D)
        b = _load_tile(pb, c, c_ok, D, MASK_B, c0 + CHUNK > D)
        s += tl.dot(a, tl.trans(b), input_precision=PREC)
    return s


@triton.jit
def _seg_bounds(cu_q, cu_k, seg):
    q0 = tl.load(cu_q + seg)
    k0 = tl.load(cu_k + seg)
    return q0, tl.load(cu_q + seg + 1) - q0, k0, tl.load(cu_k + seg + 1) - k0


@triton.jit
def _natural_lse(m, l):
    """Natural-log logsumexp from the base-2 running max ``m`` and sum ``l``; -inf where no key was seen."""
    return tl.where(l == 0.0, float("-inf"), (m + tl.log2(tl.where(l == 0.0, 1.0, l))) * 0.6931471805599453)


@triton.jit
def _fwd_kv_block(q0, q1, acc0, acc1, m_i, l_i, Kh, Vh, s_km, s_vm, cols, len_k, qk_scale,
                  D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr,
                  MASK: tl.constexpr):
    """One online-softmax step over key block ``cols``; ``MASK`` only for the segment's last, partial block."""
    n_ok = cols < len_k
    k0, k1 = _load_rows(Kh, s_km, cols, n_ok, D, D0, D1, HAS_D1, MASK)
    v0, v1 = _load_rows(Vh, s_vm, cols, n_ok, D, D0, D1, HAS_D1, MASK)
    s = _dot_qk(q0, q1, k0, k1, HAS_D1, PREC) * qk_scale
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key block has a valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = p.to(v0.dtype)
    acc0 = acc0 * alpha[:, None] + tl.dot(pv, v0, input_precision=PREC)
    if HAS_D1:
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=PREC)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, cu_q, cu_k, qk_scale,
    s_qm, s_qh, s_km, s_kh, s_vm, s_vh, s_om, s_oh, s_lm,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCKS: tl.constexpr,
    ONE_KV: tl.constexpr,
):
    # Row/head strides arrive in units of ALIGN elements: the product proves 16-byte aligned rows to the
    # compiler (vector loads, cp.async) even for head dims such as 72 that the JIT cannot specialise on.
    s_qm, s_qh, s_km, s_kh = s_qm * ALIGN, s_qh * ALIGN, s_km * ALIGN, s_kh * ALIGN
    s_vm, s_vh = s_vm * ALIGN, s_vh * ALIGN
    s_om, s_oh = s_om * ALIGN, s_oh * ALIGN
    seg, head = tl.program_id(1), tl.program_id(2)
    q_start, len_q, k_start, len_k = _seg_bounds(cu_q, cu_k, seg)
    m_first = tl.program_id(0) * BLOCK_M * Q_BLOCKS
    if m_first < len_q:
        qo, ko = q_start.to(tl.int64), k_start.to(tl.int64)
        Qh, Oh, Lh = Q + head * s_qh + qo * s_qm, O + head * s_oh + qo * s_om, LSE + head + qo * s_lm
        Kh, Vh = K + head * s_kh + ko * s_km, V + head * s_vh + ko * s_vm
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        if ONE_KV:  # the whole key segment is one tile: stage K/V once, reuse for Q_BLOCKS query blocks
            n_ok = offs_n < len_k
            k0, k1 = _load_rows(Kh, s_km, offs_n, n_ok, D, D0, D1, HAS_D1)
            v0, v1 = _load_rows(Vh, s_vm, offs_n, n_ok, D, D0, D1, HAS_D1)
            for b in range(Q_BLOCKS):
                rows = m_first + b * BLOCK_M + offs_m
                r_ok = rows < len_q
                q0, q1 = _load_rows(Qh, s_qm, rows, r_ok, D, D0, D1, HAS_D1)
                s = _dot_qk(q0, q1, k0, k1, HAS_D1, PREC) * qk_scale
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m = tl.max(s, axis=1)
                m = tl.where(m == float("-inf"), 0.0, m)  # empty key segment: all probabilities 0
                p = tl.exp2(s - m[:, None])
                l = tl.sum(p, axis=1)
                inv = 1.0 / tl.where(l == 0.0, 1.0, l)
                pv = p.to(v0.dtype)
                o0 = tl.dot(pv, v0, input_precision=PREC) * inv[:, None]
                if HAS_D1:
                    o1 = tl.dot(pv, v1, input_precision=PREC) * inv[:, None]
                else:
                    o1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
                _store_rows(Oh, s_om, rows, r_ok, o0, o1, D, D0, D1, HAS_D1)
                tl.store(Lh + rows.to(tl.int64) * s_lm, _natural_lse(m, l), mask=r_ok)
        else:
            rows = m_first + offs_m
            r_ok = rows < len_q
            q0, q1 = _load_rows(Qh, s_qm, rows, r_ok, D, D0, D1, HAS_D1)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
            acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
            full_k = len_k - len_k % BLOCK_N
            for n_start in range(0, full_k, BLOCK_N):  # interior: no masks
                acc0, acc1, m_i, l_i = _fwd_kv_block(q0, q1, acc0, acc1, m_i, l_i, Kh, Vh, s_km, s_vm,
                                                     n_start + offs_n, len_k, qk_scale, D, D0, D1, HAS_D1, PREC,
                                                     False)
            if full_k < len_k:  # the partial last block
                acc0, acc1, m_i, l_i = _fwd_kv_block(q0, q1, acc0, acc1, m_i, l_i, Kh, Vh, s_km, s_vm,
                                                     full_k + offs_n, len_k, qk_scale, D, D0, D1, HAS_D1, PREC,
                                                     True)
            inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
            _store_rows(Oh, s_om, rows, r_ok, acc0 * inv[:, None], acc1 * inv[:, None], D, D0, D1, HAS_D1)
            tl.store(Lh + rows.to(tl.int64) * s_lm, _natural_lse(m_i, l_i), mask=r_ok)


@triton.jit
def _dkdv_q_block(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Kr, Vr, s_km, s_vm, cols, n_ok, Qh, DOh, Lh, Dh, s_qm, s_dom,
                  s_lm, rows, len_q, qk_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  HAS_D1: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """dK/dV contributions of query block ``rows`` (4 GEMMs: S^T, dV, dP^T, dK).

    No select on the scores: a query row past the segment loads q = dO = lse = delta = 0 and so adds
    exactly 0, and a key row past the segment only feeds its own dK/dV row, which is never stored.
    Exact fp32 contracts S^T and dP^T in head-dim chunks read from memory (``Kr``/``Vr`` at ``cols``), as
    ``_dq_kv_block`` does, rather than from the resident ``k``/``v`` tiles.
    """
    r_ok = rows < len_q
    q0, q1 = _load_rows(Qh, s_qm, rows, r_ok, D, D0, D1, HAS_D1, MASK)
    do0, do1 = _load_rows(DOh, s_dom, rows, r_ok, D, D0, D1, HAS_D1, MASK)
    if MASK:
        lse = tl.load(Lh + rows.to(tl.int64) * s_lm, mask=r_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Dh + rows.to(tl.int64) * s_lm, mask=r_ok, other=0.0)
    else:
        lse = tl.load(Lh + rows.to(tl.int64) * s_lm) * 1.4426950408889634
        delta = tl.load(Dh + rows.to(tl.int64) * s_lm)
    if PREC == "ieee":
        sT = _dot_qk_chunked(Kr, s_km, cols, n_ok, Qh, s_qm, rows, r_ok, D, PREC, True, MASK)
    else:
        sT = _dot_qk(k0, k1, q0, q1, HAS_D1, PREC)  # [BLOCK_N, BLOCK_M]
    pT = tl.exp2(sT * qk_scale - lse[None, :])
    dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=PREC)
    if HAS_D1:
        dv1 += tl.dot(pT.to(do0.dtype), do1, input_precision=PREC)
    if PREC == "ieee":
        dpT = _dot_qk_chunked(Vr, s_vm, cols, n_ok, DOh, s_dom, rows, r_ok, D, PREC, True, MASK)
    else:
        dpT = _dot_qk(v0, v1, do0, do1, HAS_D1, PREC)
    dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
    dk0 += tl.dot(dsT, q0, input_precision=PREC)
    if HAS_D1:
        dk1 += tl.dot(dsT, q1, input_precision=PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k, qk_scale, scale,
    s_qm, s_qh, s_km, s_kh, s_vm, s_vh, s_dom, s_doh, s_lm, s_dkm, s_dkh,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s_qm, s_qh, s_km, s_kh = s_qm * ALIGN, s_qh * ALIGN, s_km * ALIGN, s_kh * ALIGN
    s_vm, s_vh = s_vm * ALIGN, s_vh * ALIGN
    s_dom, s_doh, s_dkm, s_dkh = s_dom * ALIGN, s_doh * ALIGN, s_dkm * ALIGN, s_dkh * ALIGN
    seg, head = tl.program_id(1), tl.program_id(2)
    q_start, len_q, k_start, len_k = _seg_bounds(cu_q, cu_k, seg)
    n_first = tl.program_id(0) * BLOCK_N
    if n_first < len_k:
        qo, ko = q_start.to(tl.int64), k_start.to(tl.int64)
        cols = n_first + tl.arange(0, BLOCK_N)
        n_ok = cols < len_k
        Kr, Vr = K + head * s_kh + ko * s_km, V + head * s_vh + ko * s_vm
        k0, k1 = _load_rows(Kr, s_km, cols, n_ok, D, D0, D1, HAS_D1)
        v0, v1 = _load_rows(Vr, s_vm, cols, n_ok, D, D0, D1, HAS_D1)
        dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        Qh, DOh = Q + head * s_qh + qo * s_qm, DO + head * s_doh + qo * s_dom
        Lh, Dh = LSE + head + qo * s_lm, DELTA + head + qo * s_lm
        offs_m = tl.arange(0, BLOCK_M)
        full_q = len_q - len_q % BLOCK_M
        for m_start in range(0, full_q, BLOCK_M):  # interior: no masks
            dk0, dk1, dv0, dv1 = _dkdv_q_block(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Kr, Vr, s_km, s_vm, cols, n_ok,
                                               Qh, DOh, Lh, Dh, s_qm, s_dom, s_lm, m_start + offs_m, len_q, qk_scale,
                                               D, D0, D1, HAS_D1, PREC, False)
        if full_q < len_q:
            dk0, dk1, dv0, dv1 = _dkdv_q_block(k0, k1, v0, v1, dk0, dk1, dv0, dv1, Kr, Vr, s_km, s_vm, cols, n_ok,
                                               Qh, DOh, Lh, Dh, s_qm, s_dom, s_lm, full_q + offs_m, len_q, qk_scale,
                                               D, D0, D1, HAS_D1, PREC, True)
        _store_rows(DK + head * s_dkh + ko * s_dkm, s_dkm, cols, n_ok, dk0 * scale, dk1 * scale, D, D0, D1, HAS_D1)
        _store_rows(DV + head * s_dkh + ko * s_dkm, s_dkm, cols, n_ok, dv0, dv1, D, D0, D1, HAS_D1)


@triton.jit
def _dq_kv_block(q0, q1, do0, do1, lse, delta, dq0, dq1, Qh, DOh, s_qm, s_dom, rows, r_ok, Kh, Vh, s_km, s_vm,
                 cols, len_k, qk_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                 PREC: tl.constexpr, MASK: tl.constexpr):
    """dQ contribution of key block ``cols`` (3 GEMMs: S, dP, dQ); ``MASK`` only for the last, partial block,
    where a key past the segment must get probability 0 (its score is 0, its exp2 could overflow).

    Exact fp32 contracts S and dP in head-dim chunks read from memory (``Qh``/``DOh`` at ``rows``) rather
    than from the resident ``q``/``dO`` tiles, which then go unused."""
    n_ok = cols < len_k
    k0, k1 = _load_rows(Kh, s_km, cols, n_ok, D, D0, D1, HAS_D1, MASK)
    if PREC == "ieee":
        s = _dot_qk_chunked(Qh, s_qm, rows, r_ok, Kh, s_km, cols, n_ok, D, PREC, True, MASK)
        dp = _dot_qk_chunked(DOh, s_dom, rows, r_ok, Vh, s_vm, cols, n_ok, D, PREC, True, MASK)
    else:
        v0, v1 = _load_rows(Vh, s_vm, cols, n_ok, D, D0, D1, HAS_D1, MASK)
        s = _dot_qk(q0, q1, k0, k1, HAS_D1, PREC)
        dp = _dot_qk(do0, do1, v0, v1, HAS_D1, PREC)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK:
        p = tl.where(n_ok[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 += tl.dot(ds, k0, input_precision=PREC)
    if HAS_D1:
        dq1 += tl.dot(ds, k1, input_precision=PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, cu_q, cu_k, qk_scale, scale,
    s_qm, s_qh, s_km, s_kh, s_vm, s_vh, s_om, s_oh, s_dom, s_doh, s_lm, s_dqm, s_dqh,
    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, and ``delta = rowsum(dO * O)`` for its rows (written to DELTA for the dK/dV kernel, launched after)."""
    s_qm, s_qh, s_km, s_kh = s_qm * ALIGN, s_qh * ALIGN, s_km * ALIGN, s_kh * ALIGN
    s_vm, s_vh = s_vm * ALIGN, s_vh * ALIGN
    s_om, s_oh, s_dom, s_doh = s_om * ALIGN, s_oh * ALIGN, s_dom * ALIGN, s_doh * ALIGN
    s_dqm, s_dqh = s_dqm * ALIGN, s_dqh * ALIGN
    seg, head = tl.program_id(1), tl.program_id(2)
    q_start, len_q, k_start, len_k = _seg_bounds(cu_q, cu_k, seg)
    m_first = tl.program_id(0) * BLOCK_M
    if m_first < len_q:
        qo, ko = q_start.to(tl.int64), k_start.to(tl.int64)
        rows = m_first + tl.arange(0, BLOCK_M)
        r_ok = rows < len_q
        Qr, DOr = Q + head * s_qh + qo * s_qm, DO + head * s_doh + qo * s_dom
        do0, do1 = _load_rows(DOr, s_dom, rows, r_ok, D, D0, D1, HAS_D1)
        o0, o1 = _load_rows(O + head * s_oh + qo * s_om, s_om, rows, r_ok, D, D0, D1, HAS_D1)
        delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), axis=1)
        if HAS_D1:
            delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), axis=1)
        tl.store(DELTA + head + (qo + rows) * s_lm, delta, mask=r_ok)
        q0, q1 = _load_rows(Qr, s_qm, rows, r_ok, D, D0, D1, HAS_D1)
        lse = tl.load(LSE + head + (qo + rows) * s_lm, mask=r_ok, other=0.0) * 1.4426950408889634
        dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        Kh, Vh = K + head * s_kh + ko * s_km, V + head * s_vh + ko * s_vm
        offs_n = tl.arange(0, BLOCK_N)
        full_k = len_k - len_k % BLOCK_N
        for n_start in range(0, full_k, BLOCK_N):  # interior: no masks
            dq0, dq1 = _dq_kv_block(q0, q1, do0, do1, lse, delta, dq0, dq1, Qr, DOr, s_qm, s_dom, rows, r_ok, Kh, Vh,
                                    s_km, s_vm, n_start + offs_n, len_k, qk_scale, D, D0, D1, HAS_D1, PREC, False)
        if full_k < len_k:
            dq0, dq1 = _dq_kv_block(q0, q1, do0, do1, lse, delta, dq0, dq1, Qr, DOr, s_qm, s_dom, rows, r_ok, Kh, Vh,
                                    s_km, s_vm, full_k + offs_n, len_k, qk_scale, D, D0, D1, HAS_D1, PREC, True)
        _store_rows(DQ + head * s_dqh + qo * s_dqm, s_dqm, rows, r_ok, dq0 * scale, dq1 * scale, D, D0, D1, HAS_D1)


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes. ``q_blocks > 1`` only matters on the short-key (``one_kv``) path."""
    block_m: int
    block_n: int
    q_blocks: int = 1
    num_warps: int = 4
    num_stages: int = 2


SHORT_KEYS = 128  # key segments up to this long take the single-tile (cross-attention) path


def _head_tiles(D: int) -> dict:
    d0, d1 = split_head_dim(D)
    return dict(D=D, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would lose ~3 digits); half inputs: native tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_config(D: int, max_q: int, max_k: int, segments: int, heads: int, dtype: torch.dtype = torch.bfloat16,
                   interpret: bool | None = None) -> AttnConfig:
    """Heuristic tiles (hand-picked for Hopper; the interpreter gets small tiles so tests cover many blocks).

    Half precision: 128-row tiles, 4 warps up to head dim 64 and 8 above, no spills at head dims 64, 72
    and 128 (``triton_aot`` checks it). fp32 inputs take 16-row tiles and 8 warps: their exact (non-tf32)
    dots run on CUDA cores and keep a whole head-dim slice per thread, which spills at larger tiles; fp32
    attention is a correctness path, not the fast one.
    """
    if interpreting() if interpret is None else interpret:
        short = max_k <= 32
        return AttnConfig(16, max(16, next_pow2(max_k)) if short else 16, 2 if short else 1, 1, 1)
    fp32 = dtype == torch.float32
    block_m = 16 if fp32 else 128
    warps = 8 if D > 64 or fp32 else 4
    if max_k <= SHORT_KEYS:
        block_n = max(16, next_pow2(max_k))
        programs = segments * heads * triton.cdiv(max(max_q, 1), block_m)
        q_blocks = max(1, min(4, programs // (4 * 132)))  # keep several waves of programs per SM
        if fp32:  # the reuse loop over query blocks spills exact-fp32 dots (1.3-5.5 KB at Q_BLOCKS=4)
            q_blocks = 1
        return AttnConfig(block_m, block_n, q_blocks, num_warps=warps, num_stages=2)
    return AttnConfig(block_m, 32 if fp32 else 64, 1, num_warps=warps, num_stages=2 if fp32 else 3)


def backward_config(D: int, dtype: torch.dtype = torch.bfloat16, interpret: bool | None = None) -> AttnConfig:
    """Heuristic backward tiles (both kernels).

    fp32 (exact dots on CUDA cores, S and dP contracted in 16-wide head-dim chunks): 16 query rows, 32 keys,
    8 warps spill nothing at head dims 64 and 72 and 52 bytes at 128 (``triton_aot``; 32 x 32 spilled 1.3-7 KB).
    """
    if interpreting() if interpret is None else interpret:
        return AttnConfig(16, 16, 1, 1, 1)
    if dtype == torch.float32:
        return AttnConfig(16, 32, 1, num_warps=8, num_stages=1)
    return AttnConfig(64, 64, 1, num_warps=4 if D <= 64 else 8, num_stages=2)


def _one_kv(cfg: AttnConfig, max_k: int) -> bool:
    return max_k <= cfg.block_n


def row_align(dtype: torch.dtype, strides: tuple[int, ...]) -> int:
    """``ALIGN``: the most elements, up to 16 bytes' worth, that divide every row/head stride of a launch.

    The kernels take these strides divided by ``ALIGN`` and multiply back by the ``constexpr``, so Triton
    can prove each row 16-byte aligned (vector loads and ``cp.async``) when the JIT alone cannot: it only
    specialises integers divisible by 16, and a head of 72 elements is 144 bytes (``tl.multiple_of`` on a
    scalar argument is dropped). Odd strides give 1: scalar loads, still correct.
    """
    align = 16 // torch.empty((), dtype=dtype).element_size()
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def _in_units(strides: tuple[int, ...], align: int) -> tuple[int, ...]:
    return tuple(s // align for s in strides)


def forward_meta(dtype: torch.dtype, D: int, cfg: AttnConfig, one_kv: bool, align: int = 1) -> dict:
    """Compile-time parameters and launch options of the forward kernel."""
    return dict(**_head_tiles(D), PREC=_precision(dtype), ALIGN=align, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                Q_BLOCKS=cfg.q_blocks if one_kv else 1, ONE_KV=one_kv,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def backward_meta(dtype: torch.dtype, D: int, cfg: AttnConfig, align: int = 1) -> dict:
    """Compile-time parameters and launch options of both backward kernels."""
    return dict(**_head_tiles(D), PREC=_precision(dtype), ALIGN=align, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_forward(q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, cfg: AttnConfig) -> None:
    S, H, D = cu_q.numel() - 1, q.shape[1], q.shape[2]
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               out.stride(0), out.stride(1))
    align = row_align(q.dtype, strides)
    meta = forward_meta(q.dtype, D, cfg, _one_kv(cfg, max_k), align)
    grid = (triton.cdiv(max_q, cfg.block_m * meta["Q_BLOCKS"]), S, H)
    _attn_fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, scale * LOG2E, *_in_units(strides, align), lse.stride(0),
                           **meta)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                      scale: float, config: AttnConfig | None = None) -> tuple[Tensor, Tensor]:
    """Returns ``(out [Lq, H, D], lse [Lq, H] fp32, natural log)``; ``lse = -inf`` where a key segment is empty."""
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    Lq, H, D = q.shape
    S = cu_q.numel() - 1
    out = torch.empty((Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Lq, H), dtype=torch.float32, device=q.device)
    if Lq == 0 or S == 0 or max_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    args = (q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    cfg = config or forward_config(D, max_q, max_k, S, H, q.dtype)
    if config is None and tuning.enabled(q.device):
        one_kv = _one_kv(cfg, max_k)
        key = ("fwd", q.dtype, D, one_kv, tuning.bucket(max_q), tuning.bucket(max_k))
        cfg = tuning.pick(key, tuning.forward_candidates(cfg, one_kv, q.dtype), lambda c: _launch_forward(*args, c))
    _launch_forward(*args, cfg)
    return out, lse


def _launch_backward(do, q, k, v, out, lse, delta, dq, dk, dv, cu_q, cu_k, max_q: int, max_k: int, scale: float,
                     cfg: AttnConfig) -> None:
    """The dQ kernel first (it also writes ``delta``), then the dK/dV kernel, which reads ``delta``."""
    S, H, D = cu_q.numel() - 1, q.shape[1], q.shape[2]
    qkv = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    dq_strides = (*qkv, out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1))
    dkdv_strides = (*qkv, do.stride(0), do.stride(1), dk.stride(0), dk.stride(1))
    align = row_align(q.dtype, dq_strides + dkdv_strides)
    meta = backward_meta(q.dtype, D, cfg, align)
    qk_scale, s_lm = scale * LOG2E, lse.stride(0)
    dq_units, dkdv_units = _in_units(dq_strides, align), _in_units(dkdv_strides, align)
    _attn_bwd_dq_kernel[(triton.cdiv(max_q, cfg.block_m), S, H)](
        q, k, v, out, do, lse, delta, dq, cu_q, cu_k, qk_scale, scale, *dq_units[:10], s_lm, *dq_units[10:], **meta)
    _attn_bwd_dkdv_kernel[(triton.cdiv(max(max_k, 1), cfg.block_n), S, H)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, qk_scale, scale, *dkdv_units[:8], s_lm, *dkdv_units[8:],
        **meta)


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                       cu_k: Tensor, max_q: int, max_k: int, scale: float,
                       config: AttnConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)`` shaped and typed like ``q, k, v``; deterministic (no atomics).

    ``lse [Lq, H]`` is the forward's; ``out`` is read once, for ``delta = rowsum(dO * O)`` inside the dQ kernel.
    """
    do, q, k, v, out = (unit_last_stride(x) for x in (do, q, k, v, out))
    lse = lse.contiguous()
    Lq, H, D = q.shape
    S = cu_q.numel() - 1
    dq = torch.zeros((Lq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if Lq == 0 or k.shape[0] == 0 or S == 0:
        return dq, dk, dv
    delta = torch.empty((Lq, H), dtype=torch.float32, device=q.device)
    args = (do, q, k, v, out, lse, delta, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale)
    cfg = config or backward_config(D, q.dtype)
    if config is None and tuning.enabled(q.device):  # every kernel overwrites dq/dk/dv/delta: re-runs are safe
        key = ("bwd", q.dtype, D, tuning.bucket(max_q), tuning.bucket(max_k))
        cfg = tuning.pick(key, tuning.backward_candidates(cfg, q.dtype), lambda c: _launch_backward(*args, c))
    _launch_backward(*args, cfg)
    return dq, dk, dv
