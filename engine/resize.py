"""Any input size: bring an image to the model's grid and its output back, as diffusers' ``VaeImageProcessor`` does.

The grid is ``m = patch_size x codec_factor`` pixels. An image of ``w x h`` pixels is fitted by :func:`fit`:

- its aspect is kept and it is scaled down (never up) to at most ``max_pixels`` pixels (the model's pixel budget,
  :func:`pixel_budget`) and at most ``max_side`` pixels a side (SD3's position table);
- each side is then rounded down to a multiple of ``m`` (``VaeImageProcessor.get_default_height_width``);
- ``mode="resize"`` resizes the image to that size (Lanczos; the aspect may change by under ``m`` pixels a side,
  ``resize_mode="default"``); ``mode="crop"`` resizes it to cover that size with its aspect kept, then crops the
  centre (``resize_mode="crop"``, the same geometry); ``mode="error"`` refuses a size off the grid, as before
  this module (no budget: the pipeline's ``max_tokens`` refuses what is too large).

A mask follows its image through the same geometry with nearest-neighbour resampling. The model's output comes
back at the input's size with :meth:`Fit.restore`: resized back (``resize``), or pasted back over the cropped
region of the input, whose margins stay the input's own pixels (``crop``). An image whose fitted side would be
under ``m`` pixels (``1x300`` at ``m = 8``) is refused with a ``ValueError`` naming it. A text-to-image size
is generated on the grid below it (no budget) and the output resized to it (``EditPipeline``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from .config import ACEConfig, SD3Config, get_config

RESIZE_MODES = ("resize", "crop", "error")
RESAMPLE = Image.Resampling.LANCZOS  # VaeImageProcessor's default ("lanczos")
# ACE: 4096 tokens a frame, 1024x1024 px for ACE-0.6B (its 1024 px checkpoint's resolution); the 512 px checkpoint
# shares that config, so its budget is named here
ACE_TOKENS = 4096
PIXEL_BUDGETS = {"ace-0.6b-512": 512 * 512}


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else ValueError naming it."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize {mode!r} is not a resize mode; expected one of {RESIZE_MODES}")
    return mode  # type: ignore[return-value]


def pixel_budget(model: str | ACEConfig | SD3Config) -> tuple[int, int | None]:
    """(max_pixels, max_side or None) for a preset name or a config.

    SD3: ``(sample_size x codec_factor)^2`` pixels (the resolution its position table was trained for: 1024^2
    for SD3-medium), at most ``pos_embed_max_size x patch x codec_factor`` a side. ACE: 4096 tokens of
    ``(patch x codec_factor)^2`` pixels (1024^2 for ACE-0.6B), no side limit (RoPE); ``ace-0.6b-512``: 512^2.
    """
    if isinstance(model, str):
        cfg = get_config(model)
        pixels, side = pixel_budget(cfg)
        return PIXEL_BUDGETS.get(model, pixels), side
    m = model.patch_size * model.codec_factor
    if isinstance(model, SD3Config):
        return (model.sample_size * model.codec_factor) ** 2, model.pos_embed_max_size * m
    return ACE_TOKENS * m * m, None


@dataclass(frozen=True)
class Fit:
    """How an image of ``source`` (width, height) pixels reaches ``grid`` (width, height, multiples of the grid)
    and back: resized to ``cover`` then cropped to ``box`` (left, top, right, bottom in ``cover`` pixels)."""

    source: tuple[int, int]
    grid: tuple[int, int]
    cover: tuple[int, int]
    box: tuple[int, int, int, int]
    mode: str

    @property
    def identity(self) -> bool:
        return self.source == self.grid == self.cover

    def _apply(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        if self.identity:
            return image
        if image.size != self.source:  # a mask of its image's aspect but another size: to the image's first
            image = image.resize(self.source, Image.Resampling.NEAREST)
        out = image.resize(self.cover, resample=resample)
        return out if self.cover == self.grid else out.crop(self.box)

    def image(self, image: Image.Image) -> Image.Image:
        """``image`` (of ``source`` size) on the grid: ``[grid]`` pixels, Lanczos."""
        return self._apply(image, RESAMPLE)

    def mask(self, mask: Image.Image) -> Image.Image:
        """A mask of the image's size or aspect through the same geometry, nearest-neighbour (values kept)."""
        return self._apply(mask, Image.Resampling.NEAREST)

    def restore(self, output: Image.Image, source: Image.Image | None = None) -> Image.Image:
        """The model's ``output`` (``grid`` size) at the ``source`` size: resized back, or for ``crop`` pasted
        over the cropped region of ``source`` (required then; the margins are its own pixels)."""
        if self.identity:
            return output
        if self.cover == self.grid:
            return output.resize(self.source, resample=RESAMPLE)
        if source is None or source.size != self.source:
            raise ValueError(f"restoring a crop needs its {self.source[0]}x{self.source[1]} source image")
        sx, sy = self.source[0] / self.cover[0], self.source[1] / self.cover[1]
        left, top, right, bottom = (round(self.box[0] * sx), round(self.box[1] * sy), round(self.box[2] * sx),
                                    round(self.box[3] * sy))
        out = source.convert(output.mode)  # a copy
        out.paste(output.resize((right - left, bottom - top), resample=RESAMPLE), (left, top))
        return out


