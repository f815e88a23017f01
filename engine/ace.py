"""ACE: a PixArt-alpha adaLN-single DiT over packed Long-context Condition Units.

Per block: long-context self-attention over each sample's whole context (target and condition
images jointly) with 3D RoPE and q/k RMSNorm; per-frame cross-attention to the owning unit's text
(no norm, no modulation, plain residual); tanh-GELU MLP. State-dict keys follow the released ACE
checkpoint (scepter's ``ACE`` backbone). See ``shared/reference/ACE_NOTES.md`` for the exact maths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from omniace.kernels import editnet_inject, rope3d, segment_attention

from .config import ACEConfig
from .layers import Mlp, PatchEmbed, RMSNorm, TimestepEmbedder, ada_norm, per_row, run_block, tokens_pqc_to_cpq
from .lcu import PackedLCU, gather_source, patchify


def check_previous_estimate(cfg: ACEConfig, x: Tensor, x0_prev: Tensor | None) -> None:
    """ValueError for a self-conditioning input ``x0_prev`` given to a model without ``cfg.self_condition`` or
    shaped otherwise than ``x`` ``[L_tgt, C*p*p]``; None (zeros) always passes."""
    if x0_prev is None:
        return
    if not getattr(cfg, "self_condition", False):
        raise ValueError("x0_prev is the self-conditioning input: this model has self_condition=False")
    if x0_prev.shape != x.shape:
        raise ValueError(f"x0_prev must be shaped like x, {tuple(x.shape)}, got {tuple(x0_prev.shape)}")


class ACEAttention(nn.Module):
    """q/k/v/o linears with an RMSNorm over the whole width before the head split (keys as ACE)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, norm_q_for_k: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim) if qk_norm else nn.Identity()
        self.norm_q_for_k = norm_q_for_k

    def qkv(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        norm_k = self.norm_q if self.norm_q_for_k else self.norm_k
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))
        k = norm_k(self.k(context)).unflatten(-1, (self.heads, -1))
        v = self.v(context).unflatten(-1, (self.heads, -1))
        return q, k, v


@dataclass
class ACEPlan:
    """The tensors one ACE forward reads from a packed batch (field names as ``PackedLCU``'s and as the
    graph inputs of ``export/spec.py``). A :class:`PackedLCU` has every field itself, so the eager forward
    passes the batch; the exported graph builds a plan from its inputs. ``max_seqlen_*`` are host launch
    bounds for the kernels."""

    tokens: Tensor
    text: Tensor
    target_index: Tensor
    pos: Tensor
    indicator: Tensor
    sample_of_token: Tensor
    frame_text_index: Tensor
    frame_text_indicator: Tensor
    cu_seqlens_sample: Tensor
    cu_seqlens_frame: Tensor
    cu_seqlens_frame_txt: Tensor
    max_seqlen_sample: int = 0
    max_seqlen_frame: int = 0
    max_seqlen_frame_txt: int = 0
    source_index: Tensor | None = None  # read only when ``cfg.source_skip``
    target_neighbors: Tensor | None = None  # read only when ``cfg.pixel_smooth`` or ``cfg.pixel_conv``


