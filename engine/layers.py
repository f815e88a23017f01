"""Small building blocks shared by both model families."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import Tensor


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, then scaled (the ACE/diffusers convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, keys ``fc1`` / ``fc2``."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[cos(t f), sin(t f)]`` (cos first), ``f_i = exp(-ln(max_period) i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features -> Linear -> SiLU -> Linear (keys ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def per_row(mod: Tensor, seg: Tensor) -> Tensor:
    """Per-segment rows ``mod [S, D]`` for every row of a packed stream (``seg [L]``: its segment): a gather
    to ``[L, D]``, or for one segment ``mod`` itself, which broadcasts with no copy (one image per batch)."""
    return mod if mod.shape[0] == 1 else mod.index_select(0, seg)


def ada_norm(x: Tensor, shift: Tensor, scale: Tensor, seg: Tensor, eps: float = 1e-6) -> Tensor:
    """``LN(x) * (1 + scale[seg]) + shift[seg]``: adaLN with one modulation row per segment."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + per_row(scale, seg)) + per_row(shift, seg)


def cu_from_lengths(lengths: list[int], device: torch.device | None = None) -> Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device) if device is not None else out


class Interleave:
    """Concatenate packed streams sample by sample: ``[a_0, b_0, a_1, b_1, ...]`` and back.

    Each stream is a packed tensor partitioned per sample. ``join`` gathers them into one
    per-sample-contiguous tensor (joint attention needs each sample's rows together); ``split`` undoes
    it. Both are index gathers, so autograd flows through and no host sync happens.

    perm ``[N]`` int64: joint row -> row of the concatenated streams; inv ``[N]`` its inverse;
    cu_seqlens ``[B+1]`` int32 of the joint rows; ``max_seqlen`` a host launch bound; ``sizes`` the
    stream lengths (host ints, or symbolic sizes taken from tensor shapes when exported).
    """

    def __init__(self, perm: Tensor, inv: Tensor, cu_seqlens: Tensor, max_seqlen: int, sizes: list[int],
                 identity: bool = False):
        self.perm, self.inv, self.cu_seqlens = perm, inv, cu_seqlens
        self.max_seqlen, self.sizes = max_seqlen, list(sizes)
        self.identity = identity  # one sample: the streams are already in joint order, no gather needed

    @classmethod
    def from_host(cls, cus: list[list[int]], device: torch.device | None = None) -> "Interleave":
        """Build from each stream's host per-sample offsets (once per batch)."""
        n = len(cus[0]) - 1
        base, offsets = 0, []
        for cu in cus:
            offsets.append(base)
            base += cu[-1]
        perm, lengths = [], []
        for s in range(n):
            length = 0
            for cu, off in zip(cus, offsets):
                perm.extend(range(off + cu[s], off + cu[s + 1]))
                length += cu[s + 1] - cu[s]
            lengths.append(length)
        perm_t = torch.tensor(perm, dtype=torch.long)
        return cls(perm_t.to(device), torch.argsort(perm_t).to(device), cu_from_lengths(lengths, device),
                   max(lengths) if lengths else 0, [cu[-1] for cu in cus], identity=perm == list(range(len(perm))))

    def join(self, *streams: Tensor) -> Tensor:
        joint = torch.cat(streams, dim=0)
        return joint if self.identity else joint.index_select(0, self.perm)

    def split(self, joint: Tensor) -> list[Tensor]:
        return list((joint if self.identity else joint.index_select(0, self.inv)).split(self.sizes, dim=0))


class PatchEmbed(nn.Module):
    """Patch embedding applied to pre-patchified tokens ``[L, Cin*p*p]``.

    The weight keeps the Conv2d layout ``[D, Cin, p, p]`` (key ``proj``) so checkpoints load as they
    are; applying it as one matmul over the packed tokens of the whole batch is the same function as
    a stride-p convolution per image, with no per-image launches.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)


def tokens_pqc_to_cpq(out: Tensor, p: int, channels: int) -> Tensor:
    """Reorder a final linear's ``(p_row, p_col, c)`` outputs to the token layout ``(c, p_row, p_col)``.

    Keeps only the first ``channels`` output channels (ACE's learned-sigma half is dropped here).
    """
    out = out.unflatten(-1, (p, p, -1))[..., :channels]
    return out.permute(0, 3, 1, 2).flatten(1)


def run_block(block: nn.Module, checkpointed: bool, *args):
    """Call ``block``; with ``checkpointed`` (and grad on) recompute its activations in the backward."""
    if checkpointed and torch.is_grad_enabled():
        return ckpt.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