def _floor(v: float, m: int) -> int:
    return int(v) - int(v) % m


def fit(size: tuple[int, int], multiple: int, mode: str = "resize", max_pixels: int | None = None,
        max_side: int | None = None, what: str = "image") -> Fit:
    """The :class:`Fit` of an image of ``size`` (width, height) pixels on a grid of ``multiple`` pixels.

    ``max_pixels``/``max_side`` bound the fitted size (None: no bound); ``mode`` as the module docstring. Raises
    ValueError naming ``what`` for a size off the grid with ``mode="error"``, a fitted side under ``multiple``
    pixels, or an unknown mode.
    """
    check_mode(mode)
    w, h = size
    if w < 1 or h < 1:  # an empty image (PIL allows 0x0): named here, not a ZeroDivisionError below
        raise ValueError(f"{what}: image size {w}x{h} is empty; expected at least {multiple}x{multiple} pixels")
    if mode == "error":
        if w < multiple or h < multiple:  # no mode can fit it: name the size, not the modes
            raise ValueError(f"{what}: image size {w}x{h} is too small for the model; expected at least "
                             f"{multiple} pixels a side (pad it first)")
        if w % multiple or h % multiple:
            raise ValueError(f"{what}: image size {w}x{h} is not a multiple of patch x codec factor = {multiple} "
                             f"pixels; resize or crop it first, or choose the resize mode 'resize' or 'crop' "
                             f"(resize= in Python, --resize on the command line)")
        return Fit(size, size, size, (0, 0, w, h), mode)
    scale = 1.0
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (w * h)))
    if max_side is not None:
        scale = min(scale, max_side / max(w, h))
    gw, gh = _floor(w * scale, multiple), _floor(h * scale, multiple)
    if gw < multiple or gh < multiple:
        if scale < 1:  # over the budget: scaling it down takes its short side under the grid
            bound = " and ".join(v for v in (max_pixels and f"{max_pixels} pixels", max_side and f"{max_side} a side")
                                 if v)
            raise ValueError(f"{what}: image size {w}x{h} is too elongated for the model: scaled to its budget "
                             f"({bound}) and its {multiple}-pixel grid it is {gw}x{gh}; "
                             f"expected at least {multiple} pixels a side after fitting (crop it to a less "
                             f"elongated region first)")
        raise ValueError(f"{what}: image size {w}x{h} is too small for the model: fitted to its {multiple}-pixel "
                         f"grid it is {gw}x{gh}; expected at least {multiple} pixels a side after fitting "
                         f"(pad it first)")
    if mode == "resize" or (gw, gh) == (w, h):
        return Fit(size, (gw, gh), (gw, gh), (0, 0, gw, gh), mode)
    # VaeImageProcessor._resize_and_crop: cover the grid with the aspect kept, centre crop
    cw = gw if gw / gh > w / h else w * gh // h
    ch = gh if gw / gh <= w / h else h * gw // w
    left, top = cw // 2 - gw // 2, ch // 2 - gh // 2
    return Fit(size, (gw, gh), (cw, ch), (left, top, left + gw, top + gh), mode)
