"""Pipelines from the folders users download: a diffusers SD3 / SD3.5 pipeline folder, or an ACE folder.

Text encoders and the VAE load with ``transformers`` / ``diffusers`` (:class:`~.text.SD3TextEncoder`,
:class:`~.text.T5TextEncoder`, :class:`~.codec.AutoencoderKLCodec`); only the denoiser is the engine's.
Every folder and file is checked before the heavy loads, and a missing or mismatched part is an error
naming it.

SD3 folder (``stabilityai/stable-diffusion-3-medium-diffusers``, ``stable-diffusion-3.5-medium`` / ``-large``)::

    model_index.json  scheduler/  transformer/  vae/
    text_encoder/ tokenizer/ (CLIP-L)  text_encoder_2/ tokenizer_2/ (CLIP-G)  [text_encoder_3/ tokenizer_3/ (T5)]

ACE folder (``scepter-studio/ACE-0.6B-512px`` as released, ``docs/real_models.md``)::

    [models/]  dit/<one .pth or .safetensors> (or that file at the top)
               text_encoder/[t5-v1_1-xxl/] (T5, [its tokenizer])  [tokenizer/[t5-v1_1-xxl/]]
               vae/ (the release's LDM-layout vae.bin, or a diffusers AutoencoderKL folder)
"""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from .codec import AutoencoderKLCodec
from .config import ACEConfig, SD3Config, config_from_dict, get_config
from .weights import (ace_state_dict, load_diffusers_folder, load_into, load_state_dict_file,
                      read_safetensors_metadata)

SD3_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SAMPLER_SHIFT = 3.0  # the engine's FlowEulerSampler shift (SD3's scheduler_config.json)


def from_pretrained(folder: str | Path, editnet: str | Path | None = None, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, t5: bool | None = None, preset: str | None = None):
    """An :class:`~.pipeline.EditPipeline` from a diffusers SD3 / SD3.5 folder (it has ``model_index.json``),
    an ACE folder (see the module docstring), or a trainer's output folder (``model.safetensors``, with ``vae/``
    for a latent-space model: :func:`export_pipeline`).

    ``editnet``: an EditNet weights file for an SD3 folder (its ``editnet.*`` tensors; a file that also holds
    base tensors replaces the folder's transformer with them). ``t5``: SD3's T5 (None: used when the folder
    has it; False: zeros in its place, as diffusers does without ``text_encoder_3``). ``preset``: the ACE
    config of a DiT file without ``omniace_config`` metadata (default ``ace-0.6b-512``). ``dtype``: of the
    denoiser, the text encoders and the VAE. Raises FileNotFoundError / ValueError naming what is missing or
    does not fit.
    """
    folder = Path(folder)
    if folder.is_file():
        raise FileNotFoundError(f"pretrained folder {str(folder)!r} is a file, not a model folder; a trainer export "
                                f"file loads with EditPipeline.pretrained(path)")
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained folder {str(folder)!r} does not exist or is not a folder")
    if (folder / "model.safetensors").is_file() and not (folder / "model_index.json").is_file():
        if editnet is not None or t5 is not None or preset is not None:
            raise ValueError(f"{str(folder)!r} is a trainer export folder (model.safetensors): its config is in the "
                             f"file; editnet=, t5= and preset= are for diffusers and ACE folders")
        return export_pipeline(folder, device=device, dtype=dtype)
    if (folder / "model_index.json").is_file():
        if preset is not None:
            raise ValueError(f"preset={preset!r} is for ACE folders; {str(folder)!r} is a diffusers pipeline "
                             f"folder whose transformer/config.json describes the model")
        return sd3_pipeline(folder, editnet, device=device, dtype=dtype, t5=t5)
    if editnet is not None or t5 is not None:
        raise ValueError(f"{str(folder)!r} has no model_index.json, so it is read as an ACE folder; editnet= and "
                         f"t5= are for diffusers SD3 pipeline folders")
    return ace_pipeline(folder, preset, device=device, dtype=dtype)


