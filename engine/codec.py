"""Latent codecs: a lossless pixel-space codec for the tiny default, diffusers AutoencoderKL otherwise.

A codec maps images ``[3, H, W]`` in [-1, 1] to latents ``[C, H/f, W/f]`` and back; ``factor`` is f.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from omniace import require


class PixelCodec:
    """Space-to-depth by ``factor``: exact and invertible; ``3 f²`` latent channels."""

    def __init__(self, factor: int = 4):
        self.factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, image: Tensor) -> Tensor:
        return F.pixel_unshuffle(image[None], self.factor)[0]

    def decode(self, latent: Tensor) -> Tensor:
        return F.pixel_shuffle(latent[None], self.factor)[0].clamp(-1, 1)


class AutoencoderKLCodec:
    """diffusers ``AutoencoderKL`` from a local folder, with its scaling (and shift) factor."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype=torch.float32):
        diffusers = require("diffusers", "dev", "AutoencoderKLCodec")
        self.vae = diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True,
                                                           torch_dtype=dtype).to(device).eval()
        cfg = self.vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = cfg.latent_channels
        self.scale = cfg.scaling_factor
        self.shift = getattr(cfg, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, image: Tensor) -> Tensor:
        lat = self.vae.encode(image[None].to(self.vae.dtype)).latent_dist.mode()[0]
        return ((lat - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        img = self.vae.decode((latent[None] / self.scale + self.shift).to(self.vae.dtype)).sample[0]
        return img.float().clamp(-1, 1)