class ACEBlock(nn.Module):
    def __init__(self, cfg: ACEConfig):
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.attn = ACEAttention(d, cfg.num_heads, cfg.qk_norm, cfg.norm_q_for_k)
        self.cross_attn = ACEAttention(d, cfg.num_heads, cfg.qk_norm, cfg.norm_q_for_k)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x: Tensor, y: Tensor, t_mod: Tensor, batch: ACEPlan | PackedLCU, seg: Tensor) -> Tensor:
        """x ``[L_img, D]``; y ``[L_ft, D]`` frame texts; t_mod ``[B, 6D]``; seg: sample of each token."""
        cfg = self.cfg
        mod = self.scale_shift_table[None] + t_mod.unflatten(1, (6, -1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)

        h = ada_norm(x, shift_msa, scale_msa, seg)
        q, k, v = self.attn.qkv(h, h)
        q, k = rope3d(q, k, batch.pos, cfg.axes, cfg.rope_theta)
        a = segment_attention(q, k, v, batch.cu_seqlens_sample, batch.cu_seqlens_sample,
                              batch.max_seqlen_sample, batch.max_seqlen_sample)
        x = x + per_row(gate_msa, seg) * self.attn.o(a.flatten(1))

        q, k, v = self.cross_attn.qkv(x, y)
        c = segment_attention(q, k, v, batch.cu_seqlens_frame, batch.cu_seqlens_frame_txt,
                              batch.max_seqlen_frame, batch.max_seqlen_frame_txt)
        # plain cross-attention residual fused with the MLP's LayerNorm + adaLN modulation
        x, h = editnet_inject(x, self.cross_attn.o(c.flatten(1)), shift_mlp, scale_mlp,
                              torch.ones_like(gate_mlp), batch.cu_seqlens_sample)
        return x + per_row(gate_mlp, seg) * self.mlp(h)


class FinalLayer(nn.Module):
    """T2IFinalLayer: shift/scale = table + t_emb (no SiLU, no linear), then the output linear."""

    def __init__(self, dim: int, patch: int, out_channels: int, extra: int = 0):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        # ``extra`` per-token outputs after the patch's (the pixel head's smooth features and key colours)
        self.linear = nn.Linear(dim, patch * patch * out_channels + extra)

    def forward(self, x: Tensor, t_emb: Tensor, seg: Tensor) -> Tensor:
        shift = self.scale_shift_table[0] + t_emb  # [B, D]
        scale = self.scale_shift_table[1] + t_emb
        return self.linear(ada_norm(x, shift, scale, seg))


def token_pixel_coords(codec_factor: int, patch: int) -> Tensor:
    """``[pixels, 2]`` float32: the (row, col) inside its token of each pixel column of a token row, where a token
    row read as ``[3, pixels]`` (the pixel codec's space-to-depth, then :func:`~omniace.engine.lcu.patchify`)
    holds one pixel's R, G and B in column j. Found by encoding an image of coordinates, so it follows the codec."""
    s = codec_factor * patch
    rr, cc = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    row = patchify(F.pixel_unshuffle(torch.stack([rr, cc, rr])[None], codec_factor)[0], patch)  # [1, 3 * s * s]
    return row.view(3, s * s)[:2].T.contiguous()


def bilinear_weights(coords: Tensor, size: int) -> Tensor:
    """``[pixels, 9]``: bilinear weights of the 3x3 token neighbourhood (dy, then dx, each -1, 0, 1) at each pixel
    of a ``size x size``-pixel token, ``coords [pixels, 2]`` its (row, col) in pixels. Token centres sit at the
    middle of their pixels (``align_corners=False``): a pixel at offset u (in tokens) from its own centre takes
    1 - |u| of it and |u| of the neighbour on u's side, per axis."""
    u = (coords + 0.5) / size - 0.5  # [pixels, 2] in (-0.5, 0.5)
    w = torch.stack([(-u).clamp(min=0), 1 - u.abs(), u.clamp(min=0)], dim=-1)  # [pixels, 2 axes, 3 offsets]
    return (w[:, 0, :, None] * w[:, 1, None, :]).flatten(1)


def sincos_2d(rows_cols: Tensor, dim: int) -> Tensor:
    """``[L, dim]`` fp32: DiT/PixArt-alpha's fixed 2D sin-cos position embedding of ``rows_cols [L, 2]`` (any real
    dtype, in tokens): the first half of the channels embed the row, the second the column, each as
    ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``, k = 0 .. dim/4 - 1 (``dim`` divisible by 4)."""
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float32, device=rows_cols.device) / quarter)
    angles = rows_cols.float()[:, :, None] * omega  # [L, 2, dim / 4]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [L, (row sin, row cos, col sin, col cos)]


