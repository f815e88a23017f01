"""What ``backend="auto"`` runs on the CPU: the ops segment by segment, on views, in PyTorch's own kernels.

The reference (``reference.py``) defines the ops; it gathers a modulation row per token (``scale[seg]``:
a new ``[L, C]`` tensor per use) and materialises fp32 attention scores. Here each segment is a view of
the packed rows, so one image costs what a dense model costs:
- ``segment_attention`` (``sdpa_segments``): one 4-D SDPA call per segment (SDPA's flash CPU kernel; no
  padding, no mask). Torch's varlen attention has no CPU kernel; the padded ``sdpa`` baseline pays for
  padding, a mask and two scatters.
- ``editnet_inject`` (``segments``): per segment ``addcmul`` for the gated residual and one
  ``layer_norm`` whose affine weight and bias are the segment's ``1 + scale`` and ``shift``, so the
  adaLN modulation happens inside the LayerNorm kernel, with no gathered rows.
Both read ``cu_seqlens`` on the host (free on the CPU). While ``torch.compile`` traces, whose graphs
cannot hold a loop over data, they run the padded SDPA and the reference instead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .baselines import sdpa_attention


def sdpa_segments_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                            scale: float) -> Tensor:
    if torch.compiler.is_compiling():  # the loop's bounds are data: trace the padded form instead
        return sdpa_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    outs = []
    for s in range(len(bq) - 1):
        if bq[s + 1] == bq[s]:
            continue
        if bk[s + 1] == bk[s]:  # no keys: the contract says zeros
            outs.append(q.new_zeros(bq[s + 1] - bq[s], *q.shape[1:]))
            continue
        # [l, H, D] -> [1, H, l, D] views, as diffusers passes them: SDPA's CPU flash kernel takes the
        # strides as they are, and only 4-D inputs reach it (3-D ones run the slower math path)
        qs, ks, vs = (x[None, b[s]:b[s + 1]].transpose(1, 2) for x, b in ((q, bq), (k, bk), (v, bk)))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    if len(outs) == 1 and outs[0].shape[0] == q.shape[0]:
        return outs[0]  # one segment: a strided view; the caller's reshape makes the one copy, as in diffusers
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def editnet_inject_segments(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu: Tensor,
                            eps: float) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():
        return reference.editnet_inject(h, ctrl, shift, scale, gate, cu, eps)
    bounds = cu.tolist()
    outs, ys = [], []
    for s in range(len(bounds) - 1):
        if bounds[s + 1] == bounds[s]:
            continue
        rows = slice(bounds[s], bounds[s + 1])
        h_out = torch.addcmul(h[rows], gate[s].to(h.dtype), ctrl[rows])
        # the reference normalises in fp32 (or fp64) and modulates before its one rounding; so does this
        acc = h_out.dtype if h_out.dtype in (torch.float32, torch.float64) else torch.float32
        weight = (1 + scale[s]).to(acc)
        y = F.layer_norm(h_out.to(acc), (h.shape[-1],), weight, shift[s].to(acc), eps)
        outs.append(h_out)
        ys.append(y.to(h.dtype))
    if len(outs) == 1:
        return outs[0], ys[0]
    if not outs:  # no rows
        return h.new_empty(h.shape), h.new_empty(h.shape)
    return torch.cat(outs), torch.cat(ys)


def register(register_backend: Callable) -> None:
    """Offer both on the CPU only, above the reference (priority 0)."""
    on_cpu = lambda device: device.type == "cpu"  # noqa: E731
    register_backend("segment_attention", "sdpa_segments", sdpa_segments_attention, priority=1, available=on_cpu)
    register_backend("editnet_inject", "segments", editnet_inject_segments, priority=1, available=on_cpu)
