"""The three ops written with dense tensor operations only: no host reads of ``cu_seqlens``, no Python
loop over segments, no data-dependent shapes.

This is what the ``portable`` ONNX export traces (segment attention as attention with a block-diagonal mask
built from cu_seqlens inside the graph; the injection as add + LayerNorm + modulation; RoPE as
multiply-add with angles from the positions), and the ``dense`` backend that ``torch.compile(fullgraph=True)``
and CUDA-graph capture can trace through on any device. Attention costs O(Lq * Lk) memory and FLOPs over
the whole batch (masked blocks are computed, then discarded): a correctness and portability path, not a fast
one. Same contracts as ``reference.py``, against which ``tests/test_export.py`` checks it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _acc, rope3d  # noqa: F401  (RoPE is dense already: angles from positions)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Segment of each of ``total`` rows: the number of segment ends at or before the row (int64 ``[total]``).

    An empty segment ends where it starts, so rows skip past it, as the contract requires."""
    rows = torch.arange(total, device=cu_seqlens.device)
    return (rows[:, None] >= cu_seqlens[1:].long()[None, :]).sum(dim=1)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None) -> Tensor:
    """Block-diagonal attention as one masked attention over the whole batch, softmax in fp32."""
    del max_seqlen_q, max_seqlen_k  # kernel launch bounds; unused here
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = segment_ids(cu_seqlens_q, q.shape[0])[:, None] == segment_ids(cu_seqlens_k, k.shape[0])[None, :]
    scores = torch.einsum("qhd,khd->hqk", _acc(q), _acc(k)) * scale
    # a finite fill keeps a row with no key finite (uniform weights), and the row is zeroed below
    scores = torch.where(allowed[None], scores, torch.finfo(scores.dtype).min)
    out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), _acc(v))
    return (out * allowed.any(dim=1)[:, None, None].to(out.dtype)).to(q.dtype)


def editnet_inject(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu_seqlens: Tensor,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``h_out = h + gate[s] * ctrl``; ``y = LN(h_out) * (1 + scale[s]) + shift[s]`` (LN without affine)."""
    seg = segment_ids(cu_seqlens, h.shape[0])
    h_out = h + gate.index_select(0, seg) * ctrl
    normed = F.layer_norm(_acc(h_out), (h.shape[-1],), eps=eps)
    y = normed * (1 + _acc(scale.index_select(0, seg))) + _acc(shift.index_select(0, seg))
    return h_out, y.to(h.dtype)