class PixelHead(nn.Module):
    """Per-pixel output of a pixel-codec model (``cfg.pixel_head``): the final linear gives ``features`` values
    per pixel of each token; a two-layer MLP shared by every pixel maps them, with that pixel's source and
    noisy RGB, to its change (and gate logits). A per-token linear head can only draw an edit as a sum of
    ``pixels``-wide basis patterns, which shows as blocks; here the edit can follow the source's own edges
    (recolour what is red, keep what is not). Zero-initialised output: an untrained head copies the source.

    ``smooth`` > 0 (``cfg.pixel_smooth``): the final linear also gives ``smooth`` values per token, upsampled
    bilinearly over the token grid (``F.interpolate(..., mode="bilinear", align_corners=False)`` on each frame)
    and fed to the MLP beside the per-pixel features. Per-pixel features are free at every token border, so a
    token that is unsure of its colour shows as a square; bilinear features change continuously across borders,
    as resize-convolution removes the checkerboard of sub-pixel upsampling (Odena et al., 2016).

    ``keys`` > 0 (``cfg.pixel_keys``): the final linear also gives ``keys`` colours per token (3 values each, after
    the smooth ones); each pixel's MLP also reads ``1 / (1 + |source - key|^2 / KEY_WIDTH)`` for every key. The MLP
    adds token and pixel inputs, so "the pixels of the source that are white" (a product of the two) costs it
    many hidden units; the keys give that selection directly, and an edit then follows the object's exact edges.
    A heavy-tailed kernel, not a Gaussian, so a key far from every source colour still gets a gradient.

    ``sigma_data`` > 0 (``cfg.pixel_sigma_data``): each pixel's MLP also reads ``c(t) (x_t - alpha_t source)``, the
    linear least-squares estimate of its change ``x0 - source`` from its noisy value under a prior of std
    ``sigma_data``, with ``c(t) = alpha_t sigma_data^2 / (alpha_t^2 sigma_data^2 + sigma_t^2)`` on the DDPM schedule
    (EDM's c_skip, Karras et al. 2022, variance-preserving, the source as the prior mean). Without it the MLP must
    multiply its noisy value by a function of t to denoise it, which a sum of inputs cannot do, and the model
    redrew even a clean target (t = 0) as a soft blob: a swapped square came out round.

    ``conv`` > 0 (``cfg.pixel_conv``): each pixel's MLP also reads ``conv`` features of a learned
    ``CONV_KERNEL x CONV_KERNEL`` convolution over the image's noisy and source RGB and a ones channel (zero padding
    at the image border, so the ones channel marks it), computed per token on the pixels of its 3x3 token
    neighbourhood (``target_neighbors``; a neighbour past the border is zeroed). A pixel's own noisy value is
    as noisy as the image; its neighbourhood's is not, and holds the edges and corners that tell a square from a
    circle. Without it the shape a noised target still shows at sigma 0.3-0.9 was lost (the from-target table of
    docs/default_model.md).

    ``self_cond`` (``cfg.self_condition``): each pixel's MLP also reads its RGB in the model's previous x0 estimate
    (``x0_prev``; zeros at the first sampling step), after the other optional inputs: Analog Bits' self-conditioning
    (Chen et al., 2022) per pixel, so a call can sharpen the drawing the last one made.

    ``coords`` (``cfg.absolute_coords``): each pixel's MLP also reads the pixel's (row, col) in its frame, in units of
    ``COORD_UNIT`` tokens (its token's grid position plus the pixel's place inside it), after the other optional
    inputs: with the tokens' absolute position embedding, a token can hold an object's centre and size, and the MLP
    draws the edge of a square, a circle or a triangle at the right pixel with a few linear pieces (CoordConv).
    """

    KEY_WIDTH = 0.05  # squared distance (pixels in [-1, 1]) at which a key's match is 1/2
    CONV_KERNEL = 5  # pixels; its radius (2) must not exceed a token's width
    COORD_UNIT = 8  # tokens: the embedded default's 64-pixel short side (8-pixel tokens) spans [0, 1]

    def __init__(self, features: int, pixels: int, gated: bool, smooth: int = 0, codec_factor: int = 1,
                 patch: int = 1, keys: int = 0, sigma_data: float = 0.0, conv: int = 0, self_cond: bool = False,
                 coords: bool = False):
        super().__init__()
        self.features, self.pixels, self.gated, self.smooth, self.keys = features, pixels, gated, smooth, keys
        self.sigma_data, self.conv, self.size, self.self_cond = sigma_data, conv, codec_factor * patch, self_cond
        self.coords = coords
        inputs = (features + smooth + keys + conv + 6 + (3 if sigma_data else 0) + (3 if self_cond else 0)
                  + (2 if coords else 0))
        self.fc1 = nn.Linear(inputs, 2 * features)
        if coords:  # each pixel's (row, col) inside its token, in tokens, at the pixel's centre; not in the state dict
            inside = (token_pixel_coords(codec_factor, patch) + 0.5) / self.size
            self.register_buffer("pixel_offsets", inside.to(torch.get_default_device()), persistent=False)
        if conv:
            if self.CONV_KERNEL // 2 > self.size:
                raise ValueError(f"pixel_conv's {self.CONV_KERNEL}-pixel kernel reaches past the 3x3 token "
                                 f"neighbourhood of {self.size}-pixel tokens")
            self.conv2d = nn.Conv2d(7, conv, self.CONV_KERNEL)  # noisy RGB, source RGB, ones; no padding
            # raster position (row * size + col) of each pixel column of a token row, and its inverse
            coords = token_pixel_coords(codec_factor, patch).long()
            raster = coords[:, 0] * self.size + coords[:, 1]
            dev = torch.get_default_device()
            self.register_buffer("raster_of_slot", raster.to(dev), persistent=False)
            # each window pixel (raster order over the token and r pixels around it): the neighbour it lies in
            # (dy, then dx) and its column in that neighbour's token row
            r = self.CONV_KERNEL // 2
            offset = torch.arange(-r, self.size + r)
            cell, within = torch.div(offset, self.size, rounding_mode="floor") + 1, offset % self.size
            slot = (cell[:, None] * 3 + cell[None, :]).flatten()
            pixel = torch.argsort(raster)[(within[:, None] * self.size + within[None, :]).flatten()]
            self.register_buffer("window_slot", slot.to(dev), persistent=False)
            self.register_buffer("window_pixel", pixel.to(dev), persistent=False)
        if sigma_data:  # not in the state dict: they follow from the schedule (the DDIM sampler's, as training's)
            from .sampler import DDIMSampler

            sigma, alpha = DDIMSampler().schedule()
            gain = alpha * sigma_data**2 / (alpha.square() * sigma_data**2 + sigma.square())
            table = torch.stack([gain, alpha], dim=1).float().to(torch.get_default_device())  # [T, 2]
            self.register_buffer("wiener", table, persistent=False)
        self.fc2 = nn.Linear(2 * features, 6 if gated else 3)
        if smooth:  # not in the state dict: it follows from the codec's layout
            size = codec_factor * patch
            self.register_buffer("upsample", bilinear_weights(token_pixel_coords(codec_factor, patch), size),
                                 persistent=False)

    def forward(self, feat: Tensor, x: Tensor, source: Tensor, has_source: Tensor,
                neighbors: Tensor | None = None, t: Tensor | None = None, x0_prev: Tensor | None = None,
                token_rc: Tensor | None = None) -> Tensor:
        """feat ``[L, pixels * features + smooth + 3 * keys]`` (the final linear's output); x, source
        ``[L, 3 * pixels]`` noisy and source target tokens in the token layout (RGB-major, see
        :func:`omniace.engine.lcu.patchify`); has_source ``[L, 1]`` bool; neighbors ``[L, 9]`` int64
        (``PackedLCU.target_neighbors``, read when ``smooth``); t ``[L]`` each token's DDPM timestep 0..999 (read
        when ``sigma_data``); x0_prev ``[L, 3 * pixels]`` the previous x0 estimate (read when ``self_cond``);
        token_rc ``[L, 2]`` each token's (row, col) in its frame's token grid (read when ``coords``).
        Returns the x0 prediction ``[L, 3 * pixels]`` in the token layout. ValueError when ``smooth`` and
        ``neighbors`` is None, ``sigma_data`` and ``t`` is None, ``self_cond`` and ``x0_prev`` is None, or
        ``coords`` and ``token_rc`` is None."""
        n, dtype = feat.shape[0], feat.dtype
        source = source.to(dtype)
        rgb = lambda v: v.view(n, 3, self.pixels).transpose(1, 2)  # token row -> [L, pixels, 3]
        per_pixel = self.pixels * self.features
        parts = [feat[:, :per_pixel].reshape(n, self.pixels, self.features)]
        if self.smooth:
            if neighbors is None:
                raise ValueError("pixel_smooth reads each target token's grid neighbours: the batch needs "
                                 "target_neighbors (engine.lcu.pack computes it)")
            near = feat[:, per_pixel:per_pixel + self.smooth].index_select(0, neighbors.flatten())
            parts.append(torch.matmul(self.upsample.to(dtype), near.view(n, 9, self.smooth)))  # [L, pixels, smooth]
        if self.keys:
            keys = feat[:, per_pixel + self.smooth:].view(n, 1, self.keys, 3)
            dist = (rgb(source).unsqueeze(2) - keys).square().sum(-1)  # [L, pixels, keys]
            parts.append(1 / (1 + dist / self.KEY_WIDTH))
        if self.conv:
            if neighbors is None:
                raise ValueError("pixel_conv reads each target token's grid neighbours: the batch needs "
                                 "target_neighbors (engine.lcu.pack computes it)")
            parts.append(self.conv_features(x.to(dtype), source, neighbors))
        if self.sigma_data:
            if t is None:
                raise ValueError("pixel_sigma_data reads each target token's timestep: pass t [L_tgt]")
            gain, alpha = self.wiener.index_select(0, t.long()).to(dtype).unbind(1)  # [L] each
            parts.append(rgb(gain[:, None] * (x.to(dtype) - alpha[:, None] * source)))
        if self.self_cond:
            if x0_prev is None:
                raise ValueError("self_condition reads the previous x0 estimate: pass x0_prev (zeros at the first call)")
            parts.append(rgb(x0_prev.to(dtype)))
        if self.coords:
            if token_rc is None:
                raise ValueError("absolute_coords reads each target token's grid position: pass token_rc [L_tgt, 2]")
            where = (token_rc.float()[:, None, :] + self.pixel_offsets) / self.COORD_UNIT  # [L, pixels, 2]
            parts.append(where.to(dtype))
        h = torch.cat([*parts, rgb(source), rgb(x.to(dtype))], dim=-1)
        out = self.fc2(F.silu(self.fc1(h)))
        change = out[..., :3]
        if self.gated:  # samples with no source: the gate is 1 (the change is the whole image)
            gate = torch.sigmoid(out[..., 3:].float()).to(dtype)
            change = change * torch.where(has_source.unsqueeze(-1), gate, 1.0)
        return source + change.transpose(1, 2).flatten(1)

    def conv_features(self, x: Tensor, source: Tensor, neighbors: Tensor) -> Tensor:
        """``[L, pixels, conv]``: the convolution of the image's ``[noisy RGB, source RGB, ones]`` (zero padded at
        its border) at each pixel of each token, in the token's pixel order. x, source ``[L, 3 * pixels]``;
        neighbors ``[L, 9]`` (a neighbour past the border is the token itself, ``grid_neighbors``)."""
        n = x.shape[0]
        w = self.size + 2 * (self.CONV_KERNEL // 2)  # the token and r pixels around it
        # one row per pixel of the batch: [L * pixels, 7]
        planes = torch.cat([x, source, torch.ones_like(x[:, :self.pixels])], dim=1).view(n, 7, self.pixels)
        planes = planes.transpose(1, 2).reshape(n * self.pixels, 7)
        # a neighbour past the border is the token itself (grid_neighbors clamps): zero it, as zero padding would
        own, centre = neighbors[:, 4], torch.ones_like(neighbors[:, 4], dtype=torch.bool)
        inside_y = torch.stack([neighbors[:, 1] != own, centre, neighbors[:, 7] != own], dim=1)  # dy = -1, 0, 1
        inside_x = torch.stack([neighbors[:, 3] != own, centre, neighbors[:, 5] != own], dim=1)  # dx = -1, 0, 1
        inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)  # [L, 9]
        slot, pixel = self.window_slot, self.window_pixel  # [w * w] each: which neighbour, which of its pixels
        rows = neighbors.index_select(1, slot) * self.pixels + pixel  # [L, w * w]
        window = planes.index_select(0, rows.flatten()).view(n, w * w, 7)
        window = window * inside.index_select(1, slot).unsqueeze(-1).to(window.dtype)
        out = self.conv2d(window.transpose(1, 2).reshape(n, 7, w, w)).flatten(2)  # [L, conv, s * s], raster order
        return out.index_select(2, self.raster_of_slot).transpose(1, 2)


