"""The one image decoder: every image the project reads (CLI, pipeline, session, training loader) goes
through :func:`decode_image`, so the same bytes give the same pixels on every path."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image



def decode_image(src: bytes | str | os.PathLike | Image.Image, what: str = "image") -> Image.Image:
    """Decode ``src`` (encoded bytes, a file path or a PIL image) to an 8-bit RGB PIL image.

    Raises ``ValueError`` naming ``what`` when the data cannot be decoded.
    """
    try:
        img = src if isinstance(src, Image.Image) else Image.open(
            io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src))
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{what}: cannot decode ({err})") from None
    return img.convert("RGB")


def decode_rgb_array(src: bytes | str | os.PathLike | Image.Image, what: str = "image") -> np.ndarray:
    """:func:`decode_image` as an RGB ``uint8 [H, W, 3]`` array (the training loader's form)."""
    return np.asarray(decode_image(src, what))
