"""The packed Long-context Condition Unit (LCU) batch.

A batch holds B samples. Sample b is an LCU: an ordered list of condition units (history first, the
current request last). Unit m has an instruction and zero or more images, each with an optional mask;
the current unit also owns the *target* (the latent being generated). Every image keeps its own size.

``pack()`` validates everything (errors name the sample, the unit and the bad value) and produces one
ragged batch with no padding. Token order inside a sample follows ACE: the target is frame 0, then the
condition images of all units in order (frames 1..N). Cross-attention is per image frame: frame f
attends to the text of the unit that owns it (the target belongs to the current unit). This is the
released ACE model's granularity: the target and the current unit's own images see the same
instruction, but each copy gets its own frame's image-indicator embedding (ACE_NOTES §5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .layers import cu_from_lengths

MAX_INDICATORS = 10  # {image}, {image1} ... {image9}: the indicator table has ten rows
_INDICATOR = re.compile(r"\{image(\d*)\}")


@dataclass
class ImageInput:
    """One image in latent space: ``latent [C, h, w]``; ``mask [h, w]`` (or ``[1, h, w]``), ones if None."""

    latent: Tensor
    mask: Tensor | None = None


@dataclass
class ConditionUnit:
    """An instruction with zero or more images.

    ``text`` holds the encoded instruction ``[L, Y]`` (only the valid rows); if None, ``pack`` encodes
    ``instruction`` with its ``text_encoder``. ``pooled [P]`` is the pooled text vector (SD3 family).
    """

    instruction: str
    images: list[ImageInput] = field(default_factory=list)
    text: Tensor | None = None
    pooled: Tensor | None = None


@dataclass
class LCUSample:
    """One sample: its condition units (current last) and the target the current unit asks for."""

    units: list[ConditionUnit]
    target: ImageInput


def indicator_indices(instruction: str) -> list[tuple[str, int]]:
    """The image indicators an instruction names: ``[("{image}", 0), ("{image2}", 2), ...]``."""
    out = []
    for m in _INDICATOR.finditer(instruction):
        idx = int(m.group(1)) if m.group(1) else 0
        out.append((m.group(0), idx))
    return out


def indicator_token(index: int) -> str:
    return "{image}" if index == 0 else f"{{image{index}}}"


def gather_source(tokens: Tensor, source_index: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """``([L_tgt, channels], [L_tgt, 1] bool)``: the first ``channels`` columns of ``tokens`` at each target
    token's source cell (``source_index``, see :class:`PackedLCU`), zeros where it is -1, and where it is not."""
    rows = tokens.index_select(0, source_index.clamp(min=0))[:, :channels]
    has = (source_index >= 0).unsqueeze(1)
    return rows * has.to(rows.dtype), has


