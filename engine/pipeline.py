"""The user API: ``EditPipeline.edit(images, instruction, ...)`` and multi-turn ``EditSession``."""
from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .codec import PixelCodec
from .imageio import decode_image
from .config import ACEConfig, SD3Config, get_config
from .lcu import (MAX_INDICATORS, ConditionUnit, ImageInput, LCUSample, PackedLCU, indicator_indices,
                  indicator_token, pack, unpatchify, validate)
from .memory import MemoryEstimate, estimate_memory
from .model import build_model
from .resize import Fit, check_mode, fit, pixel_budget
from .sampler import StepSampler, check_finite, check_guidance, check_int, guide, initial_noise, make_sampler
from .text import TinyTextEncoder, WordTextEncoder, indicator_table


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """PIL image or RGB uint8 ``[H, W, 3]`` array -> ``[3, H, W]`` in [-1, 1]."""
    rgb = image if isinstance(image, np.ndarray) else image.convert("RGB")
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(image: Tensor) -> Image.Image:
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int], what: str = "mask") -> None:
    """A mask fits its image if it has the same size, or the same aspect ratio within one pixel of
    rounding (it is then resized); otherwise ValueError naming ``what`` and both (width, height) sizes."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if mw < 1 or mh < 1:
        raise ValueError(f"{what} is {mw}x{mh}: empty; expected a mask of its image's size ({iw}x{ih})")
    # |mh - mw * ih / iw| <= 1 or |mw - mh * iw / ih| <= 1, in integers
    if abs(mw * ih - mh * iw) > max(iw, ih):
        raise ValueError(f"{what} is {mw}x{mh} but its image is {iw}x{ih}; expected a mask of the image's size "
                         f"or of its aspect ratio")


def tensor_mask(mask: Tensor, what: str = "mask") -> Image.Image:
    """A tensor mask as the 8-bit luma image the pipeline reads (255 = edit, 0 = keep).

    ``mask`` is ``[H, W]`` or ``[1, H, W]``: bool (True = edit), or numbers on the 0..255 scale of an image's
    luma, binarised at > 128 as image masks are. Raises TypeError for another dtype (complex) and ValueError
    naming ``what`` for another shape, an empty mask, NaN/inf, values outside 0..255, or a numeric mask whose
    values all lie in [0, 1] with some above 0: read on the 0..255 scale such a mask would select nothing and
    silently mean "edit everywhere", so it is refused with the fix (``mask * 255`` or ``mask.bool()``).
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(mask).__name__}")
    if mask.is_meta or mask.layout != torch.strided:
        raise TypeError(f"{what} is a {'meta' if mask.is_meta else str(mask.layout)} tensor; expected a dense tensor "
                        f"with data (mask.to_dense(), or one on the CPU or GPU)")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or mask.numel() == 0:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}; expected a non-empty [H, W] (or [1, H, W]) tensor")
    if mask.dtype == torch.bool:
        return Image.fromarray((mask.cpu().to(torch.uint8) * 255).numpy())
    if mask.is_complex():
        raise TypeError(f"{what} has dtype {mask.dtype}; expected bool or a real number dtype (0..255)")
    m = mask.detach().cpu().double()
    if not torch.isfinite(m).all():
        raise ValueError(f"{what} holds NaN or inf; expected values 0..255 (> 128 = edit)")
    lo, hi = m.min().item(), m.max().item()
    if lo < 0 or hi > 255:
        raise ValueError(f"{what} holds values {lo:g}..{hi:g}; expected 0..255 (> 128 = edit) or a bool tensor")
    if 0 < hi <= 1:
        raise ValueError(f"{what} holds values {lo:g}..{hi:g}, which on the 0..255 scale of masks (> 128 = edit) "
                         f"select nothing; pass mask.bool() or (mask.float() * 255) for a 0-1 mask")
    return Image.fromarray(((m > 128).to(torch.uint8) * 255).numpy())


def mask_to_latent(mask: Image.Image | Tensor, h: int, w: int, image_size: tuple[int, int] | None = None,
                   what: str = "mask") -> Tensor:
    """A user mask (white = edit) binarised at > 128 and resized nearest-exact to the latent grid ``[h, w]``.

    ``mask`` is a PIL image (converted to L) or a tensor (:func:`tensor_mask`: ``[H, W]`` bool, or 0..255; its
    errors). With ``image_size`` (width, height) of its image, a mask of another aspect ratio is refused
    (:func:`check_mask_size`). A mask with no set pixel becomes all ones (edit everywhere), as in ACE.
    """
    if isinstance(mask, Tensor):
        mask = tensor_mask(mask, what)
    if image_size is not None:
        check_mask_size(mask.size, image_size, what)
    m = _binary_latent(mask, h, w)
    return m if m.any() else torch.ones_like(m)