class TextRefinerLayer(nn.Module):
    """One pre-norm transformer layer over each frame's text (``cfg.text_refiner``): self-attention within the
    text a frame attends to (segments ``cu_seqlens_frame_txt``), then a tanh-GELU MLP, both residual. Its output
    projections start at zero, so an untrained refiner passes the text through unchanged.

    Why: ACE reads T5 states, in which ``red`` after ``make the circle`` already differs from ``red`` in ``the red
    circle``; the word-level encoder of the embedded default gives one vector per word whatever its context, so
    the cross-attention alone must tell the colour asked for from the colour named. A token refiner (as
    HunyuanDiT/HunyuanVideo put before their DiT) gives the text that context back."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ACEAttention(dim, heads, qk_norm, norm_q_for_k=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, y: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """y ``[L_ft, D]`` the frames' text rows; ``cu_seqlens [F+1]`` int32 their segments. Returns ``[L_ft, D]``."""
        h = self.norm1(y)
        q, k, v = self.attn.qkv(h, h)
        a = segment_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        y = y + self.attn.o(a.flatten(1))
        return y + self.mlp(self.norm2(y))


class TextPositionEmbeddings(nn.Module):
    """The ``[10, Y]`` image-indicator table (T5 states of ``{image}``, ``{image1}``, ...)."""

    def __init__(self, n: int, y_channels: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(n, y_channels))


