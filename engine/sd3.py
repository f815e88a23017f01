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
from .layers import (Interleave, PatchEmbed, RMSNorm, ada_norm, cu_from_lengths, per_row, run_block, timestep_features,
                     tokens_pqc_to_cpq)
from .lcu import PackedLCU


@dataclass
class Segments:
    """A packed stream's per-sample segmentation: ``cu [B+1]`` int32, ``seg [L]`` int64 (the sample of
    each row) and the host launch bound ``max_seqlen``."""

    cu: Tensor
    seg: Tensor
    max_seqlen: int

    @classmethod
    def from_host(cls, host: list[int], device: torch.device | None = None) -> "Segments":
        lengths = [b - a for a, b in zip(host[:-1], host[1:])]
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        return cls(cu_from_lengths(lengths, device), seg.to(device), max(lengths, default=0))


@dataclass
class SD3Plan:
    """Everything one SD3 forward derives from a packed batch, as tensors: computed once per batch on the
    host (``from_batch``, cached on the batch), so the forward itself has no host sync and no Python
    rebuilding per call (CUDA graphs, ``torch.compile(fullgraph=True)``). The field names are the graph
    inputs of ``export/spec.py``; the exported graph builds a plan from its inputs.

    Streams: ``img`` the target tokens, ``txt`` the text; ``joint`` interleaves them per sample for joint
    attention. EditNet adds ``cond`` rows (condition-image tokens of ``tokens``) with their positional rows,
    ``ctrl`` (condition + target per sample) and ``ctrl_joint`` (that with the text). Channel-concat and
    ControlNet-style conditioning take ``aligned_rows``: each target token's condition token.
    """

    text: Tensor
    pooled: Tensor
    pos_index: Tensor
    img: Segments
    txt: Segments
    joint: Interleave
    tokens: Tensor | None = None
    aligned_rows: Tensor | None = None
    cond_rows: Tensor | None = None
    cond_pos_index: Tensor | None = None
    ctrl: Segments | None = None
    ctrl_layout: Interleave | None = None
    ctrl_joint: Interleave | None = None

    @classmethod
    def from_batch(cls, batch: PackedLCU, cfg: SD3Config) -> "SD3Plan":
        """Host work of one batch: segment offsets, joint-attention permutations, positional rows.

        Raises ValueError if a token grid exceeds ``cfg.pos_embed_max_size`` or, for channel-concat and
        ControlNet-style conditioning, if a condition image's grid differs from its target's."""
        dev = batch.device
        max_size = cfg.pos_embed_max_size
        if max(max(g) for g in batch.frame_shapes) > max_size:
            raise ValueError(f"a token grid of {batch.frame_shapes} exceeds pos_embed_max_size {max_size}")
        img_host = batch.cu_seqlens_target()
        txt_host = cu_from_lengths(batch.unit_lengths).tolist()
        img, txt = Segments.from_host(img_host, dev), Segments.from_host(txt_host, dev)
        plan = cls(batch.text, batch.pooled, positional_rows(batch, batch.target_index.cpu(), max_size).to(dev),
                   img, txt, Interleave.from_host([img_host, txt_host], dev))
        needs_cond = cfg.editnet or cfg.concat_condition
        if not needs_cond:
            return plan
        plan.tokens = batch.tokens
        if cfg.concat_condition or cfg.control == "controlnet":
            plan.aligned_rows = aligned_condition_rows(batch)
            return plan
        rows, cond_len, offset = [], [0] * batch.num_samples, 0
        for (gh, gw), s, is_t in zip(batch.frame_shapes, batch.frame_sample, batch.frame_is_target):
            if not is_t:
                rows.append(torch.arange(offset, offset + gh * gw))
                cond_len[s] += gh * gw
            offset += gh * gw
        cond_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        plan.cond_rows = cond_rows.to(dev)
        plan.cond_pos_index = positional_rows(batch, cond_rows, max_size).to(dev)
        cond_host = cu_from_lengths(cond_len).tolist()
        plan.ctrl_layout = Interleave.from_host([cond_host, img_host], dev)
        ctrl_host = plan.ctrl_layout.cu_seqlens.tolist()
        plan.ctrl = Segments.from_host(ctrl_host, dev)
        plan.ctrl_joint = Interleave.from_host([ctrl_host, txt_host], dev)
        return plan


