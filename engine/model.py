"""Model factory and self-describing checkpoints (safetensors with the config in its metadata)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ACEConfig, SD3Config, config_from_dict, config_to_dict, get_config
from .lcu import PackedLCU
from .weights import load_into, load_state_dict_file, read_safetensors_metadata, save_safetensors


def build_model(cfg: ACEConfig | SD3Config | str) -> torch.nn.Module:
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    if isinstance(cfg, ACEConfig):
        from .ace import ACEModel

        return ACEModel(cfg)
    from .sd3 import SD3Model

    return SD3Model(cfg)


def forward_flops(model: torch.nn.Module, batch: PackedLCU) -> int:
    """Matmul FLOPs of one forward of ``model`` over ``batch`` (the models' own formulas)."""
    frames: list[list[int]] = [[] for _ in range(batch.num_samples)]
    texts: list[list[int]] = [[] for _ in range(batch.num_samples)]
    for s, u, (gh, gw) in zip(batch.frame_sample, batch.frame_unit, batch.frame_shapes):
        frames[s].append(gh * gw)
        texts[s].append(batch.unit_lengths[u])
    if isinstance(model.cfg, ACEConfig):
        return model.flops(frames, texts)
    return model.flops([f[0] for f in frames], [t[0] for t in texts], [sum(f[1:]) for f in frames])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(sd: dict[str, torch.Tensor], cfg: ACEConfig | SD3Config, path: str | Path,
                 dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """A self-describing safetensors file: the config rides in the ``omniace_config`` metadata that
    :func:`load_model` reads; ``dtype`` casts the floating tensors."""
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_safetensors(sd, path, metadata={**(metadata or {}), "omniace_config": json.dumps(config_to_dict(cfg))})


def save_model(model: torch.nn.Module, path: str | Path) -> None:
    save_weights(model.state_dict(), model.cfg, path)


def config_metadata(path: str | Path) -> tuple[str | None, str]:
    """``(omniace_config JSON or None, why it is missing)`` of a weights file: only a ``.safetensors`` trainer
    export carries one; the reason is a phrase for a ValueError (``f"{path} {why}"``)."""
    if not str(path).endswith(".safetensors"):
        return None, "is not a .safetensors trainer export, so it carries no config"
    return read_safetensors_metadata(path).get("omniace_config"), "has no omniace_config metadata"


def load_model(path: str | Path, cfg: ACEConfig | SD3Config | str | None = None) -> torch.nn.Module:
    """Load a checkpoint; the config comes from ``cfg`` or the file's ``omniace_config`` metadata.

    Raises ValueError naming the file if it is truncated or corrupt."""
    if cfg is None:
        meta, why = config_metadata(path)
        if meta is None:
            raise ValueError(f"{path} {why}; pass the model config or preset name")
        try:
            cfg = config_from_dict(json.loads(meta))
            model = build_model(cfg)
        except (ValueError, TypeError, ArithmeticError) as err:  # a config no model can be built from
            raise ValueError(f"{path}: its omniace_config metadata does not describe a model "
                             f"({type(err).__name__}: {err})") from None
    else:
        model = build_model(cfg)
    load_into(model, load_state_dict_file(path), allow_missing=("text_position_embeddings.pos",))
    return model.eval()
