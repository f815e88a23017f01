"""How much memory one request needs, and how much there is: so a size that would not fit is refused before
sampling rather than swapping the machine or dying with an out-of-memory error halfway.

The estimate (bytes, an upper bound for the reference path; fused attention kernels need less):

- weights: ``parameters x element size`` (0 when they are already resident);
- activations of one denoising forward, blocks running one after another so one block's temporaries live at
  once, with ``N = branches x L`` rows, ``L`` = image tokens + text tokens of one sample, ``d`` the hidden size,
  ``s`` = 2 streams for an SD3 EditNet/ControlNet branch (else 1), ``e`` the element size:

      s x N x d x e x 16          the residual stream, its normalised copy, q, k, v, the attention output
                                  and the MLP's 4d hidden, with headroom
    + heads x L^2 x 8             the scores and softmax of one segment in fp32: the reference attention (the
                                  CPU's) runs one sample's segment at a time; not counted on CUDA, whose
                                  kernels never hold them
    + branches x P x (5k + 2s + 3q + w + 2c + v + r + a + 24) x e  a per-pixel head (``cfg.pixel_head`` = k,
                                  ``cfg.pixel_smooth`` = s, ``cfg.pixel_keys`` = q; w = 3 with
                                  ``cfg.pixel_sigma_data``; c = ``cfg.pixel_conv``, v = 42 with it: its
                                  window of 7 planes, gathered and laid out as an image; r = 6 with
                                  ``cfg.self_condition``; a = 4 with ``cfg.absolute_coords``) over the ``P``
                                  pixels of the largest image: its k features, s upsampled ones, q key
                                  distances and matches, the Wiener estimate, the convolution's c outputs and
                                  window, the previous x0 estimate and its copy in the MLP input, the pixel's
                                  coordinates and their copy, MLP input, 2k hidden, outputs, source and noisy
                                  values per pixel; at 1024x1024 this outweighs the blocks

- the codec: ``pixels x 48`` bytes for the pixel codec (fp32 image in and out), ``pixels x 3072`` for a VAE
  (its decoder's widest stage, 128 channels at full resolution, a few tensors alive, fp32).

The limit is the free memory of the device: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of
``/proc/meminfo`` on the CPU (the free pages where there is no such file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1 << 30
MIB = 1 << 20
PIXEL_CODEC_BYTES = 48  # per pixel
VAE_CODEC_BYTES = 3072  # per pixel


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one request needs: ``weights`` (0 if resident), ``activations`` (one forward), ``codec``."""

    weights: int
    activations: int
    codec: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.codec

    def __str__(self) -> str:
        return (f"{human(self.total)} (weights {human(self.weights)}, activations {human(self.activations)}, "
                f"codec {human(self.codec)})")


def human(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB (a tiny model's estimate is not '0.00 GiB')."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def estimate_memory(model: torch.nn.Module, image_tokens: int, text_tokens: int, branches: int, pixels: int,
                    element_size: int = 4, weights_resident: bool = False, vae: bool = False,
                    scores: bool = True) -> MemoryEstimate:
    """The module docstring's formula for ``model`` (any device, ``meta`` too) over one sample of
    ``image_tokens`` + ``text_tokens`` in ``branches`` CFG branches, and a largest image of ``pixels``;
    ``scores``: count the reference attention's score matrix (False on CUDA)."""
    cfg = model.cfg
    heads = getattr(cfg, "num_heads", None) or cfg.num_attention_heads
    streams = 2 if getattr(cfg, "editnet", False) else 1
    length = image_tokens + text_tokens
    weights = 0 if weights_resident else sum(p.numel() for p in model.parameters()) * element_size
    activations = streams * branches * length * cfg.hidden_size * element_size * 16
    if scores:
        activations += heads * length**2 * 8
    k, smooth, keys, conv = (getattr(cfg, name, 0) for name in ("pixel_head", "pixel_smooth", "pixel_keys",
                                                                 "pixel_conv"))
    wiener = 3 if getattr(cfg, "pixel_sigma_data", 0) else 0  # the head's Wiener estimate, one per channel
    previous = 6 if getattr(cfg, "self_condition", False) else 0  # the previous x0 estimate, held and in the MLP input
    coords = 4 if getattr(cfg, "absolute_coords", False) else 0  # each pixel's (row, col), held and in the MLP input
    if k:
        # the convolution's window, gathered and then laid out as an image: 7 planes over (8 + 4)^2 / 8^2 of
        # the pixels each (<= 3 for tokens of 4 pixels or more)
        window = 2 * 7 * 3 if conv else 0
        activations += branches * pixels * (5 * k + 2 * smooth + 3 * keys + wiener + 2 * conv + window + previous
                                            + coords + 24) * element_size
    codec = pixels * (VAE_CODEC_BYTES if vae else PIXEL_CODEC_BYTES)
    return MemoryEstimate(weights, activations, codec)


def available_memory(device: str | torch.device) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(estimate: MemoryEstimate, limit: int, what: str) -> None:
    """ValueError naming the estimate and the ``limit`` (``what`` it is: "free on cpu", ...) when the estimate
    is larger."""
    if estimate.total > limit:
        raise ValueError(f"this request needs an estimated {estimate}, more than the {human(limit)} {what}; use "
                         f"smaller images or a larger device")