def cached_plan(batch: PackedLCU, cfg: SD3Config) -> SD3Plan:
    """The batch's :class:`SD3Plan` for ``cfg``'s conditioning, built on first use and cached on the batch
    (a sampler's steps and a server's forwards over one packed batch reuse it)."""
    key = ("sd3", cfg.pos_embed_max_size, cfg.editnet, cfg.control, cfg.concat_condition)
    if key not in batch.plans:
        batch.plans[key] = SD3Plan.from_batch(batch, cfg)
    return batch.plans[key]


def positional_rows(batch: PackedLCU, rows: Tensor, max_size: int) -> Tensor:
    """Rows of the ``[max_size**2, D]`` positional table for the given image-token rows: each frame's
    grid centre-cropped from the table (diffusers' ``cropped_pos_embed``). Host tensors in, int64 out."""
    grid = batch.frame_grid.cpu()[batch.frame_of_token.cpu().index_select(0, rows)]
    pos = batch.pos.cpu().index_select(0, rows).long()
    top = (max_size - grid[:, 0]) // 2
    left = (max_size - grid[:, 1]) // 2
    return (top + pos[:, 1]) * max_size + left + pos[:, 2]


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


def split_heads(x: Tensor, heads: int, norm: nn.Module | None) -> Tensor:
    """``[L, heads*Dh] -> [L, heads, Dh]``, then the per-head qk-norm if any."""
    x = x.unflatten(-1, (heads, -1))
    return x if norm is None else norm(x)


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
        return split_heads(x, self.heads, norm)

    def forward(self, img: Tensor, txt: Tensor, layout: Interleave) -> tuple[Tensor, Tensor]:
        q = layout.join(self._heads(self.to_q(img), self.norm_q), self._heads(self.add_q_proj(txt), self.norm_added_q))
        k = layout.join(self._heads(self.to_k(img), self.norm_k), self._heads(self.add_k_proj(txt), self.norm_added_k))
        v = layout.join(self._heads(self.to_v(img), None), self._heads(self.add_v_proj(txt), None))
        o = segment_attention(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
        o_img, o_txt = layout.split(o.flatten(1))
        return self.to_out[0](o_img), (None if self.to_add_out is None else self.to_add_out(o_txt))


class SelfAttention(nn.Module):
    """diffusers ``Attention`` as MMDiT-X's ``attn2``: image-only self-attention per sample (packed segments)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Identity()])
        self.norm_q, self.norm_k = (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm == "rms_norm" else (None, None)

    def forward(self, x: Tensor, seg: Segments) -> Tensor:
        """x ``[L, D]`` packed tokens; attention within each segment of ``seg`` (no host sync)."""
        q = split_heads(self.to_q(x), self.heads, self.norm_q)
        k = split_heads(self.to_k(x), self.heads, self.norm_k)
        v = split_heads(self.to_v(x), self.heads, None)
        o = segment_attention(q, k, v, seg.cu, seg.cu, seg.max_seqlen, seg.max_seqlen)
        return self.to_out[0](o.flatten(1))


@dataclass
class InputModulation:
    """(shift, scale) of a block's input norms, for fusing an injection with them."""

    img_shift: Tensor
    img_scale: Tensor
    txt_shift: Tensor | None
    txt_scale: Tensor | None


class JointBlock(nn.Module):
    """diffusers JointTransformerBlock over packed streams; with ``dual`` (MMDiT-X, SD3.5 Medium) an extra
    image-only self-attention ``attn2`` whose input has its own modulation (SD35AdaLayerNormZeroX: 9 vectors)."""

    def __init__(self, cfg: SD3Config, pre_only: bool, dual: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.pre_only = pre_only
        self.norm1 = _AdaLinear(d, 9 if dual else 6)
        self.attn2 = SelfAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm) if dual else None
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
        # fresh tensors, not chunk views: under FSDP2 this is a gathered forward method, and FSDP hooks its
        # outputs for the backward all-gather (a view's hook is lost to any in-place op, and FSDP warns)
        return InputModulation(shift.clone(), scale.clone(), c_shift.clone(), c_scale.clone())

    def forward(self, h: Tensor, e: Tensor, temb: Tensor, img: Segments, txt: Segments, layout: Interleave,
                h_in: Tensor | None = None, e_in: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """h ``[L_img, D]``, e ``[L_txt, D]``; ``h_in``/``e_in``: inputs already normed and modulated."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(temb)
        ctx = self.norm1_context(temb)
        if h_in is None:
            h_in = ada_norm(h, shift_msa, scale_msa, img.seg)
        if e_in is None:
            c_shift, c_scale = (ctx[1], ctx[0]) if self.pre_only else (ctx[0], ctx[1])
            e_in = ada_norm(e, c_shift, c_scale, txt.seg)
        a_img, a_txt = self.attn(h_in, e_in, layout)
        if self.attn2 is not None:  # both attentions read the block's input h; their gated outputs add up
            shift_msa2, scale_msa2, gate_msa2 = dual
            a2 = self.attn2(ada_norm(h, shift_msa2, scale_msa2, img.seg), img)
            h = h + per_row(gate_msa2, img.seg) * a2
        # gated attention residual fused with the MLP's LayerNorm + modulation
        h, m = editnet_inject(h, a_img, shift_mlp, scale_mlp, gate_msa, img.cu)
        h = h + per_row(gate_mlp, img.seg) * self.ff(m)
        if self.pre_only:
            return h, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ctx
        e, m = editnet_inject(e, a_txt, c_shift_mlp, c_scale_mlp, c_gate_msa, txt.cu)
        return h, e + per_row(c_gate_mlp, txt.seg) * self.ff_context(m)


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

    def positions(self, index: Tensor) -> Tensor:
        """Positional embeddings ``[N, D]`` of table rows ``index [N]`` (see :func:`positional_rows`)."""
        return self.pos_embed[0].index_select(0, index)


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
            JointBlock(cfg, pre_only=i == cfg.num_layers - 1, dual=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers))
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

    def plan(self, batch: PackedLCU) -> SD3Plan:
        """The batch's :class:`SD3Plan` for this model (see :func:`cached_plan`)."""
        return cached_plan(batch, self.cfg)

    def forward(self, batch: PackedLCU, x: Tensor, t: Tensor, control_scale: float | Tensor = 1.0) -> Tensor:
        """x ``[L_tgt, C*p*p]`` noisy target tokens; t ``[B]`` in [0, 1000] (sigma * 1000).

        ``control_scale`` (a float or ``[B]``) gates the EditNet injections per sample.
        """
        self._check(batch, x, t)
        return self.forward_plan(self.plan(batch), x, t, control_scale)

    def forward_plan(self, plan: SD3Plan, x: Tensor, t: Tensor, control_scale: float | Tensor = 1.0) -> Tensor:
        """The forward over a precomputed :class:`SD3Plan` (no host sync): what ONNX export traces."""
        dtype = self.proj_out.weight.dtype
        img, txt, layout = plan.img, plan.txt, plan.joint
        x_in = x.to(dtype)
        if self.cfg.concat_condition:
            c = self.cfg.in_channels * self.cfg.patch_size**2
            x_in = torch.cat([x_in, plan.tokens.index_select(0, plan.aligned_rows)[:, :c].to(dtype)], 1)
        h = self.pos_embed(x_in) + self.pos_embed.positions(plan.pos_index).to(dtype)
        e = self.context_embedder(plan.text.to(dtype))
        temb = self.time_text_embed(t, plan.pooled.to(dtype))
        ctrl = None
        if self.editnet is not None:
            ctrl = self.editnet.start(self.pos_embed, plan, e, temb, control_scale, self.gradient_checkpointing)

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

        def dual(img: list[int]) -> int:  # MMDiT-X's image-only attn2: q, k, v, out projections + attention
            return len(cfg.dual_attention_layers) * 2 * (4 * d * d * sum(img) + 2 * sum(a * a for a in img) * d)

        total = stack(n_img, n_txt) + dual(n_img) + 2 * sum(n_txt) * cfg.joint_attention_dim * d
        total += 2 * sum(n_img) * d * p2 * (cfg.in_channels + cfg.out_channels)
        if self.editnet is not None and n_cond is not None:
            controlnet = cfg.control == "controlnet"  # a parallel branch over the target tokens only
            ctrl_img = n_img if controlnet else [a + c for a, c in zip(n_img, n_cond)]
            total += stack(ctrl_img, n_txt) + dual(ctrl_img)
            total += cfg.num_layers * 2 * d * d * (sum(n_img) + sum(n_txt)) + 2 * sum(n_cond) * d * p2 * cfg.in_channels
        return total