class ACEModel(nn.Module):
    """ACE DiT. ``forward(batch, x, t)`` predicts eps for the packed target tokens ``x``."""

    def __init__(self, cfg: ACEConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels + 1, d, p)
        # cfg.source_concat: the target tokens' source cells, embedded and added to theirs
        self.source_embedder = nn.Linear(cfg.in_channels * p * p, d, bias=False) if cfg.source_concat else None
        # cfg.self_condition: the previous x0 estimate of the target tokens, embedded and added to theirs
        self.self_cond_embedder = nn.Linear(cfg.in_channels * p * p, d, bias=False) if cfg.self_condition else None
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = Mlp(cfg.y_channels, d, d)
        self.text_refiner = nn.ModuleList(TextRefinerLayer(d, cfg.num_heads, cfg.qk_norm, cfg.mlp_ratio)
                                          for _ in range(cfg.text_refiner))
        self.blocks = nn.ModuleList(ACEBlock(cfg) for _ in range(cfg.depth))
        if cfg.pixel_head:
            pixels = p * p * cfg.codec_factor**2
            self.final_layer = FinalLayer(d, p, cfg.codec_factor**2 * cfg.pixel_head,
                                          extra=cfg.pixel_smooth + 3 * cfg.pixel_keys)
            self.pixel_head = PixelHead(cfg.pixel_head, pixels, cfg.source_gate, cfg.pixel_smooth,
                                        cfg.codec_factor, p, cfg.pixel_keys, cfg.pixel_sigma_data, cfg.pixel_conv,
                                        cfg.self_condition, cfg.absolute_coords)
        else:
            self.final_layer = FinalLayer(d, p, cfg.out_channels)
        self.text_position_embeddings = TextPositionEmbeddings(cfg.num_indicators, cfg.y_channels)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PixArt/ACE initialisation: xavier linears, zero cross-attention output and final linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.cfg.hidden_size, -1))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                    self.y_embedder.fc1, self.y_embedder.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.cross_attn.o.weight)
            nn.init.zeros_(blk.cross_attn.o.bias)
        for layer in self.text_refiner:  # residual branches start at zero: the refiner starts as the identity
            for out in (layer.attn.o, layer.mlp.fc2):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.cfg.pixel_head:
            nn.init.zeros_(self.pixel_head.fc2.weight)
            nn.init.zeros_(self.pixel_head.fc2.bias)

    def forward(self, batch: PackedLCU, x: Tensor, t: Tensor, indicator_table: Tensor | bool = True,
                x0_prev: Tensor | None = None) -> Tensor:
        """Predict for the target tokens.

        batch: packed LCUs (``with_mask=True``); x ``[L_tgt, C*p*p]`` noisy target tokens in the layout
        of :func:`omniace.engine.lcu.patchify`; t ``[B]`` timesteps (DDPM indices 0..999).
        ``indicator_table``: True uses the model's own ``text_position_embeddings.pos``, a ``[10, Y]``
        tensor overrides it, False adds no indicator embeddings. ``x0_prev`` ``[L_tgt, C*p*p]``: with
        ``cfg.self_condition``, the model's previous x0 estimate of these tokens (None: zeros, as at the first
        sampling step); ValueError when given to a model without it or shaped otherwise than ``x``. Returns
        ``[L_tgt, C*p*p]``.
        """
        cfg = self.cfg
        if not batch.with_mask:
            raise ValueError("ACE batches carry a mask channel: pack(..., with_mask=True)")
        c_lat = cfg.in_channels * cfg.patch_size**2
        if x.shape != (batch.target_index.numel(), c_lat):
            raise ValueError(f"x must be [{batch.target_index.numel()}, {c_lat}], got {tuple(x.shape)}")
        if t.shape != (batch.num_samples,):
            raise ValueError(f"t must be [{batch.num_samples}], got {tuple(t.shape)}")
        check_previous_estimate(cfg, x, x0_prev)
        return self.forward_plan(batch, x, t, indicator_table, x0_prev)

    def forward_plan(self, batch: ACEPlan | PackedLCU, x: Tensor, t: Tensor,
                     indicator_table: Tensor | bool = True, x0_prev: Tensor | None = None) -> Tensor:
        """The forward without input checks, over a batch or an :class:`ACEPlan` (what ONNX export traces)."""
        cfg = self.cfg
        c_lat = cfg.in_channels * cfg.patch_size**2
        dtype = self.x_embedder.proj.weight.dtype
        target_rows = torch.cat([x.to(dtype), batch.tokens[batch.target_index, c_lat:].to(dtype)], dim=1)
        tokens = batch.tokens.to(dtype).index_copy(0, batch.target_index, target_rows)
        h = self.x_embedder(tokens)
        if cfg.absolute_coords:  # PixArt-alpha's absolute position embedding, beside the 3D RoPE
            h = h + sincos_2d(batch.pos[:, 1:], cfg.hidden_size).to(dtype)
        source = has_source = None
        if cfg.source_skip:
            source, has_source = self.source_tokens(batch, c_lat)
        if cfg.source_concat or cfg.self_condition:  # index_select + index_copy: ops the ONNX export carries
            tgt = batch.target_index
            rows = h.index_select(0, tgt)
            if cfg.source_concat:
                rows = rows + self.source_embedder(source.to(dtype))
            if cfg.self_condition:
                x0_prev = torch.zeros_like(x) if x0_prev is None else x0_prev
                rows = rows + self.self_cond_embedder(x0_prev.to(dtype))
            h = h.index_copy(0, tgt, rows)
        y = self.y_embedder(batch.text.to(dtype)).index_select(0, batch.frame_text_index)
        for layer in self.text_refiner:  # per frame's text, before its indicator: the context T5 would give
            y = layer(y, batch.cu_seqlens_frame_txt, batch.max_seqlen_frame_txt)

        table = self.text_position_embeddings.pos if indicator_table is True else indicator_table
        if table is not False and table is not None:
            ind = self.y_embedder(table.to(dtype))
            h = h + ind[batch.indicator]
            y = y + ind[batch.frame_text_indicator]

        t_emb = self.t_embedder(t)
        t_mod = self.t_block(t_emb)
        seg = batch.sample_of_token
        for block in self.blocks:
            h = run_block(block, self.gradient_checkpointing, h, y, t_mod, batch, seg)
        tgt = batch.target_index
        out = self.final_layer(h.index_select(0, tgt), t_emb, seg.index_select(0, tgt))
        if not cfg.source_skip:
            return tokens_pqc_to_cpq(out, cfg.patch_size, cfg.in_channels)
        if cfg.pixel_head:
            # it casts x and source to out's dtype
            t_tgt = t.index_select(0, seg.index_select(0, tgt)) if cfg.pixel_sigma_data else None
            token_rc = batch.pos.index_select(0, tgt)[:, 1:] if cfg.absolute_coords else None
            return self.pixel_head(out, x, source, has_source, batch.target_neighbors, t_tgt, x0_prev, token_rc)
        change = tokens_pqc_to_cpq(out, cfg.patch_size, cfg.in_channels)
        if cfg.source_gate:  # the learned-sigma half, (p, p, 2C) -> its last C channels
            gate = tokens_pqc_to_cpq(out.unflatten(-1, (-1, 2 * cfg.in_channels))[..., cfg.in_channels:].flatten(1),
                                     cfg.patch_size, cfg.in_channels)
            # samples with no source: the gate is 1 (the change is the whole image)
            change = change * torch.where(has_source, torch.sigmoid(gate.float()).to(change.dtype), 1.0)
        return source.to(change.dtype) + change

    @staticmethod
    def source_tokens(batch: ACEPlan | PackedLCU, c_lat: int) -> tuple[Tensor, Tensor]:
        """``([L_tgt, C*p*p], [L_tgt, 1] bool)``: each target token's cell of its sample's source image (zeros
        where the sample has none) and whether it has one. With ``cfg.source_skip`` the model predicts the change
        to the source, so an untrained head copies the source and unchanged regions can stay exact (an x0 model
        must otherwise redraw every pixel). ValueError if the batch has no ``source_index``."""
        idx = batch.source_index
        if idx is None:
            raise ValueError("this model adds the source image (cfg.source_skip): the batch needs source_index "
                             "(engine.lcu.pack computes it)")
        return gather_source(batch.tokens, idx, c_lat)

    def flops(self, frames: list[list[int]], text_lens: list[list[int]]) -> int:
        """Matmul FLOPs of one forward: ``frames[b]`` image tokens per frame, ``text_lens[b]`` per frame (the
        text that frame attends to). ValueError when the two do not give a count for every frame of every sample,
        or a count is negative."""
        if len(frames) != len(text_lens) or any(len(f) != len(t) for f, t in zip(frames, text_lens)):
            raise ValueError(f"frames {frames} and text_lens {text_lens} must give one count per frame of each sample")
        if any(v < 0 for f in (*frames, *text_lens) for v in f):
            raise ValueError(f"token counts must be >= 0, got frames {frames}, text_lens {text_lens}")
        cfg = self.cfg
        d, p = cfg.hidden_size, cfg.patch_size
        n = sum(map(sum, frames))
        tf = sum(map(sum, text_lens))
        attn_self = sum(sum(f) ** 2 for f in frames)
        attn_cross = sum(a * b for fs, ts in zip(frames, text_lens) for a, b in zip(fs, ts))
        per_block = 2 * (4 * n * d * d + 2 * attn_self * d  # self-attention
                         + 2 * n * d * d + 2 * tf * d * d + 2 * attn_cross * d  # cross-attention
                         + 2 * n * d * int(d * cfg.mlp_ratio))  # MLP
        n_tgt = sum(f[0] for f in frames)
        head = self.final_layer.linear.out_features
        embed = 2 * (n * (cfg.in_channels + 1) * p * p * d + tf * (cfg.y_channels * d + d * d) + n_tgt * d * head
                     # the source cells' and the previous estimate's embeddings
                     + n_tgt * cfg.in_channels * p * p * d * (int(cfg.source_concat) + int(cfg.self_condition)))
        attn_txt = sum(b * b for ts in text_lens for b in ts)
        embed += len(self.text_refiner) * 2 * (4 * tf * d * d + 2 * attn_txt * d + 2 * tf * d * int(d * cfg.mlp_ratio))
        if cfg.pixel_head:
            ph = self.pixel_head
            embed += 2 * n_tgt * ph.pixels * (ph.fc1.in_features * ph.fc1.out_features
                                              + ph.fc2.in_features * ph.fc2.out_features + 9 * ph.smooth
                                              + 6 * ph.keys  # per key: distance (8 FLOPs) and kernel (3), ~12
                                              + (6 if ph.sigma_data else 0)  # the Wiener estimate: 2 per channel
                                              + ph.conv * 7 * ph.CONV_KERNEL**2)  # the convolution's MACs
        return cfg.depth * per_block + embed