def _binary_latent(mask: Image.Image, h: int, w: int) -> Tensor:
    """``[h, w]`` float 0/1: the mask's luma > 128, resized nearest-exact."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32))
    m = (m.reshape(1, 1, *m.shape[-2:]) > 128).float()
    return F.interpolate(m, size=(h, w), mode="nearest-exact")[0, 0]


def check_mask_alpha(src, what: str = "mask") -> None:
    """A mask's transparency must not change what it marks. Masks are read from their luma with alpha dropped
    (:mod:`omniace.engine.imageio`), so a white mask whose edit area is marked only by being opaque (white
    everywhere, transparent around the square) would mark every pixel. ValueError naming ``what`` when the
    luma and the luma composited over black mark different pixels; masks without transparency pass unread."""
    from .imageio import decode_image, open_image

    img = open_image(src, what)
    if "A" not in img.getbands() and "transparency" not in img.info:
        return
    rgba = img.convert("RGBA")
    luma = np.asarray(decode_image(src, what).convert("L"), dtype=np.float32)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255
    if not np.array_equal(luma > 128, luma * alpha > 128):
        raise ValueError(f"{what} marks its edit area with transparency, which masks ignore (white, luma > 128, "
                         f"marks what to edit; alpha is dropped); flatten it onto black first, e.g. "
                         f"Image.alpha_composite(Image.new('RGBA', m.size, 'black'), m).convert('L')")


def latent_mask(mask: Image.Image | Tensor, image_fit: Fit, codec_factor: int, what: str = "mask") -> Tensor:
    """A user's mask (white = edit; a PIL image of its image's size or aspect, or a tensor as
    :func:`tensor_mask`) through its image's fit to the latent grid: ``[grid_h / f, grid_w / f]`` float 0/1.

    Unlike :func:`mask_to_latent` (the training data's masks, where an empty mask means "edit everywhere", as in
    ACE), a user's mask that marks nothing is refused: a 0/1 PNG, an all-black mask or a mask whose marked
    pixels fall between the latent cells or in a cropped margin would otherwise edit the whole image silently.
    Raises ValueError naming ``what``: no pixel above 128 as given, or none left on the latent grid.
    """
    given = mask
    if isinstance(mask, Tensor):
        mask = tensor_mask(mask, what)
    luma = mask.convert("L")
    marked = int((np.asarray(luma) > 128).sum())
    if not marked:
        if isinstance(given, Tensor) and given.dtype == torch.bool:
            raise ValueError(f"{what} marks no pixel: it is False everywhere (True marks what to edit); omit the "
                             f"mask to edit the whole image")
        top = float(given.max()) if isinstance(given, Tensor) else int(np.asarray(luma).max(initial=0))
        hint = (" (a 0/1 mask: scale it to 0/255)" if top == 1 else
                " (a mask on another scale, such as 0..100, must be rescaled to 0..255)" if 1 < top < 128 else "")
        raise ValueError(f"{what} marks no pixel: white (luma > 128) marks what to edit, and its largest value is "
                         f"{top:g}{hint}; omit the mask to edit the whole image")
    gw, gh = image_fit.grid
    m = _binary_latent(image_fit.mask(luma), gh // codec_factor, gw // codec_factor)
    if not m.any():
        cropped = image_fit.cover != image_fit.grid
        where = " or in the margin the crop removes" if cropped else ""
        fix = "mark a larger area inside the kept centre, or use the resize mode 'resize'" if cropped else \
            "mark a larger area"
        raise ValueError(f"{what} marks {marked} pixel(s), and none is left on the {m.shape[1]}x{m.shape[0]} "
                         f"latent grid of its fitted image ({gw}x{gh} pixels, {codec_factor} per latent cell): they "
                         f"fall between the cells{where}; {fix}")
    return m


def _image_suffixes() -> dict[str, str]:
    """File extensions PIL has a writer for -> format name."""
    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def check_output_path(path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), force: bool = False,
                      suffixes: Sequence[str] | None = None, what: str = "--out") -> tuple[Path, Path | None]:
    """Check where an output will go before any work; returns ``(path, its folder if it must be created)``.

    ``path`` must not be a folder; its extension must be one of ``suffixes``, or by default one PIL can
    write an RGB image as. A missing folder must be creatable (the caller creates it when it writes, so a
    failed run leaves nothing behind). It may be one of ``inputs`` only with ``force``. Raises ValueError
    naming ``what``, the path and the expected form.
    """
    p = Path(path)
    if p.is_dir():
        example = p / ("edited" + (suffixes[0] if suffixes else ".png"))
        raise ValueError(f"{what} {str(p)!r} is a folder; expected a file path such as {str(example)!r}")
    suffix = p.suffix.lower()
    if suffixes is not None:
        if suffix not in suffixes:
            raise ValueError(f"{what} {str(p)!r} must end in {' or '.join(suffixes)}")
    else:
        writable = _image_suffixes()
        fmt = writable.get(suffix)
        if fmt is None:
            common = [e for e in (".png", ".jpg", ".webp", ".bmp", ".tiff") if e in writable]
            raise ValueError(f"{what} {str(p)!r} has {'no' if not suffix else 'the unknown'} image extension "
                             f"{suffix!r}; expected a file name ending in one PIL can write, such as "
                             f"{', '.join(common)}")
        try:  # some writers take no RGB image (.xbm, .msp) or need a plugin (.wmf, .h5)
            Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
        except Exception as err:
            raise ValueError(f"{what} {str(p)!r}: PIL cannot write an RGB image as {fmt} ({err}); "
                             f"use .png, .jpg or .webp") from None
    for src in inputs:
        same = p.exists() and Path(src).exists() and os.path.samefile(p, src)
        if same and not force:
            raise ValueError(f"{what} {str(p)!r} is the input {str(src)!r}; refusing to overwrite it without force "
                             f"(--force)")
    parent, missing = p.parent, None
    if not parent.is_dir():
        # created only when the output is written (nothing is left behind by a request that fails); here
        # the nearest existing ancestor must be a writable folder
        ancestor = parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ValueError(f"{what} {str(p)!r}: {str(ancestor)!r} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {str(p)!r}: cannot create the folder {str(parent)!r} ({str(ancestor)!r} is "
                             f"not writable)")
        missing = parent
    elif not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {str(p)!r}: the folder {str(parent)!r} is not writable")
    return p, missing


DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "ace-edit.safetensors"


def check_device(device: str | torch.device) -> None:
    """ValueError naming ``device`` if torch cannot allocate on it here (a typo, CUDA without a GPU)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # "xyz", or cuda on a machine without it
        raise ValueError(f"device {str(device)!r} is not usable here ({str(err).splitlines()[0]})") from None


