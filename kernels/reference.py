"""Pure-PyTorch references of the three omniace ops.

These functions *are* the definition of each op (the contracts are documented in ``ops.py``): they are
complete, differentiable through autograd, run on any device, and every faster backend is tested
against them. They favour clarity over speed, but stay vectorised where that costs no clarity.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(x: Tensor) -> Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _inv_freq(axes_dims: tuple[int, int, int], theta: float, device: torch.device) -> Tensor:
    parts = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dims]
    return torch.cat(parts).to(torch.float32).to(device)


_cached_inv_freq = functools.lru_cache(maxsize=64)(_inv_freq)


def rope3d_inv_freq(axes_dims: tuple[int, int, int], theta: float, device: torch.device) -> Tensor:
    """The ``[sum(axes_dims) // 2]`` fp32 inverse frequencies, formed in float64 and rounded once.

    Pair ``j`` of axis ``a`` has ``theta ** (-2j / axes_dims[a])``. Cached per device: the kernels read
    this small vector (not a cos/sin table) and form the angles in registers. Under torch.compile the
    vector is formed in the graph instead (a cache lookup cannot be traced).
    """
    if torch.compiler.is_compiling():
        return _inv_freq(axes_dims, theta, device)
    return _cached_inv_freq(axes_dims, theta, device)


def rope3d_angles(pos: Tensor, axes_dims: tuple[int, int, int], theta: float = 10000.0) -> Tensor:
    """Rotation angles ``[L, sum(axes_dims) // 2]`` in fp32 for integer positions ``pos [L, 3]``.

    Axis ``a`` owns ``axes_dims[a] // 2`` consecutive complex pairs, each turning by ``pos[:, a]`` times
    its inverse frequency (``rope3d_inv_freq``); the only fp32 error is that final product.
    """
    axis = torch.repeat_interleave(torch.arange(3, device=pos.device), torch.tensor(axes_dims, device=pos.device) // 2)
    inv_freq = rope3d_inv_freq(tuple(axes_dims), float(theta), pos.device)
    return pos[:, axis].to(torch.float32) * inv_freq[None, :]


def rotate_pairs(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2j], x[2j+1])`` of ``x [L, H, D]`` by ``angles [L, P]``; dims past 2P pass."""
    rot = 2 * angles.shape[1]
    pairs = _acc(x[..., :rot]).unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)


def rope3d(
    q: Tensor, k: Tensor, pos: Tensor, axes_dims: tuple[int, int, int], theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    angles = rope3d_angles(pos, axes_dims, theta)
    return rotate_pairs(q, angles), rotate_pairs(k, angles)


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
) -> Tensor:
    """Block-diagonal attention, one segment at a time, softmax in fp32."""
    del max_seqlen_q, max_seqlen_k  # launch hints for the kernels; the reference reads the offsets.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(bq) - 1):
        qs = q[bq[s] : bq[s + 1]]
        ks, vs = k[bk[s] : bk[s + 1]], v[bk[s] : bk[s + 1]]
        if qs.shape[0] == 0:
            continue
        if ks.shape[0] == 0:  # nothing to attend to: the contract says zeros
            outs.append(torch.zeros_like(qs))
            continue
        scores = torch.einsum("qhd,khd->hqk", _acc(qs), _acc(ks)) * scale
        probs = scores.softmax(dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, _acc(vs)).to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Segment index of each of ``total`` rows partitioned by ``cu_seqlens`` (int64, on its device)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.arange(counts.shape[0], device=cu_seqlens.device)
    return torch.repeat_interleave(ids, counts, output_size=total)


def editnet_inject(
    h: Tensor,
    ctrl: Tensor,
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
    cu_seqlens: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """``h_out = h + gate[s] * ctrl``; ``y = LN(h_out) * (1 + scale[s]) + shift[s]`` (LN without affine)."""
    seg = segment_ids(cu_seqlens, h.shape[0])
    h_out = h + gate[seg] * ctrl
    normed = F.layer_norm(_acc(h_out), (h.shape[-1],), eps=eps)
    y = normed * (1 + _acc(scale[seg])) + _acc(shift[seg])
    return h_out, y.to(h.dtype)
