"""The user API: ``EditPipeline.edit(images, instruction, ...)`` and multi-turn ``EditSession``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .codec import PixelCodec
from .config import ACEConfig, SD3Config, get_config
from .lcu import ConditionUnit, ImageInput, LCUSample, indicator_indices, indicator_token, pack, unpatchify
from .model import build_model
from .sampler import guide, initial_noise, make_sampler
from .text import TinyTextEncoder, indicator_table


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """PIL image or RGB uint8 ``[H, W, 3]`` array -> ``[3, H, W]`` in [-1, 1]."""
    rgb = image if isinstance(image, np.ndarray) else image.convert("RGB")
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(image: Tensor) -> Image.Image:
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def mask_to_latent(mask: Image.Image | Tensor, h: int, w: int) -> Tensor:
    """A user mask (white = edit) binarised at > 128 and resized nearest-exact to the latent grid.

    A mask with no set pixel becomes all ones (edit everywhere), as in ACE.
    """
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32)) if isinstance(mask, Image.Image) else mask
    m = (m.float().reshape(1, 1, *m.shape[-2:]) > 128).float()
    m = F.interpolate(m, size=(h, w), mode="nearest-exact")[0, 0]
    return m if m.any() else torch.ones_like(m)


DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "ace-small-edit.safetensors"


def tiny_text_encoder(cfg: ACEConfig | SD3Config) -> TinyTextEncoder:
    """The fixed-seed byte-level encoder that the tiny presets train and run with."""
    if isinstance(cfg, ACEConfig):
        return TinyTextEncoder(cfg.y_channels, max_len=cfg.text_len)
    return TinyTextEncoder(cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim,
                           max_len=cfg.text_len)


@dataclass
class Turn:
    instruction: str  # with indicators already renamed to sample-global indices
    images: list[Image.Image]
    masks: list[Image.Image | None]


class EditPipeline:
    """Edit or generate images with an ACE or SD3(+EditNet) model, a text encoder and a codec."""

    def __init__(self, model, text_encoder, codec, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.text_encoder = text_encoder
        self.codec = codec
        self.device = device
        self.cfg = model.cfg
        self.is_ace = isinstance(self.cfg, ACEConfig)
        if codec.factor != self.cfg.codec_factor:
            raise ValueError(f"codec factor {codec.factor} differs from the model's codec_factor {self.cfg.codec_factor}")

    @classmethod
    def pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> "EditPipeline":
        """The embedded default: ``ace-small`` trained on the synthetic OmniEdit-style corpus (README recipe),
        with its byte-level text encoder and the pixel codec. ``path`` loads another trainer export."""
        from .model import load_model

        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained weights there; train them with the README's recipe "
                                    f"(python -m omniace.train.trainer ... --preset ace-small)")
        model = load_model(path)
        text_dim = model.cfg.y_channels if isinstance(model.cfg, ACEConfig) else model.cfg.joint_attention_dim
        if model.cfg.codec_factor != 4 or text_dim != 32:
            raise ValueError(f"{path}: not a tiny pixel-space model (codec_factor 4, byte-level text); "
                             f"use EditPipeline(model, text_encoder, codec) for it")
        return cls(model, tiny_text_encoder(model.cfg), PixelCodec(model.cfg.codec_factor), device=device)

    @classmethod
    def tiny(cls, family: str = "ace", seed: int = 0) -> "EditPipeline":
        """An untrained tiny model (tests, shapes and timing; :meth:`pretrained` is the trained default)."""
        cfg = get_config("ace-tiny" if family == "ace" else "sd3-tiny-editnet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
        text = tiny_text_encoder(cfg)
        if family == "ace":
            with torch.no_grad():
                model.text_position_embeddings.pos.copy_(indicator_table(text))
        return cls(model, text, PixelCodec(cfg.codec_factor))

    @property
    def multiple(self) -> int:
        return self.cfg.patch_size * self.cfg.codec_factor

    def _latent(self, image: Image.Image) -> Tensor:
        w, h = image.size
        m = self.multiple
        if w % m or h % m:
            raise ValueError(f"image size {w}x{h} is not a multiple of patch x codec factor = {m} pixels; "
                             f"resize or crop it first")
        return self.codec.encode(to_tensor(image))

    def _unit(self, turn: Turn) -> ConditionUnit:
        images = []
        for img, mask in zip(turn.images, turn.masks):
            lat = self._latent(img)
            images.append(ImageInput(lat, None if mask is None or not self.is_ace else mask_to_latent(mask, *lat.shape[1:])))
        return ConditionUnit(turn.instruction, images)

    def _encode(self, texts: list[str]) -> list[Tensor]:
        return [e.tokens for e in self.text_encoder.encode(texts)]

    @torch.no_grad()
    def run(self, history: list[Turn], current: Turn, size: tuple[int, int] | None, steps: int,
            guidance: float, rescale: float, seed: int, negative: str) -> Image.Image:
        units = [self._unit(t) for t in history] + [self._unit(current)]
        if units[-1].images:  # editing: the target takes the size (and mask) of the first current image
            first = units[-1].images[0]
            target = ImageInput(torch.zeros_like(first.latent), first.mask)
        else:
            if size is None:
                raise ValueError("text-to-image needs size=(width, height)")
            w, h = size
            if w % self.multiple or h % self.multiple:
                raise ValueError(f"size {w}x{h} is not a multiple of {self.multiple} pixels")
            f = self.codec.factor
            target = ImageInput(torch.zeros(self.codec.latent_channels, h // f, w // f))
        encs = self.text_encoder.encode([u.instruction for u in units] + [negative])
        for u, e in zip(units, encs):
            u.text, u.pooled = e.tokens, e.pooled
        neg_units = [ConditionUnit(u.instruction, u.images, u.text, u.pooled) for u in units[:-1]]
        neg_units.append(ConditionUnit(negative, units[-1].images, encs[-1].tokens, encs[-1].pooled))
        samples = [LCUSample(units, target)]
        if guidance != 1.0:
            samples.append(LCUSample(neg_units, target))
        batch = pack(samples, self.cfg.patch_size, codec_factor=self.cfg.codec_factor, with_mask=self.is_ace,
                     device=self.device)
        cu = batch.cu_seqlens_target()
        n1 = cu[1]

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            xs = torch.cat([x, x]) if len(samples) == 2 else x
            ts = torch.cat([t, t]) if len(samples) == 2 else t
            out = self.model(batch, xs, ts.to(self.device))
            if len(samples) == 1:
                return out
            return guide(out[:n1], out[n1:], guidance, rescale, cu[:2])

        sampler = make_sampler(self.cfg.prediction, steps)
        (h, w), patch = batch.target_sizes[0], self.cfg.patch_size
        x = initial_noise([(h, w)], patch, seed, self.codec.latent_channels).to(self.device)
        x = sampler.sample(denoise, x, 1)
        latent = unpatchify(x.cpu(), h, w, patch)
        return to_pil(self.codec.decode(latent))

    def edit(self, images: Image.Image | list[Image.Image] | None, instruction: str,
             masks: Image.Image | list | None = None, steps: int = 20, guidance: float = 4.5,
             rescale: float = 0.5, seed: int = 0, negative: str = "",
             size: tuple[int, int] | None = None) -> list[Image.Image]:
        """Edit ``images`` (the first is the one edited) following ``instruction``; returns ``[PIL]``.

        With no images, generates an image of ``size`` (width, height). ``masks`` (white = edit) go with
        the images in order (ACE family). ``{image}``, ``{image1}`` ... name the images.
        """
        images = [] if images is None else ([images] if isinstance(images, Image.Image) else list(images))
        masks = [masks] if isinstance(masks, Image.Image) else list(masks or [])
        if len(masks) > len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        masks += [None] * (len(images) - len(masks))
        if masks and any(m is not None for m in masks) and not self.is_ace:
            raise ValueError("masks are used by the ACE family only")
        return [self.run([], Turn(instruction, images, masks), size, steps, guidance, rescale, seed, negative)]


class EditSession:
    """Multi-turn editing: earlier turns stay in the LCU as history units (ACE chat mode).

    Each turn's ``{image}``, ``{image1}`` ... name that turn's own images; they are renamed to their
    index in the whole context (``{imageN}``), since history images come first in frame order.
    """

    def __init__(self, pipe: EditPipeline):
        if not pipe.is_ace:
            raise ValueError("multi-turn sessions need the ACE family (the SD3 EditNet takes one unit)")
        self.pipe = pipe
        self.history: list[Turn] = []
        self.last: Image.Image | None = None

    def _n_images(self) -> int:
        return sum(len(t.images) for t in self.history)

    def rename(self, instruction: str, n_local: int) -> str:
        offset = self._n_images()
        for token, idx in indicator_indices(instruction):
            if idx >= n_local:
                raise ValueError(f"turn {len(self.history)}: instruction names {token} but the turn has "
                                 f"{n_local} image(s)")
        return re.sub(r"\{image(\d*)\}", lambda m: indicator_token(offset + int(m.group(1) or 0)), instruction)

    def edit(self, instruction: str, images: list[Image.Image] | None = None,
             masks: list | None = None, **kw) -> Image.Image:
        """One turn; ``images`` defaults to the previous output. Returns the new image."""
        if images is None:
            images = [] if self.last is None else [self.last]
        masks = list(masks or []) + [None] * (len(images) - len(masks or []))
        turn = Turn(self.rename(instruction, len(images)), list(images), masks)
        out = self.pipe.run(self.history, turn, kw.pop("size", None), kw.pop("steps", 20),
                            kw.pop("guidance", 4.5), kw.pop("rescale", 0.5), kw.pop("seed", 0),
                            kw.pop("negative", ""))
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if turn.images:
            self.history.append(turn)
        self.last = out
        return out