def grid_neighbors(gh: int, gw: int) -> Tensor:
    """``[gh*gw, 9]`` int64: for each cell of a row-major ``gh x gw`` grid, the rows of its 3x3 neighbourhood
    (dy, then dx, each -1, 0, 1), a neighbour past the border replaced by the nearest cell on it (replicate
    padding, as ``F.interpolate(..., mode="bilinear", align_corners=False)`` reads the border)."""
    rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows = [(rr + dy).clamp(0, gh - 1) * gw + (cc + dx).clamp(0, gw - 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack([r.flatten() for r in rows], dim=1)


@dataclass
class PackedLCU:
    """One ragged batch of LCUs with no padding.

    Tensors (on one device):
      tokens [L_img, Cin*p*p]   patchified latent ⊕ mask of every frame, sample-major, target first
      text [L_txt, Y]           encoded instruction of every unit, unit-major
      cu_seqlens_frame [F+1]    image tokens of each frame (cross-attention query segments)
      cu_seqlens_sample [B+1]   image tokens of each sample (long-context self-attention segments)
      cu_seqlens_txt [U+1]      text tokens of each unit
      frame_text_index [L_ft]   rows of ``text`` each frame attends to, frame by frame
      cu_seqlens_frame_txt [F+1] segments of ``frame_text_index`` (cross-attention key segments)
      pos [L_img, 3] int32      (frame, row, col) of each image token
      indicator [L_img]         image-indicator id of each image token
      frame_text_indicator [L_ft] indicator id of each frame-text row (its frame's id)
      is_target [L_img] bool    tokens that are denoised and carry the loss
      target_index [L_tgt]      rows of the target tokens; sample_of_token [L_img]; frame_of_token [L_img]
      frame_grid [F, 2]         token grid (gh, gw) of every frame
      source_index [L_tgt]      per target token, the row of the same grid cell in the sample's *source*
                                frame (the current unit's first image, when its grid is the target's),
                                -1 where the sample has none (text-to-image, another size)
      target_neighbors [L_tgt, 9] per target token, the target rows (indices into ``target_index``) of its
                                3x3 grid neighbourhood in its own frame, the border replicated (:func:`grid_neighbors`)
      pooled [B, P] or None     pooled text of each sample's current unit
    Host metadata: per-frame (sample, unit, grid, is_target), per-sample target latent sizes, and the
    ``max_seqlen_*`` launch bounds.
    """

    tokens: Tensor
    text: Tensor
    cu_seqlens_frame: Tensor
    cu_seqlens_sample: Tensor
    cu_seqlens_txt: Tensor
    frame_text_index: Tensor
    cu_seqlens_frame_txt: Tensor
    pos: Tensor
    indicator: Tensor
    frame_text_indicator: Tensor
    is_target: Tensor
    target_index: Tensor
    sample_of_token: Tensor
    frame_of_token: Tensor
    frame_grid: Tensor
    pooled: Tensor | None
    frame_sample: list[int]
    frame_unit: list[int]
    frame_shapes: list[tuple[int, int]]
    frame_is_target: list[bool]
    sample_units: list[list[int]]  # unit ids of each sample, current last
    unit_lengths: list[int]  # text tokens of each unit
    target_sizes: list[tuple[int, int]]  # target latent (h, w) per sample
    latent_channels: int
    patch_size: int
    with_mask: bool
    max_seqlen_frame: int
    max_seqlen_sample: int
    max_seqlen_txt: int
    max_seqlen_frame_txt: int
    source_index: Tensor | None = None
    target_neighbors: Tensor | None = None
    # per-model metadata derived from this batch once (e.g. SD3Plan), keyed by the model's layout
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return len(self.target_sizes)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedLCU":
        """Move tensors to ``device``; ``dtype`` casts the floating tensors (tokens, text, pooled)."""
        out = {}
        for name, value in vars(self).items():
            if name == "plans":
                continue  # plans hold tensors on the old device: the moved batch builds its own
            if isinstance(value, Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            out[name] = value
        return PackedLCU(**out)

    def target_tokens(self) -> Tensor:
        """The latent part ``[L_tgt, C*p*p]`` of the target rows (what the sampler denoises)."""
        c = self.latent_channels * self.patch_size**2
        return self.tokens[self.target_index, :c]

    def cu_seqlens_target(self) -> list[int]:
        """Host offsets of each sample's target tokens inside ``target_tokens()``."""
        cu = [0]
        for (h, w) in self.target_sizes:
            cu.append(cu[-1] + (h // self.patch_size) * (w // self.patch_size))
        return cu

    def targets_from_tokens(self, tokens: Tensor) -> list[Tensor]:
        """Unpatchify packed target tokens ``[L_tgt, C*p*p]`` into one ``[C, h, w]`` latent per sample."""
        cu = self.cu_seqlens_target()
        return [
            unpatchify(tokens[cu[b] : cu[b + 1]], h, w, self.patch_size)
            for b, (h, w) in enumerate(self.target_sizes)
        ]

    def tokens_from_targets(self, latents: list[Tensor]) -> Tensor:
        """Patchify one ``[C, h, w]`` latent per sample into packed target tokens."""
        if len(latents) != self.num_samples:
            raise ValueError(f"expected {self.num_samples} target latents, got {len(latents)}")
        return torch.cat([patchify(x, self.patch_size) for x in latents], dim=0)


def patchify(x: Tensor, p: int) -> Tensor:
    """``[C, h, w] -> [(h/p)*(w/p), C*p*p]`` with (channel, row-in-patch, col-in-patch) order."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[(h/p)*(w/p), C*p*p] -> [C, h, w]``."""
    c = tokens.shape[1] // (p * p)
    return tokens.reshape(h // p, w // p, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h, w)


def _where(b: int, m: int | None = None, image: int | None = None) -> str:
    s = f"sample {b}"
    if m is not None:
        s += f", unit {m}"
    if image is not None:
        s += f", image {image}" if image >= 0 else ", target"
    return s


def _check_image(img: ImageInput, where: str, p: int, codec_factor: int, channels: int | None,
                 with_mask: bool) -> None:
    lat = img.latent
    if not isinstance(lat, Tensor) or lat.dim() != 3:
        raise ValueError(f"{where}: latent must be a [C, h, w] tensor, got {tuple(getattr(lat, 'shape', ()))}")
    if not lat.is_floating_point():
        raise ValueError(f"{where}: latent must be floating point, got {lat.dtype}")
    c, h, w = lat.shape
    if channels is not None and c != channels:
        raise ValueError(f"{where}: latent has {c} channels, expected {channels} like the rest of the batch")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(
            f"{where}: latent size {h}x{w} is not a positive multiple of the patch size {p} "
            f"(image sides must be multiples of patch x codec factor = {p * codec_factor} pixels)"
        )
    if img.mask is not None:
        if not with_mask:
            raise ValueError(f"{where}: this model takes no masks, but a mask was given")
        m = img.mask
        if m.dim() == 3 and m.shape[0] == 1:
            m = m[0]
        if tuple(m.shape) != (h, w):
            raise ValueError(f"{where}: mask shape {tuple(img.mask.shape)} does not match the latent {h}x{w}")


def validate(samples: list[LCUSample], patch_size: int, codec_factor: int = 8, with_mask: bool = True) -> None:
    """Check a batch before any device work; every error names the sample, unit and value."""
    if not isinstance(samples, (list, tuple)) or not samples:
        raise ValueError("a batch needs at least one LCUSample")
    channels = None
    for b, s in enumerate(samples):
        if not isinstance(s, LCUSample):
            raise TypeError(f"sample {b} must be an LCUSample, got {type(s).__name__}")
        if not s.units:
            raise ValueError(f"{_where(b)}: has no condition units (the current instruction is required)")
        _check_image(s.target, _where(b, len(s.units) - 1, -1), patch_size, codec_factor, channels, with_mask)
        channels = s.target.latent.shape[0]
        n_images = sum(len(u.images) for u in s.units)
        if n_images > MAX_INDICATORS - 1:
            raise ValueError(f"{_where(b)}: has {n_images} condition images; at most {MAX_INDICATORS - 1} "
                             f"fit the image-indicator table ({{image}} .. {{image9}} and the target)")
        for m, u in enumerate(s.units):
            if not isinstance(u.instruction, str):
                raise TypeError(f"{_where(b, m)}: instruction must be a str, got {type(u.instruction).__name__}")
            if m < len(s.units) - 1 and not u.images:
                raise ValueError(f"{_where(b, m)}: a history unit needs at least one image "
                                 f"(its instruction would reach no image token)")
            for j, img in enumerate(u.images):
                _check_image(img, _where(b, m, j), patch_size, codec_factor, channels, with_mask)
            for token, idx in indicator_indices(u.instruction):
                if idx >= n_images:
                    have = ", ".join(indicator_token(i) for i in range(n_images)) or "none"
                    raise ValueError(f"{_where(b, m)}: instruction names {token} but the sample has "
                                     f"{n_images} condition image(s) ({have})")
            if u.text is not None and (u.text.dim() != 2 or not u.text.is_floating_point()):
                raise ValueError(f"{_where(b, m)}: text must be a float [L, Y] tensor, got "
                                 f"{u.text.dtype} {tuple(u.text.shape)}")


TextEncodeFn = Callable[[list[str]], list[Tensor]]


def pack(
    samples: list[LCUSample],
    patch_size: int,
    *,
    codec_factor: int = 8,
    with_mask: bool = True,
    text_encoder: TextEncodeFn | None = None,
    device: torch.device | str | None = None,
) -> PackedLCU:
    """Validate and pack samples into one ragged :class:`PackedLCU` (no padding)."""
    validate(samples, patch_size, codec_factor, with_mask)
    p = patch_size
    missing = [u.instruction for s in samples for u in s.units if u.text is None]
    encoded = iter(text_encoder(missing) if missing and text_encoder is not None else [])
    if missing and text_encoder is None:
        raise ValueError("some units have no encoded text and pack() was given no text_encoder")

    tok_rows, pos_rows, ind_rows, tgt_rows, txt_rows = [], [], [], [], []
    frame_sample, frame_unit, frame_shapes, frame_is_target = [], [], [], []
    sample_units, target_sizes, pooled = [], [], []
    unit_offsets, frame_txt_len, frame_txt_ind = [0], [], []
    unit_id, y_dim = 0, None
    src_rows, row0 = [], 0  # source_index per target token; row0: first image-token row of this sample
    nbr_rows, tgt_row0 = [], 0  # target_neighbors per target token; tgt_row0: first target row of this sample
    for b, s in enumerate(samples):
        # frames: (image, unit index, is_target) in ACE order: target, then conditions in unit order
        frames = [(s.target, len(s.units) - 1, True)]
        frames += [(img, m, False) for m, u in enumerate(s.units) for img in u.images]
        n_frames = len(frames)
        ids = []
        for m, u in enumerate(s.units):
            text = u.text if u.text is not None else next(encoded)
            if y_dim is None:
                y_dim = text.shape[1]
            if text.shape[1] != y_dim:
                raise ValueError(f"{_where(b, m)}: text width {text.shape[1]} differs from the batch's {y_dim}")
            txt_rows.append(text.float())
            unit_offsets.append(unit_offsets[-1] + text.shape[0])
            ids.append(unit_id)
            unit_id += 1
        sample_units.append(ids)
        cur = s.units[-1].pooled
        pooled.append(cur)
        # the source frame: the current unit's first image (frame 1 + the history's images), if target-sized
        current = s.units[-1].images
        n_tgt = (s.target.latent.shape[1] // p) * (s.target.latent.shape[2] // p)
        source_frame = n_frames - len(current) if current and \
            current[0].latent.shape[1:] == s.target.latent.shape[1:] else None
        frame_row = row0
        for f, (img, m, is_tgt) in enumerate(frames):
            if f == source_frame:
                src_rows.append(torch.arange(frame_row, frame_row + n_tgt))
            lat = img.latent.float()
            c, h, w = lat.shape
            gh, gw = h // p, w // p
            chans = [lat]
            if with_mask:
                mask = torch.ones(1, h, w) if img.mask is None else img.mask.reshape(1, h, w).float()
                chans.append(mask.to(lat.device))
            tok_rows.append(patchify(torch.cat(chans, dim=0), p))
            rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            pos_rows.append(torch.stack([torch.full((gh * gw,), f), rr.flatten(), cc.flatten()], dim=1))
            # ACE: target takes indicator F-1 (the next free one), condition frame f takes f-1
            ind = n_frames - 1 if is_tgt else f - 1
            ind_rows.append(torch.full((gh * gw,), ind))
            tgt_rows.append(torch.full((gh * gw,), is_tgt))
            frame_sample.append(b)
            frame_unit.append(ids[m])
            frame_shapes.append((gh, gw))
            frame_is_target.append(is_tgt)
            frame_txt_ind.append(ind)
            frame_row += gh * gw
            if is_tgt:
                target_sizes.append((h, w))
                nbr_rows.append(tgt_row0 + grid_neighbors(gh, gw))
                tgt_row0 += gh * gw
        if source_frame is None:
            src_rows.append(torch.full((n_tgt,), -1))
        row0 = frame_row
    for u in frame_unit:
        frame_txt_len.append(unit_offsets[u + 1] - unit_offsets[u])

    frame_len = [gh * gw for gh, gw in frame_shapes]
    sample_len = [0] * len(samples)
    for b, n in zip(frame_sample, frame_len):
        sample_len[b] += n
    frame_text_index = torch.cat(
        [torch.arange(unit_offsets[u], unit_offsets[u + 1]) for u in frame_unit]
    ) if frame_unit else torch.zeros(0, dtype=torch.long)
    frame_text_indicator = torch.repeat_interleave(torch.tensor(frame_txt_ind), torch.tensor(frame_txt_len))
    is_target = torch.cat(tgt_rows)
    if any(x is not None for x in pooled):
        if any(x is None for x in pooled):
            raise ValueError("either every sample's current unit has a pooled text vector or none does")
        pooled_t = torch.stack([x.float() for x in pooled])
    else:
        pooled_t = None

    unit_len = [unit_offsets[i + 1] - unit_offsets[i] for i in range(len(unit_offsets) - 1)]
    batch = PackedLCU(
        tokens=torch.cat(tok_rows),
        text=torch.cat(txt_rows),
        cu_seqlens_frame=cu_from_lengths(frame_len),
        cu_seqlens_sample=cu_from_lengths(sample_len),
        cu_seqlens_txt=cu_from_lengths(unit_len),
        frame_text_index=frame_text_index.long(),
        cu_seqlens_frame_txt=cu_from_lengths(frame_txt_len),
        pos=torch.cat(pos_rows).to(torch.int32),
        indicator=torch.cat(ind_rows).long(),
        frame_text_indicator=frame_text_indicator.long(),
        is_target=is_target,
        target_index=is_target.nonzero().flatten(),
        sample_of_token=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(sample_len)),
        frame_of_token=torch.repeat_interleave(torch.arange(len(frame_len)), torch.tensor(frame_len)),
        frame_grid=torch.tensor(frame_shapes, dtype=torch.long).reshape(-1, 2),
        pooled=pooled_t,
        frame_sample=frame_sample,
        frame_unit=frame_unit,
        frame_shapes=frame_shapes,
        frame_is_target=frame_is_target,
        sample_units=sample_units,
        unit_lengths=unit_len,
        target_sizes=target_sizes,
        latent_channels=samples[0].target.latent.shape[0],
        patch_size=p,
        with_mask=with_mask,
        max_seqlen_frame=max(frame_len),
        max_seqlen_sample=max(sample_len),
        max_seqlen_txt=max(unit_len),
        max_seqlen_frame_txt=max(frame_txt_len),
        source_index=torch.cat(src_rows).long(),
        target_neighbors=torch.cat(nbr_rows).long(),
    )
    return batch if device is None else batch.to(device)
