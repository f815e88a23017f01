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


LDM_SCALING_FACTOR = 0.18215  # SD 1.x's KL-f8 VAE, and ACE's (its SCALE_FACTOR)


class AutoencoderKLCodec:
    """diffusers ``AutoencoderKL`` with its scaling (and shift) factor, from a local diffusers folder, or from
    one LDM-layout checkpoint file (SD 1.x's or scepter's ``vae.bin``), converted by diffusers' own
    single-file converter; such a file holds no config, so its shape is read from the tensors and its
    ``scaling_factor`` is given (default SD's and ACE's 0.18215).

    Raises FileNotFoundError for a missing path, ValueError for a file that is no KL VAE checkpoint."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype=torch.float32,
                 scaling_factor: float = LDM_SCALING_FACTOR):
        diffusers = require("diffusers", "dev", "AutoencoderKLCodec")
        path = Path(path)
        if path.is_file():
            vae = ldm_vae(path, scaling_factor)
        elif (path / "config.json").is_file():
            vae = diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        else:
            raise FileNotFoundError(f"VAE {str(path)!r} is neither a diffusers AutoencoderKL folder (config.json) "
                                    f"nor a checkpoint file")
        self.vae = vae.to(device=device, dtype=dtype).eval()
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


def ldm_vae(path: Path, scaling_factor: float = LDM_SCALING_FACTOR):
    """A diffusers ``AutoencoderKL`` from an LDM-layout KL VAE checkpoint (``encoder.down.0.block.0...``, an
    optional ``first_stage_model.``/``vae.`` prefix): the config read from the tensor shapes (LDM's GroupNorm has
    32 groups), the weights converted by ``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint`` and
    loaded strictly. ValueError naming the file if it is not such a checkpoint."""
    import diffusers
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, convert_ldm_vae_checkpoint

    from .weights import load_state_dict_file

    sd = load_state_dict_file(path)
    for prefix in LDM_VAE_KEYS:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if "encoder.down.0.block.0.conv1.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ValueError(f"{path}: not an LDM-layout KL VAE checkpoint (no encoder.down.0.block.0.conv1.weight / "
                         f"decoder.conv_out.weight)")
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    config = dict(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  block_out_channels=[sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)],
                  layers_per_block=layers, latent_channels=sd["decoder.conv_in.weight"].shape[1],
                  norm_num_groups=32, scaling_factor=scaling_factor, use_quant_conv="quant_conv.weight" in sd,
                  use_post_quant_conv="post_quant_conv.weight" in sd,
                  mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd)
    vae = diffusers.AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(sd, config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not convert to an AutoencoderKL: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return vae