def export_pipeline(folder: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A trainer's output folder: ``model.safetensors`` (config in its metadata) with, for a latent-space
    preset, ``vae/`` (the diffusers ``AutoencoderKL`` folder its latents were cached with, copied or linked
    there) and optionally ``text_encoder/`` (a T5 folder with its tokenizer); without one, the built-in
    byte-level encoder the tiny presets train with. Raises ValueError when a part the config needs is missing."""
    from .codec import PixelCodec
    from .model import load_model
    from .pipeline import EditPipeline, tiny_sampling, tiny_text_encoder
    from .text import T5TextEncoder

    model = load_model(folder / "model.safetensors")
    cfg = model.cfg
    if (folder / "vae").is_dir():
        codec = AutoencoderKLCodec(folder / "vae", device=device, dtype=dtype)
    elif cfg.codec_factor == 4 and cfg.in_channels == 48:  # the pixel codec's 4x4x3 patches
        codec = PixelCodec(cfg.codec_factor)
    else:
        raise ValueError(f"{str(folder)!r}: a latent-space model ({cfg.in_channels} channels at factor "
                         f"{cfg.codec_factor}) needs its VAE in vae/ (the AutoencoderKL folder its latents were "
                         f"cached with)")
    width = cfg.y_channels if isinstance(cfg, ACEConfig) else cfg.joint_attention_dim
    if (folder / "text_encoder").is_dir():
        text = T5TextEncoder(folder / "text_encoder", device=device, dtype=dtype)
    elif width == 32:
        text = tiny_text_encoder(cfg)
    else:
        raise ValueError(f"{str(folder)!r}: text width {width} needs its text encoder in text_encoder/ (a T5 folder)")
    # a tiny pixel-space export samples as EditPipeline.pretrained samples its file
    tiny = isinstance(codec, PixelCodec) and not isinstance(text, T5TextEncoder)
    return EditPipeline(model, text, codec, device=device, dtype=dtype, **(tiny_sampling(cfg) if tiny else {}))


def _check_scheduler(folder: Path) -> None:
    """The folder's scheduler must be the one the engine samples with (flow Euler, shift 3, no dynamic shift)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return  # diffusers' SD3 folders all have it; without one the engine's SD3 schedule is used
    cfg = json.loads(path.read_text())
    shift, dynamic = cfg.get("shift", 1.0), cfg.get("use_dynamic_shifting", False)
    if cfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler" or shift != SAMPLER_SHIFT or dynamic:
        raise ValueError(f"{path}: {cfg.get('_class_name')} with shift {shift}, use_dynamic_shifting {dynamic}; "
                         f"the engine samples SD3 with FlowMatchEulerDiscreteScheduler, shift {SAMPLER_SHIFT}, "
                         f"no dynamic shifting")


def sd3_pipeline(folder: str | Path, editnet: str | Path | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, t5: bool | None = None):
    """An SD3 / SD3.5 (+ EditNet) :class:`~.pipeline.EditPipeline` from a diffusers pipeline folder
    (arguments as :func:`from_pretrained`)."""
    from .interop import sd3_from_diffusers
    from .pipeline import EditPipeline
    from .text import SD3TextEncoder

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if not str(name).startswith("StableDiffusion3"):
        raise ValueError(f"{folder / 'model_index.json'}: a {name!r} folder; expected a StableDiffusion3Pipeline "
                         f"folder (SD3, SD3.5)")
    missing = [p for p in SD3_PARTS if not (folder / p).is_dir()]
    has_t5 = all((folder / p).is_dir() for p in T5_PARTS)
    if t5 and not has_t5:
        missing += [p for p in T5_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} lacks {', '.join(missing)}; expected a diffusers "
                                f"StableDiffusion3Pipeline folder")
    if editnet is not None and not Path(editnet).is_file():
        raise FileNotFoundError(f"editnet weights {str(editnet)!r} do not exist")
    _check_scheduler(folder)
    config, sd = load_diffusers_folder(folder / "transformer")
    codec = AutoencoderKLCodec(folder / "vae", device=device, dtype=dtype)
    if codec.latent_channels != config.get("in_channels"):
        raise ValueError(f"{folder}: the VAE has {codec.latent_channels} latent channels, the transformer takes "
                         f"{config.get('in_channels')}")
    model = sd3_from_diffusers(config, sd, editnet=editnet is not None, codec_factor=codec.factor)
    if editnet is not None:
        load_editnet(model, editnet)
    text = SD3TextEncoder(folder, width=model.cfg.joint_attention_dim, t5=has_t5 if t5 is None else t5,
                          device=device, dtype=dtype)
    if text.pooled_dim != model.cfg.pooled_projection_dim:
        raise ValueError(f"{folder}: the CLIPs' pooled outputs are {text.pooled_dim} wide, the transformer's "
                         f"pooled_projection_dim is {model.cfg.pooled_projection_dim}")
    return EditPipeline(model.to(dtype), text, codec, device=device)


def load_editnet(model: torch.nn.Module, path: str | Path) -> None:
    """Load an EditNet weights file into an SD3 + EditNet ``model``: its ``editnet.*`` tensors (all of them),
    and any base tensors it also holds (a trainer export holds both). A file whose ``omniace_config``
    describes another model is refused, naming the fields that differ."""
    path = Path(path)
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if "omniace_config" in meta:
        theirs = config_from_dict(json.loads(meta["omniace_config"]))
        ours = model.cfg
        differ = {f.name: (getattr(theirs, f.name, None), getattr(ours, f.name)) for f in fields(ours)
                  if f.compare and getattr(theirs, f.name, None) != getattr(ours, f.name)}
        if differ:
            raise ValueError(f"{path}: its omniace_config differs from the pipeline folder's model in "
                             + ", ".join(f"{k} ({a!r} there, {b!r} here)" for k, (a, b) in differ.items()))
    sd = load_state_dict_file(path)
    if not any(k.startswith("editnet.") for k in sd):
        raise ValueError(f"{path}: no editnet.* tensors; expected EditNet weights (a trainer export or "
                         f"SD3Model.editnet's state dict under 'editnet.')")
    missing = [k for k in model.state_dict() if k.startswith("editnet.") and k not in sd]
    if missing:
        raise ValueError(f"{path}: {len(missing)} EditNet tensors missing, e.g. {missing[:4]}")
    load_into(model, {**model.state_dict(), **sd})