def tiny_text_encoder(cfg: ACEConfig | SD3Config) -> TinyTextEncoder | WordTextEncoder:
    """The fixed-seed encoder that the tiny presets train and run with: byte-level, or word-level for an ACE
    config with ``text_encoder="words"`` (the embedded default)."""
    if isinstance(cfg, ACEConfig):
        if cfg.text_encoder == "words":
            return WordTextEncoder(cfg.y_channels, max_len=cfg.text_len)
        return TinyTextEncoder(cfg.y_channels, max_len=cfg.text_len)
    return TinyTextEncoder(cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim,
                           max_len=cfg.text_len)


ImageLike = Image.Image | str | bytes | os.PathLike  # what decode_image reads


def tiny_sampling(cfg: ACEConfig | SD3Config) -> dict:
    """The sampling defaults of a tiny pixel-space trainer export (the embedded default and its kin), as
    :class:`EditPipeline` keywords: guidance 1.0 (one branch, no CFG) and, for an x0 model, the "sigma" timestep
    spacing, both chosen for the embedded default on a validation split (docs/default_model.md); eps and flow
    models keep their samplers' own spacing."""
    return {"default_guidance": 1.0, "timestep_spacing": "sigma" if cfg.prediction == "x0" else "trailing"}


@dataclass
class Turn:
    instruction: str  # with indicators already renamed to sample-global indices
    images: list[Image.Image]  # at the size the user gave them
    masks: list[Image.Image | Tensor | None]
    resize: str = "resize"  # how its images reach the model grid (omniace.engine.resize)


def turn_inputs(images: ImageLike | Sequence[ImageLike] | None,
                masks: ImageLike | Tensor | Sequence | None) -> tuple[list[Image.Image], list]:
    """One turn's images and masks as two lists of equal length (missing masks are None).

    Every image (a PIL image, a file path or encoded bytes) goes through :func:`~omniace.engine.imageio.
    decode_image`, as the CLI's and the loader's do: EXIF orientation applied, every mode mapped to 8-bit RGB
    the documented way. Masks are decoded the same way (then read as luma), or given as ``[H, W]`` tensors
    (bool, or 0..255: :func:`tensor_mask`, checked by :meth:`EditPipeline.prepare`).
    Raises TypeError naming a value of the wrong type, ValueError for more masks than images or an
    undecodable image.
    """
    single = (Image.Image, str, bytes, os.PathLike)
    if images is None:
        images = []
    elif isinstance(images, single):
        images = [images]
    elif isinstance(images, Sequence):
        images = list(images)
    else:
        raise TypeError(f"images must be a PIL image, a path, bytes or a list of them, got {type(images).__name__}")
    if isinstance(masks, np.ndarray) or (isinstance(masks, Sequence) and any(isinstance(m, np.ndarray) for m in masks)):
        raise TypeError("masks must be PIL images, paths, bytes or [H, W] tensors, got a numpy array; pass "
                        "torch.from_numpy(mask) (bool, or 0..255) or Image.fromarray(mask)")
    if masks is None:
        masks = []
    elif isinstance(masks, (*single, Tensor)):
        masks = [masks]
    elif isinstance(masks, Sequence):
        masks = list(masks)
    else:
        raise TypeError(f"masks must be a PIL image, a path, bytes, an [H, W] tensor or a list of them, got "
                        f"{type(masks).__name__}")
    if len(masks) > len(images):
        raise ValueError(f"{_count(len(masks), 'mask')} for {_count(len(images), 'image')}; expected at most one "
                         f"mask per image")
    for j, img in enumerate(images):
        if not isinstance(img, single):
            raise TypeError(f"image {j} must be a PIL image, a path or bytes, got {type(img).__name__}")
    for j, m in enumerate(masks):
        if m is not None and not isinstance(m, (*single, Tensor)):
            raise TypeError(f"mask {j} must be a PIL image, a path, bytes or a [H, W] tensor, got {type(m).__name__}")
    images = [decode_image(img, f"image {j}") for j, img in enumerate(images)]
    for j, m in enumerate(masks):
        if m is not None and not isinstance(m, Tensor):
            check_mask_alpha(m, f"mask {j}")
    masks = [m if m is None or isinstance(m, Tensor) else decode_image(m, f"mask {j}") for j, m in enumerate(masks)]
    return images, masks + [None] * (len(images) - len(masks))


def renumber(instruction: str, offset: int) -> str:
    """Shift every image indicator of ``instruction`` by ``offset`` (``{image1}`` + 2 -> ``{image3}``)."""
    return re.sub(r"\{image(\d*)\}", lambda m: indicator_token(int(m.group(1) or 0) + offset), instruction)


