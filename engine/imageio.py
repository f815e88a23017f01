"""The one image decoder: every image the project reads (CLI, pipeline, session, training loader) goes
through :func:`decode_image`, so the same bytes give the same pixels on every path, and the same pixels as
NVIDIA DALI's ``fn.decoders.image`` (measured with DALI 2.4's CPU decoder; see ``tests/test_imageio.py``).

How a file becomes 8-bit RGB:

- EXIF orientation is applied (Pillow's ``ImageOps.exif_transpose``), as DALI does: a 64x32 JPEG tagged
  Orientation=6 decodes to 32x64.
- 16-bit grey (modes ``I;16*``; ``I`` from PNG/PPM, which some Pillow versions use for it) is scaled,
  ``round(v / 257)``, as DALI scales it (65535 -> 255, 100*257 -> 100); Pillow's own conversion clips.
- 32-bit float (mode ``F``, from TIFF) is read as [0, 1]: ``floor(v * 255 + 0.5)`` in float32, clipped to
  [0, 255], NaN -> 0, as DALI reads it.
- CMYK is ``floor((255 - c) * (255 - k) / 255)`` per channel, DALI's formula (Pillow's rounds, off by 1).
- Alpha is dropped, not composited (RGBA, LA, PA, and P with transparency give their colour channels as
  stored), as DALI drops it. 1-bit, grey and palette images expand to RGB (Pillow's ``convert``).
- 16-bit colour (RGB/RGBA/LA PNG of bit depth 16): Pillow keeps the high byte of each channel, ``v >> 8``;
  DALI rounds ``v / 257``, so the two differ by at most 1 there (the training loader's DALI decoder hands
  these files to this module, so both loaders agree exactly).
- Any other mode (``I`` from TIFF, i.e. 32-bit integers; ``LAB``, ``HSV``, ``YCbCr``, signed 16-bit, ...)
  is refused with a ``ValueError`` naming the mode. Colour profiles (ICC) are not applied, as DALI does
  not apply them. A multi-frame file (GIF, APNG, multi-page TIFF) gives its first frame.
"""
from __future__ import annotations

import io
import re
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

Source = bytes | bytearray | memoryview | str | os.PathLike | Image.Image

# modes whose RGB is Pillow's own convert("RGB"), which matches DALI on them (alpha and transparency dropped)
CONVERTED = ("1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA")
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit unsigned grey
GREY16_AS_I = ("PNG", "PPM")  # formats whose 16-bit grey some Pillow versions open as mode "I"
SUPPORTED = (*CONVERTED, *WIDE_GREY, "I", "F", "CMYK")


def _reason(err: BaseException) -> str:
    """Pillow's message without the object reprs it embeds (``<_io.BytesIO object at 0x7f...>``), so the same
    bad bytes give the same message in every run (skipped.jsonl is compared across resumes)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__


def open_image(src: Source, what: str = "image") -> Image.Image:
    """Open ``src`` (encoded bytes, a file path or a PIL image) lazily, reading only its header.

    Raises ``ValueError`` naming ``what`` when the header cannot be read, or when the mode is one this module
    refuses (see the module docstring), before any pixel is decoded.
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src))
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
            raise ValueError(f"{what}: cannot decode ({_reason(err)})") from None
    if img.mode not in SUPPORTED or (img.mode == "I" and img.format not in GREY16_AS_I):
        kind = f"{img.format} " if img.format else ""
        others = tuple(m for m in SUPPORTED if m != "I")
        raise ValueError(f"{what}: {kind}image mode {img.mode!r} is not supported; expected one of {others}, or "
                         f"mode 'I' from a {' or '.join(GREY16_AS_I)} file (read as 16-bit grey)")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """A loaded image of a supported mode as 8-bit RGB, by the rules of the module docstring."""
    if img.mode in CONVERTED:
        return img.convert("RGB")
    a = np.asarray(img)
    if img.mode == "F":
        grey = np.floor(np.nan_to_num(a, nan=0.0) * np.float32(255) + np.float32(0.5))
    elif img.mode == "CMYK":
        a = a.astype(np.int32)
        return Image.fromarray(((255 - a[..., :3]) * (255 - a[..., 3:]) // 255).astype(np.uint8), "RGB")
    else:  # 16-bit grey
        grey = np.rint(a.astype(np.float64) / 257)
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")


def oriented_size(src: Source, what: str = "image") -> tuple[int, int]:
    """(width, height) that :func:`decode_image` will give, from the header alone (EXIF orientation 5-8
    swaps the sides); ValueError as :func:`open_image`. Lets a caller refuse a size before decoding it."""
    img = open_image(src, what)
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the decoder reports the file itself
        orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_image(src: Source, what: str = "image") -> Image.Image:
    """Decode ``src`` (encoded bytes, a file path or a PIL image) to an 8-bit RGB PIL image, EXIF orientation
    applied, every supported mode mapped to RGB as the module docstring says (DALI's pixels).

    Raises ``ValueError`` naming ``what`` when the data cannot be decoded (corrupt, truncated, not an image,
    over Pillow's decompression-bomb limit) or its mode is not supported.
    """
    img = open_image(src, what)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what}: cannot decode ({_reason(err)})") from None
    return _to_rgb(img)


def decode_rgb_array(src: Source, what: str = "image") -> np.ndarray:
    """:func:`decode_image` as an RGB ``uint8 [H, W, 3]`` array (the training loader's form)."""
    return np.asarray(decode_image(src, what))
