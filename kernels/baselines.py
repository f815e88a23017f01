"""Attention baselines behind the same ``segment_attention`` contract, for benchmarks and A/B checks.

None is picked by ``backend="auto"`` (on the CPU it picks ``sdpa_segments`` of ``cpu_ops.py``). Each is
the honest way to run block-diagonal varlen attention with that library:
- ``sdpa``: pad segments to ``[S, H, max_q, D]``, a key-padding mask, one SDPA call, unpad.
- ``flex``: FlexAttention over the packed sequence with a document mask (``q_seg == k_seg``); the block
  mask is built once per distinct ``cu_seqlens`` pair and cached, as a model would reuse it across layers.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention inside torch), where present.
- ``flash_attn``: ``flash_attn_varlen_func``; ``xformers``: ``memory_efficient_attention`` with a
  ``BlockDiagonalMask``. Both are optional installs (``omniace[gpu]``), imported on first use.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from omniace import has_module

from .reference import segment_ids

HALF = (torch.float16, torch.bfloat16)


def _segment_positions(cu: Tensor, total: int) -> tuple[Tensor, Tensor]:
    seg = segment_ids(cu, total)
    return seg, torch.arange(total, device=cu.device) - cu.long()[seg]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                   scale: float) -> Tensor:
    S, (Lq, H, D), Lk = cu_q.numel() - 1, q.shape, k.shape[0]
    if Lq == 0 or max_k == 0:
        return q.new_zeros(q.shape)
    sq, pq = _segment_positions(cu_q, Lq)
    sk, pk = _segment_positions(cu_k, Lk)

    def pad(x: Tensor, seg: Tensor, p: Tensor, n: int) -> Tensor:
        out = x.new_zeros(S, n, H, D)
        out[seg, p] = x
        return out.transpose(1, 2)

    lens_k = (cu_k[1:] - cu_k[:-1]).long()
    mask = (torch.arange(max_k, device=q.device)[None, :] < lens_k[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(pad(q, sq, pq, max_q), pad(k, sk, pk, max_k), pad(v, sk, pk, max_k),
                                         attn_mask=mask, scale=scale)
    out = out.transpose(1, 2)[sq, pq]
    return torch.where((lens_k == 0)[sq][:, None, None], 0.0, out)  # fully masked rows: zeros, not NaN


@functools.lru_cache(maxsize=32)
def _flex_block_mask(cu_q: tuple[int, ...], cu_k: tuple[int, ...], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    seg_q = segment_ids(torch.tensor(cu_q, device=device), cu_q[-1])
    seg_k = segment_ids(torch.tensor(cu_k, device=device), cu_k[-1])

    def same_segment(b, h, q_idx, kv_idx):
        return seg_q[q_idx] == seg_k[kv_idx]

    return create_block_mask(same_segment, None, None, cu_q[-1], cu_k[-1], device=device)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # default dynamic: later shapes reuse one graph


def flex_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                   scale: float) -> Tensor:
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.new_zeros(q.shape)
    mask = _flex_block_mask(tuple(cu_q.tolist()), tuple(cu_k.tolist()), str(q.device))
    fn = _compiled_flex() if q.device.type == "cuda" else _eager_flex()
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@functools.cache
def _eager_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention as fa

    return fa


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                     scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if "scale" in inspect.signature(varlen_attn).parameters:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)
    if abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # torch 2.9's version has no scale argument
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def flash_attn_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                         scale: float) -> Tensor:
    from omniace import require

    fa = require("flash_attn", "gpu", "the flash_attn attention baseline")
    return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                       scale: float) -> Tensor:
    from omniace import require

    require("xformers", "gpu", "the xformers attention baseline")
    from xformers.ops import fmha

    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=lens_q, kv_seqlen=lens_k)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


def _on_cuda_with(module: str) -> Callable[[torch.device], bool]:
    return lambda device: device.type == "cuda" and has_module(module)


def register(register_backend: Callable) -> None:
    """Register the baselines for ``segment_attention`` (negative priority: never chosen by ``auto``)."""
    op = "segment_attention"
    register_backend(op, "sdpa", sdpa_attention, priority=-1)
    register_backend(op, "flex", flex_attention, priority=-2,
                     available=lambda device: has_module("torch.nn.attention.flex_attention"),
                     dtypes=(torch.float32, *HALF))
    register_backend(op, "varlen", varlen_attention, priority=-3,
                     available=_on_cuda_with("torch.nn.attention.varlen"), dtypes=HALF)
    register_backend(op, "flash_attn", flash_attn_attention, priority=-4,
                     available=_on_cuda_with("flash_attn"), dtypes=HALF)
    register_backend(op, "xformers", xformers_attention, priority=-5,
                     available=_on_cuda_with("xformers"), dtypes=HALF)