@dataclass
class EditJob:
    """One request between :meth:`EditPipeline.prepare` and :meth:`EditPipeline.finish`.

    ``samples`` are its LCUs (the conditional one, then the unconditional one when CFG is on); both
    branches share the latent ``x [L_tgt, C*p*p]``. A caller packs ``samples`` (alone, or with other jobs'
    samples in one batch), feeds :meth:`model_input` to the model (with a self-conditioning model, also
    :meth:`previous_estimate` as ``x0_prev``: :meth:`EditPipeline.self_condition_input` gathers it for several
    jobs; the model reads zeros for a missing one, so a loop that forgets it samples worse without an error)
    and hands this job's rows of the output to :meth:`advance`. The result depends only on the job, never on
    what shared its batch.
    """

    samples: list[LCUSample]
    x: Tensor
    sampler: StepSampler
    guidance: float
    rescale: float
    target_size: tuple[int, int]  # latent (h, w)
    patch_size: int
    output: Fit | None = None  # how the decoded grid-size output returns to the request's size
    source: Image.Image | None = None  # the edited image as given (a crop is pasted back over it)
    i: int = 0  # steps taken
    # self-conditioning models (``ACEConfig.self_condition``; set by ``EditPipeline.prepare``): the job keeps
    # its last step's x0 estimate ``[L_tgt, C*p*p]`` after guidance, fed back at the next step (None before the
    # first: the model reads zeros)
    self_condition: bool = False
    x0: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.i >= self.sampler.steps

    @property
    def branches(self) -> int:
        return len(self.samples)

    @property
    def target_tokens(self) -> int:
        """Rows of the model output that belong to this job: ``branches * L_tgt``."""
        return self.branches * self.x.shape[0]

    @property
    def image_tokens(self) -> int:
        """Image tokens this job adds to a packed batch (every frame of every branch)."""
        p = self.patch_size
        first = self.samples[0]
        frames = [first.target] + [img for u in first.units for img in u.images]
        return self.branches * sum((f.latent.shape[1] // p) * (f.latent.shape[2] // p) for f in frames)

    def model_input(self) -> tuple[Tensor, Tensor]:
        """(x, t) for this step: ``[branches * L_tgt, C*p*p]`` and ``[branches]`` (t on the CPU)."""
        x = torch.cat([self.x] * self.branches) if self.branches > 1 else self.x
        return x, self.sampler.timestep(self.i, self.branches)

    def previous_estimate(self) -> Tensor:
        """The self-conditioning input for this step, ``[branches * L_tgt, C*p*p]``: the last step's x0 estimate
        (every branch reads the guided one), zeros at the first step."""
        x0 = torch.zeros_like(self.x) if self.x0 is None else self.x0
        return torch.cat([x0] * self.branches) if self.branches > 1 else x0

    def advance(self, out: Tensor) -> None:
        """CFG over this job's model output ``[branches * L_tgt, C*p*p]``, then one sampler step
        (FloatingPointError naming the step if the latent turns non-finite)."""
        n = self.x.shape[0]
        pred = out if self.branches == 1 else guide(out[:n], out[n:], self.guidance, self.rescale, [0, n])
        if self.self_condition:  # its own rows (not a view that keeps the batch's whole output alive)
            self.x0 = pred.clone()
        self.x = self.sampler.step(self.i, self.x, pred)
        self.i += 1


class EditPipeline:
    """Edit or generate images with an ACE or SD3(+EditNet) model, a text encoder and a codec."""

    def __init__(self, model, text_encoder, codec, device: str = "cpu", max_tokens: int = 16384,
                 default_guidance: float = 4.5, max_pixels: int | None = None, dtype: torch.dtype | None = None,
                 timestep_spacing: str = "trailing"):
        """``max_tokens``: image tokens one sample may hold (every frame of one CFG branch; memory and time grow
        with it, the reference attention's quadratically); ``default_guidance``: the CFG scale used when a
        call passes ``guidance=None`` (ACE's 4.5; the embedded default was validated at 1.0); ``max_pixels``:
        the pixel budget one input image is scaled down to (default: the model's,
        :func:`~omniace.engine.resize.pixel_budget`); ``dtype``: the model's (default: as given);
        ``timestep_spacing``: the DDIM sampler's (:class:`~omniace.engine.sampler.DDIMSampler`: ACE's "trailing";
        the embedded default samples with "sigma"). ValueError for a device that is not usable here, or a spacing
        the model's sampler does not take."""
        self.max_tokens = check_int(max_tokens, "max_tokens", 1)
        self.max_pixels, self.max_side = pixel_budget(model.cfg)
        if max_pixels is not None:
            self.max_pixels = check_int(max_pixels, "max_pixels", 1)
        self.default_guidance = check_finite(default_guidance, "default_guidance")
        self.timestep_spacing = timestep_spacing
        self.cfg = model.cfg
        self.sampler(1)  # refuses a bad spacing now
        check_device(device)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.text_encoder = text_encoder
        self.codec = codec
        self.device = device
        self.is_ace = isinstance(self.cfg, ACEConfig)
        if codec.factor != self.cfg.codec_factor:
            raise ValueError(f"codec factor {codec.factor} differs from the model's codec_factor {self.cfg.codec_factor}")

    @classmethod
    def pretrained(cls, path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
                   preset: str | None = None) -> "EditPipeline":
        """The embedded default: ``ace-edit`` trained on the synthetic corpus (``train/recipe_default.sh``), with
        its built-in text encoder (word-level; byte-level for older exports) and the pixel codec. ``path`` loads
        another trainer export, or a trainer's output folder holding ``model.safetensors`` (its config from its
        metadata, or ``preset`` for a file without it); FileNotFoundError naming a path that holds neither. Guidance
        1.0 by default; an x0 model samples with the "sigma" timestep spacing, others with their own."""
        from .model import load_model

        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if path.is_dir() and (path / "model.safetensors").is_file():  # a trainer's --out folder
            path = path / "model.safetensors"
        if not path.is_file():
            why = "no trained weights there" if path == DEFAULT_WEIGHTS or path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{path}: {why}; train a model with the README's recipe "
                                    f"(python -m omniace.train.trainer ... --preset ace-edit)")
        model = load_model(path, preset)
        text_dim = model.cfg.y_channels if isinstance(model.cfg, ACEConfig) else model.cfg.joint_attention_dim
        if model.cfg.codec_factor != 4 or text_dim != 32:
            raise ValueError(f"{path}: not a tiny pixel-space model (codec_factor 4, built-in 32-wide text encoder); "
                             f"use EditPipeline(model, text_encoder, codec) for it")
        return cls(model, tiny_text_encoder(model.cfg), PixelCodec(model.cfg.codec_factor), device=device,
                   dtype=dtype, **tiny_sampling(model.cfg))

    @classmethod
    def dry(cls, cfg: ACEConfig | SD3Config, dtype: torch.dtype = torch.float32, **kw) -> "EditPipeline":
        """A pipeline of ``cfg`` on the meta device, with no weights: it checks requests and estimates their
        memory (:meth:`memory_estimate`) before a real one is loaded; it cannot sample. ``kw`` as the
        constructor's (``max_pixels``, ``max_tokens``)."""
        with torch.device("meta"):
            model = build_model(cfg)
        return cls(model, None, PixelCodec(cfg.codec_factor), device="meta", dtype=dtype, **kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, editnet: str | Path | None = None, **kwargs) -> "EditPipeline":
        """A pipeline from a downloaded folder: a diffusers SD3 / SD3.5 pipeline folder (+ an optional EditNet
        weights file) or an ACE folder; see :func:`omniace.engine.pretrained.from_pretrained` for the layouts,
        ``kwargs`` (``device``, ``dtype``, ``t5``, ``preset``) and the errors raised."""
        from .pretrained import from_pretrained

        return from_pretrained(folder, editnet, **kwargs)

    @classmethod
    def tiny(cls, family: str = "ace", seed: int = 0, device: str = "cpu",
             dtype: torch.dtype | None = None) -> "EditPipeline":
        """An untrained tiny model (tests, shapes and timing; :meth:`pretrained` is the trained default)."""
        cfg = get_config("ace-tiny" if family == "ace" else "sd3-tiny-editnet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
        text = tiny_text_encoder(cfg)
        if family == "ace":
            with torch.no_grad():
                model.text_position_embeddings.pos.copy_(indicator_table(text))
        return cls(model, text, PixelCodec(cfg.codec_factor), device=device, dtype=dtype)

    def sampler(self, steps: int) -> StepSampler:
        """This pipeline's sampler over ``steps`` steps (the model's prediction type, ``timestep_spacing``);
        ValueError for a step count it refuses (:func:`~omniace.engine.sampler.make_sampler`)."""
        return make_sampler(self.cfg.prediction, steps, timestep_spacing=self.timestep_spacing)

    @property
    def multiple(self) -> int:
        return self.cfg.patch_size * self.cfg.codec_factor

    def _tokens(self, grids: list[tuple[int, int]]) -> int:
        """Image tokens of frames of these (width, height) grid sizes."""
        return sum((w // self.multiple) * (h // self.multiple) for w, h in grids)

    def fit(self, size: tuple[int, int], resize: str = "resize", what: str = "image") -> Fit:
        """How an input image of ``size`` (width, height) reaches this model's grid within its pixel budget
        (:func:`~omniace.engine.resize.fit`; ValueError naming ``what`` for a size it refuses)."""
        return fit(size, self.multiple, resize, self.max_pixels, self.max_side, what)

    def _check_request(self, history: list[Turn], current: Turn, size: tuple[int, int] | None,
                       negative: str, branches: int = 1, budget: tuple[int, str] | None = None
                       ) -> tuple[list[list[Fit]], Fit]:
        """Every argument of :meth:`run` except the sampler's, before any model work; then the request's
        image tokens (at their fitted sizes) against ``max_tokens`` per sample and ``budget`` = (tokens, what it
        is) for all ``branches`` together (a server's token budget). Returns each turn's image fits and the
        target's."""
        if not isinstance(negative, str):
            raise TypeError(f"negative must be a str, got {type(negative).__name__}")
        fits: list[list[Fit]] = []
        for i, turn in enumerate(history + [current]):
            where = "" if turn is current else f"history turn {i}: "
            if not isinstance(turn.instruction, str):
                raise TypeError(f"{where}instruction must be a str, got {type(turn.instruction).__name__}")
            check_mode(turn.resize)
            if len(turn.masks) != len(turn.images):
                raise ValueError(f"{where}{_count(len(turn.masks), 'mask')} for {_count(len(turn.images), 'image')}; "
                                 f"expected at most one mask per image, in the images' order")
            fits.append([])
            for j, (img, mask) in enumerate(zip(turn.images, turn.masks)):
                if not isinstance(img, Image.Image):
                    raise TypeError(f"{where}image {j} must be a PIL image, got {type(img).__name__}")
                fits[-1].append(self.fit(img.size, turn.resize, f"{where}image {j}"))
                if mask is None:
                    continue
                if not self.is_ace:
                    raise ValueError("masks are used by the ACE family only")
                what = f"{where}mask {j} (for image {j})"
                if not isinstance(mask, (Tensor, Image.Image)):
                    raise TypeError(f"{what} must be a PIL image or a tensor, got {type(mask).__name__}")
                check_mask_size((tensor_mask(mask, what) if isinstance(mask, Tensor) else mask).size, img.size, what)
                latent_mask(mask, fits[-1][-1], self.cfg.codec_factor, what)
        if current.images:
            if size is not None:
                w, h = current.images[0].size
                raise ValueError(f"size={size!r} is for text-to-image; an edit keeps the size of its first "
                                 f"image ({w}x{h})")
            target = fits[-1][0]
        else:
            if size is None:
                raise ValueError("text-to-image needs size=(width, height)")
            if not isinstance(size, (tuple, list)) or len(size) != 2:
                raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
            wh = check_int(size[0], "size width", 1), check_int(size[1], "size height", 1)
            if current.resize == "error" and (wh[0] % self.multiple or wh[1] % self.multiple):
                raise ValueError(f"size {wh[0]}x{wh[1]} is not a multiple of {self.multiple} pixels")
            # the size asked for is generated (no pixel budget; max_tokens bounds it), on the grid below it
            target = fit(wh, self.multiple, "resize", what="size")
        frames = _grids(fits, target)
        per_sample = self._tokens(frames)
        sizes = ", ".join(f"{w}x{h}" for w, h in frames)
        if per_sample > self.max_tokens:
            which = "target and condition images" if len(frames) > 1 else "the target image"  # text-to-image: one
            strict = any(t.resize == "error" for t in history + [current])
            fix = ("the resize mode 'resize' or 'crop' (resize= in Python, --resize on the command line), which "
                   "fits images to the model's pixel budget, ") if strict else ""
            raise ValueError(f"this request needs {per_sample} image tokens per sample ({which} {sizes}), over "
                             f"the pipeline's max_tokens of {self.max_tokens}; use {fix}smaller images or build the "
                             f"pipeline with a larger max_tokens")
        if budget is not None and branches * per_sample > budget[0]:
            raise ValueError(f"this request needs {branches * per_sample} image tokens per step ({branches} CFG "
                             f"branch(es) of {sizes}), more than {budget[1]} of {budget[0]}; use fewer or "
                             f"smaller images")
        return fits, target

    def memory_estimate(self, current: Turn, size: tuple[int, int] | None = None, guidance: float | None = None,
                        history: Sequence[Turn] = (), weights_resident: bool = True,
                        device: str | None = None) -> MemoryEstimate:
        """Bytes a request would need on ``device`` (default: the pipeline's) by :mod:`omniace.engine.memory`'s
        formula, after the request checks of :meth:`prepare` (the same ValueError/TypeError).
        ``weights_resident``: the weights are already loaded (they count 0)."""
        branches = 1 if (self.default_guidance if guidance is None else guidance) == 1.0 else 2
        fits, target = self._check_request(list(history), current, size, "", branches)
        grids = _grids(fits, target)
        element = next(self.model.parameters()).dtype.itemsize
        return estimate_memory(self.model, self._tokens(grids), (len(history) + 1) * self.cfg.text_len, branches,
                               max(w * h for w, h in grids), element, weights_resident,
                               vae=not isinstance(self.codec, PixelCodec),
                               scores=torch.device(device or self.device).type != "cuda")

    def _unit(self, turn: Turn, fits: list[Fit]) -> ConditionUnit:
        """A turn's images (each brought to the grid by its own fit, its mask through the same geometry)
        encoded by the codec."""
        images = []
        for img, mask, f in zip(turn.images, turn.masks, fits):
            lat = self.codec.encode(to_tensor(f.image(img)))
            # a tensor is binarised first (prepare checked it), so nearest resampling keeps it
            images.append(ImageInput(lat, None if mask is None else latent_mask(mask, f, self.cfg.codec_factor)))
        return ConditionUnit(turn.instruction, images)

    @torch.no_grad()
    def prepare(self, history: list[Turn], current: Turn, size: tuple[int, int] | None, steps: int,
                guidance: float | None, rescale: float, seed: int, negative: str, truncate: bool = True,
                budget: tuple[int, str] | None = None) -> "EditJob":
        """Everything of one request before its first step: checks, codec and text encoding, initial noise.

        Every argument is checked before any model work (ValueError/TypeError naming it), the image tokens
        too (``max_tokens``, and ``budget`` = (tokens per step, its name) when a server gives one).
        ``guidance=None`` takes ``default_guidance``. Returns an :class:`EditJob` whose samples (one LCU, two
        with CFG) any packed batch can carry.
        """
        sampler = self.sampler(steps)
        guidance = self.default_guidance if guidance is None else guidance
        check_guidance(guidance, rescale)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        fits, output = self._check_request(history, current, size, negative, 1 if guidance == 1.0 else 2, budget)
        units = [self._unit(t, f) for t, f in zip(history + [current], fits)]
        if units[-1].images:  # editing: the target takes the fitted size (and mask) of the first current image
            first = units[-1].images[0]
            target = ImageInput(torch.zeros_like(first.latent), first.mask)
        else:
            w, h = output.grid
            f = self.codec.factor
            target = ImageInput(torch.zeros(self.codec.latent_channels, h // f, w // f))
        encs = self.text_encoder.encode([u.instruction for u in units] + [negative], truncate=truncate)
        for u, e in zip(units, encs):
            u.text, u.pooled = e.tokens, e.pooled
        neg_units = [ConditionUnit(u.instruction, u.images, u.text, u.pooled) for u in units[:-1]]
        neg_units.append(ConditionUnit(negative, units[-1].images, encs[-1].tokens, encs[-1].pooled))
        samples = [LCUSample(units, target)]
        if guidance != 1.0:
            samples.append(LCUSample(neg_units, target))
        validate(samples, self.cfg.patch_size, self.cfg.codec_factor, self.is_ace)
        h, w = target.latent.shape[1:]
        x = initial_noise([(h, w)], self.cfg.patch_size, seed, self.codec.latent_channels).to(self.device)
        return EditJob(samples, x, sampler, guidance, rescale, (h, w), self.cfg.patch_size, output,
                       current.images[0] if current.images else None,
                       self_condition=getattr(self.cfg, "self_condition", False))

    def pack(self, samples: list[LCUSample]) -> PackedLCU:
        """One packed batch of ``samples`` on the pipeline's device."""
        return pack(samples, self.cfg.patch_size, codec_factor=self.cfg.codec_factor, with_mask=self.is_ace,
                    device=self.device)

    @torch.no_grad()
    def finish(self, job: "EditJob") -> Image.Image:
        """Decode a finished job's latent to the output image, at the size of the request's image (or size)."""
        h, w = job.target_size
        out = to_pil(self.codec.decode(unpatchify(job.x.cpu(), h, w, self.cfg.patch_size)))
        return out if job.output is None else job.output.restore(out, job.source)

    @torch.no_grad()
    def run(self, history: list[Turn], current: Turn, size: tuple[int, int] | None, steps: int,
            guidance: float | None, rescale: float, seed: int, negative: str, truncate: bool = True) -> Image.Image:
        """One request: ``history`` turns (instructions renamed to global indicators) and the ``current``
        one, as :meth:`prepare`, the job's steps over one packed batch, then :meth:`finish`. A non-finite
        latent stops sampling with FloatingPointError naming the step."""
        return self.run_job(self.prepare(history, current, size, steps, guidance, rescale, seed, negative, truncate))

    @torch.no_grad()
    def run_job(self, job: "EditJob") -> Image.Image:
        """A prepared job alone: its steps over one packed batch of its own samples, then :meth:`finish`."""
        batch = self.pack(job.samples)
        while not job.done:
            x, t = job.model_input()
            job.advance(self.model(batch, x, t.to(self.device), **self.self_condition_input([job])))
        return self.finish(job)

    def self_condition_input(self, jobs: list["EditJob"]) -> dict:
        """The model's keyword for the jobs' previous x0 estimates (``x0_prev``, in their order) when it
        self-conditions (``ACEConfig.self_condition``); nothing for any other model."""
        if not getattr(self.cfg, "self_condition", False):
            return {}
        return {"x0_prev": torch.cat([job.previous_estimate() for job in jobs])}

    @torch.no_grad()
    def run_jobs(self, jobs: list["EditJob"]) -> list[Image.Image]:
        """Prepared jobs with the same number of steps, stepped together: one packed batch of every job's
        samples, one model call per step. Each job's output is what :meth:`run_job` gives it alone (its noise,
        CFG and guidance rescale are its own); the batch only saves the per-call overhead. ValueError if the
        jobs' step counts or steps already taken differ, or a job is listed twice (it would step twice per call)."""
        if not jobs:
            return []
        steps = {job.sampler.steps for job in jobs}
        if len(steps) != 1:
            raise ValueError(f"run_jobs steps jobs together: they need one step count, got {sorted(steps)}")
        seen: dict[int, int] = {}
        for k, job in enumerate(jobs):
            if id(job) in seen:
                raise ValueError(f"run_jobs: jobs {seen[id(job)]} and {k} are the same job; prepare each request "
                                 f"once per entry")
            seen[id(job)] = k
        taken = [job.i for job in jobs]
        if len(set(taken)) != 1:  # a finished job beside a fresh one: one of them would be skipped or overrun
            raise ValueError(f"run_jobs steps jobs together: they must have taken the same steps, got {taken} "
                             f"(steps taken per job, in order)")
        batch = self.pack([s for job in jobs for s in job.samples])
        while not jobs[0].done:
            inputs = [job.model_input() for job in jobs]
            out = self.model(batch, torch.cat([x for x, _ in inputs]), torch.cat([t for _, t in inputs]).to(self.device),
                             **self.self_condition_input(jobs))
            for job, part in zip(jobs, out.split([job.target_tokens for job in jobs])):
                job.advance(part)
        return [self.finish(job) for job in jobs]

    def prepare_edit(self, images: Image.Image | list[Image.Image] | None, instruction: str,
                     masks: Image.Image | Tensor | list | None = None, steps: int = 20,
                     guidance: float | None = None, rescale: float = 0.5, seed: int = 0, negative: str = "",
                     size: tuple[int, int] | None = None, truncate: bool = True,
                     resize: str = "resize") -> "EditJob":
        """:meth:`edit`'s request as a job (arguments and errors as there), for :meth:`run_jobs`."""
        check_mode(resize)
        images, masks = turn_inputs(images, masks)
        if isinstance(instruction, str):  # named here, where the user's own count of images is known
            check_indicators(instruction, len(images), "the request", "; {image} is the first image, {image1} the "
                                                                       "second, and so on")
        return self.prepare([], Turn(instruction, images, masks, resize), size, steps, guidance, rescale, seed,
                            negative, truncate)

    def edit(self, images: Image.Image | list[Image.Image] | None, instruction: str,
             masks: Image.Image | Tensor | list | None = None, steps: int = 20, guidance: float | None = None,
             rescale: float = 0.5, seed: int = 0, negative: str = "",
             size: tuple[int, int] | None = None, truncate: bool = True, resize: str = "resize") -> list[Image.Image]:
        """Edit ``images`` (the first is the one edited) following ``instruction``; returns ``[PIL]`` at the
        size of the first image.

        Images of any size: each is brought to the model grid within the pixel budget (``max_pixels``) by
        ``resize`` = ``"resize"`` (aspect kept up to rounding), ``"crop"`` (aspect kept, the centre cropped; the
        output is the input with the edited crop pasted back) or ``"error"`` (refuse a size off the grid); see
        :mod:`omniace.engine.resize`. With no images, generates an image of ``size`` (width, height; on the
        grid below it, resized to it unless ``"error"``). ``masks`` (white = edit) go with the images in order
        (ACE family); each has its image's size, or its aspect ratio, and follows its image. ``{image}``,
        ``{image1}`` ... name the images. ``steps``: an int >= 1; ``guidance``: finite, or None for
        ``default_guidance``; ``rescale``: in [0, 1]; ``seed``: an int >= 0. Text past the encoder's limit is
        cut with a warning, or refused if not ``truncate``. Raises ValueError/TypeError naming a bad argument
        (an image too small for the grid too) before any model work, FloatingPointError if the latent turns
        NaN/inf (naming the step).
        """
        return [self.run_job(self.prepare_edit(images, instruction, masks, steps, guidance, rescale, seed, negative,
                                               size, truncate, resize))]


def _count(n: int, noun: str) -> str:
    """``1 mask``, ``2 masks``, ``0 images``: error messages count things in plain English."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_indicators(instruction: str, n_images: int, holder: str, hint: str = "", where: str = "") -> None:
    """ValueError when ``instruction`` names an image indicator past the ``n_images`` images ``holder`` (the
    request, the turn) has, in the user's terms (the packer's own check speaks of samples and units)."""
    for token, idx in indicator_indices(instruction):
        if idx >= n_images:
            raise ValueError(f"{where}instruction names {token} but {holder} has {n_images} image(s){hint}")


def _grids(fits: list[list[Fit]], target: Fit) -> list[tuple[int, int]]:
    """The (width, height) on the grid of a request's frames: the target, then every image in order."""
    return [target.grid] + [f.grid for turn_fits in fits for f in turn_fits]


def _n_images(turns: list[Turn]) -> int:
    return sum(len(t.images) for t in turns)


def _drop_turns(turns: list[Turn], n: int) -> list[Turn]:
    """``turns`` without its first ``n``, the indicators of the rest renumbered to start at ``{image}``."""
    shift = _n_images(turns[:n])
    return [Turn(renumber(t.instruction, -shift), t.images, t.masks, t.resize) for t in turns[n:]]


class EditSession:
    """Multi-turn editing: earlier turns stay in the LCU as history units (ACE chat mode).

    Each turn's ``{image}``, ``{image1}`` ... name that turn's own images; they are renamed to their
    index in the whole context (``{imageN}``), since history images come first in frame order.
    The model takes at most ``MAX_INDICATORS - 1`` (9) condition images per request: when a turn would
    exceed that, the oldest turns leave the history with a warning (the rest are renumbered).
    ``max_history`` (an int >= 0) keeps at most that many turns in the history, without a warning.
    """

    def __init__(self, pipe: EditPipeline, max_history: int | None = None):
        if not pipe.is_ace:
            raise ValueError("multi-turn sessions need the ACE family (the SD3 EditNet takes one unit)")
        self.pipe = pipe
        self.max_history = None if max_history is None else check_int(max_history, "max_history", 0)
        self.history: list[Turn] = []
        self.last: Image.Image | None = None
        self.turns = 0  # turns done, including text-to-image turns (which leave no history)

    def rename(self, instruction: str, n_local: int, offset: int | None = None) -> str:
        """``instruction``'s local indicators shifted by ``offset`` (default: the history's images)."""
        hint = ("; images= replaces the previous output: to edit it with another image, pass [session.last, other]"
                if self.last is not None else "")
        check_indicators(instruction, n_local, "the turn", hint, where=f"turn {self.turns}: ")
        return renumber(instruction, _n_images(self.history) if offset is None else offset)

    def _fitting_history(self, n_new: int) -> list[Turn]:
        """The history to send with a turn of ``n_new`` images: the oldest turns dropped until the
        indicator table holds every condition image."""
        limit = MAX_INDICATORS - 1
        if n_new > limit:
            raise ValueError(f"turn {self.turns}: {n_new} images; at most {limit} condition images fit the "
                             f"model's image-indicator table")
        start = 0
        while _n_images(self.history[start:]) + n_new > limit:
            start += 1
        if start:
            warnings.warn(f"EditSession turn {self.turns}: dropped the oldest {start} turn(s) from the history: "
                          f"with them the request would have {_n_images(self.history) + n_new} condition images, "
                          f"the model takes at most {limit} (pass max_history to choose how many turns to keep)",
                          stacklevel=3)
        return _drop_turns(self.history, start)

    def edit(self, instruction: str, images: Image.Image | list[Image.Image] | None = None,
             masks: Image.Image | Tensor | list | None = None, *, steps: int = 20, guidance: float | None = None,
             rescale: float = 0.5, seed: int = 0, negative: str = "", size: tuple[int, int] | None = None,
             truncate: bool = True, resize: str = "resize") -> Image.Image:
        """One turn; ``images`` defaults to the previous output. Returns the new image.

        Arguments and errors as :meth:`EditPipeline.edit`; the turn's images keep their ``resize`` mode while
        they stay in the history. The history changes only when the turn succeeds.
        """
        check_mode(resize)
        if images is None:
            images = [] if self.last is None else [self.last]
        images, masks = turn_inputs(images, masks)
        history = self._fitting_history(len(images))
        turn = Turn(self.rename(instruction, len(images), _n_images(history)), images, masks, resize)
        out = self.pipe.run(history, turn, size, steps, guidance, rescale, seed, negative, truncate)
        history = history + [turn] if turn.images else history
        if self.max_history is not None:
            history = _drop_turns(history, max(0, len(history) - self.max_history))
        self.history = history
        self.turns += 1
        self.last = out
        return out