def find_checkpoint(folder: Path, dirs: tuple[str, ...], what: str) -> Path:
    """The one checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.ckpt``) in the first of ``dirs``
    (relative to ``folder``, ``""`` the folder itself) that holds any; ValueError for none or several."""
    found: list[Path] = []
    for d in dirs:
        if (folder / d).is_dir():
            found = [p for p in sorted((folder / d).iterdir()) if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
        if found:
            break
    if len(found) == 1:
        return found[0]
    raise ValueError(f"{str(folder)!r}: expected one {what} checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) in "
                     f"{' or '.join((d or '.') + '/' for d in dirs)}, found "
                     f"{[str(p.relative_to(folder)) for p in found] or 'none'}")


def model_dir(path: Path) -> Path:
    """``path``, or its only sub-folder when ``path`` holds nothing but that one (the release's
    ``text_encoder/t5-v1_1-xxl/``)."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else path


def ace_pipeline(folder: str | Path, preset: str | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """An ACE :class:`~.pipeline.EditPipeline` from an ACE folder (arguments as :func:`from_pretrained`).

    The DiT is a self-describing safetensors (``omniace convert``) or a released checkpoint (.pth or
    safetensors, scepter's keys converted as ``omniace convert --family ace`` does) with ``preset``'s config.
    An image-indicator table never filled (``text_position_embeddings``; scepter's test: its sum is not > 0)
    is filled from the T5 encoder, as scepter does on first use."""
    from .model import build_model
    from .pipeline import EditPipeline
    from .text import T5TextEncoder, indicator_table

    folder = Path(folder)
    if (folder / "models").is_dir() and not (folder / "dit").is_dir():
        folder = folder / "models"  # the release keeps its parts under models/
    missing = [p for p in ("text_encoder", "vae") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} lacks {', '.join(p + '/' for p in missing)}; expected an ACE folder "
                                f"(dit/, text_encoder/, vae/) or a diffusers pipeline folder with model_index.json")
    # the release's vae/vae.bin (LDM layout), or a diffusers AutoencoderKL folder
    vae = folder / "vae" if (folder / "vae" / "config.json").is_file() else find_checkpoint(folder, ("vae",), "VAE")
    dit = find_checkpoint(folder, ("dit", ""), "DiT")
    meta = read_safetensors_metadata(dit) if dit.suffix == ".safetensors" else {}
    if "omniace_config" in meta:
        if preset is not None:
            raise ValueError(f"{dit} describes its own config (omniace_config); preset={preset!r} is for files "
                             f"without one")
        cfg = config_from_dict(json.loads(meta["omniace_config"]))
    else:
        cfg = get_config(preset or "ace-0.6b-512")
    if not isinstance(cfg, ACEConfig):
        raise ValueError(f"{dit}: an {cfg.family!r} model; an ACE folder holds an ACE DiT")
    codec = AutoencoderKLCodec(vae, device=device, dtype=dtype)
    if codec.latent_channels != cfg.in_channels:
        raise ValueError(f"{folder}: the VAE has {codec.latent_channels} latent channels, the DiT takes "
                         f"{cfg.in_channels}")
    if "omniace_config" in meta and cfg.codec_factor != codec.factor:
        raise ValueError(f"{dit} was made for a VAE of factor {cfg.codec_factor}; {vae} has factor {codec.factor}")
    cfg = replace(cfg, codec_factor=codec.factor)  # a preset's codec factor is the paired VAE's
    tokenizer = model_dir(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    text = T5TextEncoder(model_dir(folder / "text_encoder"), max_len=cfg.text_len, device=device,
                         dtype=dtype, tokenizer=tokenizer)
    if text.dim != cfg.y_channels:
        raise ValueError(f"{folder}: T5's d_model {text.dim} differs from the DiT's y_channels {cfg.y_channels}")
    model = build_model(cfg)
    load_into(model, ace_state_dict(load_state_dict_file(dit), cfg.in_channels),
              allow_missing=("text_position_embeddings.pos",))
    table = model.text_position_embeddings.pos
    if not table.sum() > 0:
        with torch.no_grad():
            table.copy_(indicator_table(text, cfg.num_indicators))
    return EditPipeline(model.to(dtype), text, codec, device=device)
