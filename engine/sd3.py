"""SD3 MMDiT over packed batches (diffusers ``SD3Transformer2DModel`` keys), with optional EditNet.

Joint attention of text and image tokens per sample, AdaLayerNormZero on both streams, the last block
context-pre-only. Samples are packed with no padding: each sample's image and text rows are gathered
together for one varlen ``segment_attention`` call. The EditNet control branch lives in
``editnet.py``; its injections are fused with the next block's input modulation via ``editnet_inject``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from omniace.kernels import editnet_inject, segment_attention

from .config import SD3Config
from .layers import (Interleave, PatchEmbed, RMSNorm, ada_norm, cu_from_lengths, run_block, timestep_features,
                     tokens_pqc_to_cpq)
from .lcu import PackedLCU


@dataclass
class Segments:
    """A packed stream's per-sample segmentation, on device and on host."""

    cu: Tensor
    seg: Tensor
    host: list[int]

    @classmethod
    def from_host(cls, host: list[int], device: torch.device) -> "Segments":
        lengths = [b - a for a, b in zip(host[:-1], host[1:])]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
        return cls(cu_from_lengths(lengths, device), seg, host)


class _Linear2(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = _Linear2(256, dim)
        self.text_embedder = _Linear2(pooled_dim, dim)

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        feats = timestep_features(t, 256).to(pooled.dtype)
        return self.timestep_embedder(feats) + self.text_embedder(pooled)


class _AdaLinear(nn.Module):
    """``linear(SiLU(temb))`` split into ``n`` modulation vectors (AdaLayerNormZero / Continuous)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


class FeedForward(nn.Module):
    """diffusers FeedForward with ``gelu-approximate``: keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, dim * mult)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, pre_only: bool, qk_norm: str | None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Identity()])
        self.to_add_out = None if pre_only else nn.Linear(heads * head_dim, dim)
        if qk_norm == "rms_norm":
            self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        else:
            self.norm_q = self.norm_k = self.norm_added_q = self.norm_added_k = None

    def _heads(self, x: Tensor, norm: nn.Module | None) -> Tensor:
        x = x.unflatten(-1, (self.heads, -1))
        return x if norm is None else norm(x)

    def forward(self, img: Tensor, txt: Tensor, layout: Interleave) -> tuple[Tensor, Tensor]:
        q = layout.join(self._heads(self.to_q(img), self.norm_q), self._heads(self.add_q_proj(txt), self.norm_added_q))
        k = layout.join(self._heads(self.to_k(img), self.norm_k), self._heads(self.add_k_proj(txt), self.norm_added_k))
        v = layout.join(self._heads(self.to_v(img), None), self._heads(self.add_v_proj(txt), None))
        o = segment_attention(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
        o_img, o_txt = layout.split(o.flatten(1))
        return self.to_out[0](o_img), (None if self.to_add_out is None else self.to_add_out(o_txt))


@dataclass
class InputModulation:
    """(shift, scale) of a block's input norms, for fusing an injection with them."""

    img_shift: Tensor
    img_scale: Tensor
    txt_shift: Tensor | None
    txt_scale: Tensor | None


class JointBlock(nn.Module):
    """diffusers JointTransformerBlock (without dual attention) over packed streams."""

    def __init__(self, cfg: SD3Config, pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.pre_only = pre_only
        self.norm1 = _AdaLinear(d, 6)
        self.norm1_context = _AdaLinear(d, 2 if pre_only else 6)
        self.attn = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, pre_only, cfg.qk_norm)
        self.ff = FeedForward(d)
        self.ff_context = None if pre_only else FeedForward(d)

    def input_modulation(self, temb: Tensor) -> InputModulation:
        shift, scale = self.norm1(temb)[:2]
        if self.pre_only:  # AdaLayerNormContinuous: (scale, shift) order
            c_scale, c_shift = self.norm1_context(temb)
        else:
            c_shift, c_scale = self.norm1_context(temb)[:2]
        return InputModulation(shift, scale, c_shift, c_scale)

    def forward(self, h: Tensor, e: Tensor, temb: Tensor, img: Segments, txt: Segments, layout: Interleave,
                h_in: Tensor | None = None, e_in: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """h ``[L_img, D]``, e ``[L_txt, D]``; ``h_in``/``e_in``: inputs already normed and modulated."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        ctx = self.norm1_context(temb)
        if h_in is None:
            h_in = ada_norm(h, shift_msa, scale_msa, img.seg)
        if e_in is None:
            c_shift, c_scale = (ctx[1], ctx[0]) if self.pre_only else (ctx[0], ctx[1])
            e_in = ada_norm(e, c_shift, c_scale, txt.seg)
        a_img, a_txt = self.attn(h_in, e_in, layout)
        # gated attention residual fused with the MLP's LayerNorm + modulation
        h, m = editnet_inject(h, a_img, shift_mlp, scale_mlp, gate_msa, img.cu)
        h = h + gate_mlp[img.seg] * self.ff(m)
        if self.pre_only:
            return h, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ctx
        e, m = editnet_inject(e, a_txt, c_shift_mlp, c_scale_mlp, c_gate_msa, txt.cu)
        return h, e + c_gate_mlp[txt.seg] * self.ff_context(m)


def sincos_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """diffusers' 2D sin-cos table ``[1, grid*grid, dim]`` (overwritten by a loaded checkpoint)."""
    coords = torch.arange(grid, dtype=torch.float64) / (grid / base_size)

    def one_d(d: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gw, gh = torch.meshgrid(coords, coords, indexing="xy")
    emb = torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1)
    return emb.float()[None]


class SD3PatchEmbed(PatchEmbed):
    def __init__(self, cfg: SD3Config):
        # channel-concat conditioning: the source latent's channels follow the noisy target's
        super().__init__(cfg.in_channels * (2 if cfg.concat_condition else 1), cfg.hidden_size, cfg.patch_size)
        self.max_size = cfg.pos_embed_max_size
        table = sincos_2d(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table, persistent=True)

    def positions(self, batch: PackedLCU, rows: Tensor) -> Tensor:
        """Centre-cropped positional embedding of the given image-token rows (diffusers' crop)."""
        grid = batch.frame_grid[batch.frame_of_token.index_select(0, rows)]
        if int(batch.frame_grid.max()) > self.max_size:
            raise ValueError(f"a token grid of {batch.frame_shapes} exceeds pos_embed_max_size {self.max_size}")
        pos = batch.pos.index_select(0, rows).long()
        top = (self.max_size - grid[:, 0]) // 2
        left = (self.max_size - grid[:, 1]) // 2
        return self.pos_embed[0].index_select(0, (top + pos[:, 1]) * self.max_size + left + pos[:, 2])


def aligned_condition_rows(batch: PackedLCU) -> Tensor:
    """Rows of each sample's condition image, token for token with its target (same grid required):
    what channel-concat and ControlNet-style conditioning add to the target tokens."""
    rows, offset, target_grid = [], 0, {}
    for (gh, gw), s, is_t in zip(batch.frame_shapes, batch.frame_sample, batch.frame_is_target):
        if is_t:
            target_grid[s] = (gh, gw)
        else:
            if (gh, gw) != target_grid[s]:
                raise ValueError(f"sample {s}: condition grid {gh}x{gw} differs from the target's "
                                 f"{target_grid[s][0]}x{target_grid[s][1]}; this conditioning adds them token "
                                 f"for token, so they must have the same size")
            rows.append(torch.arange(offset, offset + gh * gw))
        offset += gh * gw
    if len(rows) != batch.num_samples:
        raise ValueError(f"every sample needs exactly one condition image here; got {len(rows)} for "
                         f"{batch.num_samples} samples")
    return torch.cat(rows).to(batch.device)


class SD3Model(nn.Module):
    """SD3 MMDiT; with ``cfg.editnet`` an EditNet control branch conditions it on the source image.

    ``forward(batch, x, t)`` predicts the flow velocity for the packed target tokens ``x``.
    """

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.pos_embed = SD3PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(cfg, pre_only=i == cfg.num_layers - 1) for i in range(cfg.num_layers))
        self.norm_out = _AdaLinear(d, 2)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False  # recompute each block (base and control) in the backward
        self.editnet = None
        if cfg.editnet:
            from .editnet import EditNet

            self.editnet = EditNet(self)

    def base_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("editnet.")}

    def _check(self, batch: PackedLCU, x: Tensor, t: Tensor) -> None:
        if batch.with_mask:
            raise ValueError("SD3 batches carry no mask channel: pack(..., with_mask=False)")
        for b, units in enumerate(batch.sample_units):
            if len(units) != 1:
                raise ValueError(f"sample {b}: the SD3 family takes one condition unit per sample, got {len(units)}")
        n_cond = [0] * batch.num_samples
        for s, is_t in zip(batch.frame_sample, batch.frame_is_target):
            n_cond[s] += not is_t
        limit = 1 if (self.editnet is not None or self.cfg.concat_condition) else 0
        bad = [b for b, n in enumerate(n_cond) if n > limit]
        if bad:
            raise ValueError(f"sample {bad[0]}: has {n_cond[bad[0]]} condition images; this model takes at most {limit}")
        if batch.pooled is None:
            raise ValueError("SD3 needs a pooled text vector per sample (ConditionUnit.pooled)")
        c = self.cfg.in_channels * self.cfg.patch_size**2
        if x.shape != (batch.target_index.numel(), c):
            raise ValueError(f"x must be [{batch.target_index.numel()}, {c}], got {tuple(x.shape)}")
        if t.shape != (batch.num_samples,):
            raise ValueError(f"t must be [{batch.num_samples}], got {tuple(t.shape)}")

    def forward(self, batch: PackedLCU, x: Tensor, t: Tensor, control_scale: float | Tensor = 1.0) -> Tensor:
        """x ``[L_tgt, C*p*p]`` noisy target tokens; t ``[B]`` in [0, 1000] (sigma * 1000).

        ``control_scale`` (a float or ``[B]``) gates the EditNet injections per sample.
        """
        self._check(batch, x, t)
        dtype = self.proj_out.weight.dtype
        dev = x.device
        img = Segments.from_host(batch.cu_seqlens_target(), dev)
        txt = Segments.from_host(cu_from_lengths(batch.unit_lengths).tolist(), dev)
        layout = Interleave([img.host, txt.host], dev)

        x_in = x.to(dtype)
        if self.cfg.concat_condition:
            c = self.cfg.in_channels * self.cfg.patch_size**2
            x_in = torch.cat([x_in, batch.tokens.index_select(0, aligned_condition_rows(batch))[:, :c].to(dtype)], 1)
        h = self.pos_embed(x_in) + self.pos_embed.positions(batch, batch.target_index).to(dtype)
        e = self.context_embedder(batch.text.to(dtype))
        temb = self.time_text_embed(t, batch.pooled.to(dtype))
        ctrl = None
        if self.editnet is not None:
            ctrl = self.editnet.start(self.pos_embed, batch, e, temb, img, txt, control_scale,
                                      self.gradient_checkpointing)

        h_in = e_in = None
        n = len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            if ctrl is not None:
                ctrl.step(i, h)  # the control block sees the main tokens entering block i
            h, e = run_block(block, self.gradient_checkpointing, h, e, temb, img, txt, layout, h_in, e_in)
            if ctrl is not None:
                nxt = self.transformer_blocks[i + 1].input_modulation(temb) if i + 1 < n else self.output_modulation(temb)
                h, h_in, e, e_in = ctrl.inject(i, h, e, nxt)
        if h_in is None:
            mod = self.output_modulation(temb)
            h_in = ada_norm(h, mod.img_shift, mod.img_scale, img.seg)
        out = self.proj_out(h_in)
        return tokens_pqc_to_cpq(out, self.cfg.patch_size, self.cfg.out_channels)

    def output_modulation(self, temb: Tensor) -> InputModulation:
        scale, shift = self.norm_out(temb)
        return InputModulation(shift, scale, None, None)

    def flops(self, n_img: list[int], n_txt: list[int], n_cond: list[int] | None = None) -> int:
        """Matmul FLOPs of one forward for per-sample target, text and condition token counts."""
        cfg = self.cfg
        d = cfg.hidden_size
        p2 = cfg.patch_size**2

        def stack(img: list[int], txt: list[int]) -> int:
            n, tt = sum(img), sum(txt)
            attn = sum((a + b) ** 2 for a, b in zip(img, txt))
            return cfg.num_layers * 2 * ((4 * d * d + 8 * d * d) * (n + tt) + 2 * attn * d)

        total = stack(n_img, n_txt) + 2 * sum(n_txt) * cfg.joint_attention_dim * d
        total += 2 * sum(n_img) * d * p2 * (cfg.in_channels + cfg.out_channels)
        if self.editnet is not None and n_cond is not None:
            controlnet = cfg.control == "controlnet"  # a parallel branch over the target tokens only
            total += stack(n_img if controlnet else [a + c for a, c in zip(n_img, n_cond)], n_txt)
            total += cfg.num_layers * 2 * d * d * (sum(n_img) + sum(n_txt)) + 2 * sum(n_cond) * d * p2 * cfg.in_channels
        return total
