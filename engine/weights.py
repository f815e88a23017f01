"""Checkpoint I/O: safetensors and pickle-free ``.pth`` loading, key maps, atomic saves, converter.

``python -m omniace.engine.weights IN.pth OUT.safetensors [--family ace] [--preset P]`` converts a released
checkpoint to self-describing safetensors (the family's key remap, the config in the metadata).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]
FAMILIES = ("ace", "sd3", "none")  # key remaps of convert(); "none" keeps the keys


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file; ValueError naming the file if it is not one."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # SafetensorError: header too small/large, incomplete metadata, ...
        raise _unreadable(path, err) from None


def _unreadable(path: str | os.PathLike, err: BaseException) -> ValueError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
    return ValueError(f"{path}: not a readable checkpoint, it may be truncated or corrupt "
                      f"({type(err).__name__}: {reason})")


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)``.

    An optional top-level ``state_dict`` (or ``model``/``ema``) wrapper is unwrapped. Tied weights that
    :func:`save_safetensors` stored once come back under every name (``metadata[alias] = kept``, the
    convention of ``safetensors.torch.save_model``), as one shared tensor.
    Raises FileNotFoundError for a missing file and ValueError naming the file for a truncated or corrupt
    one, one that is neither format (an image, say), or one that would need pickled code to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = read_safetensors_metadata(path)
        try:
            sd = load_file(str(path))
        except Exception as err:
            raise _unreadable(path, err) from None
        for alias, kept in meta.items():
            if kept in sd and alias not in sd:
                sd[alias] = sd[kept]
        return sd
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK..) or, before torch 1.6, a pickle stream (protocol 2+: 0x80)
    if head and not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ValueError(f"{path}: neither a safetensors file nor a torch checkpoint (it starts with {head!r}); "
                         f"expected a .safetensors export or a .pth/.pt/.bin written by torch.save")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # a garbled pickle stream, not a refused object
            raise _unreadable(path, err) from None
        # torch's weights-only unpickler says the same for a refused object and for bytes it cannot parse
        raise ValueError(
            f"{path}: cannot be loaded without executing pickled code, or is truncated or corrupt "
            f"({type(err).__name__}: {str(err.__context__ or err).strip().splitlines()[0][:200]}); if you trust "
            f"it, convert it to safetensors with a trusted tool first"
        ) from err
    except Exception as err:  # a truncated zip (OSError, RuntimeError), an empty file (EOFError), garbage ...
        raise _unreadable(path, err) from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(obj)


def load_diffusers_folder(folder: str | os.PathLike, name: str = "diffusion_pytorch_model") -> tuple[dict, StateDict]:
    """A diffusers model folder (``config.json`` and ``NAME.safetensors``, its shards listed in
    ``NAME.safetensors.index.json``, or ``NAME.bin``) -> ``(config, state_dict)``.

    Raises FileNotFoundError naming the folder and what it lacks, ValueError for an unreadable file."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; expected a diffusers model folder")
    config = json.loads((folder / "config.json").read_text())
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():  # sharded (SD3.5 Large's transformer): every shard the index names
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(load_state_dict_file(folder / shard))
        return config, sd
    for suffix in (".safetensors", ".bin"):
        if (folder / (name + suffix)).is_file():
            return config, load_state_dict_file(folder / (name + suffix))
    raise FileNotFoundError(f"{str(folder)!r} has no {name}.safetensors (nor its shard index, nor {name}.bin)")


def ace_state_dict(sd: StateDict, in_channels: int) -> StateDict:
    """A released ACE checkpoint's state dict in the engine's keys: scepter's remap (:func:`remap_ace_keys`,
    the x embedder padded to ``in_channels + 1`` for the mask channel) and the wrapper's ``model.`` prefix
    dropped. Keys already in the engine's layout pass through unchanged."""
    sd = remap_ace_keys(dict(sd), x_embed_in_channels=in_channels + 1)
    return {k.removeprefix("model."): v for k, v in sd.items()}


def remap_ace_keys(sd: StateDict, x_embed_in_channels: int | None = None) -> StateDict:
    """ACE's ``load_pretrained_model`` remap of PixArt-style keys (ACE_NOTES §10).

    ``cross_attn.q_linear`` -> ``q``, ``proj`` -> ``o``, fused ``kv_linear``/``qkv`` split, ``y_proj``
    flattened; a 4-channel ``x_embedder`` is zero-padded to the mask channel.
    """
    out: StateDict = {}
    for k, v in sd.items():
        k = k.replace(".cross_attn.q_linear.", ".cross_attn.q.")
        k = k.replace(".cross_attn.proj.", ".cross_attn.o.").replace(".attn.proj.", ".attn.o.")
        if ".cross_attn.kv_linear." in k:
            kp, vp = torch.chunk(v, 2, dim=0)
            out[k.replace(".cross_attn.kv_linear.", ".cross_attn.k.")] = kp
            out[k.replace(".cross_attn.kv_linear.", ".cross_attn.v.")] = vp
        elif ".attn.qkv." in k:
            qp, kp, vp = torch.chunk(v, 3, dim=0)
            for name, part in (("q", qp), ("k", kp), ("v", vp)):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part
        elif "y_embedder.y_proj." in k:
            out[k.replace("y_embedder.y_proj.", "y_embedder.")] = v
        elif k == "x_embedder.proj.weight" and x_embed_in_channels and v.shape[1] < x_embed_in_channels:
            padded = v.new_zeros(v.shape[0], x_embed_in_channels, *v.shape[2:])
            padded[:, : v.shape[1]] = v
            out[k] = padded
        else:
            out[k] = v
    return out


def load_into(model: nn.Module, sd: StateDict, allow_missing: tuple[str, ...] = ()) -> None:
    """Strictly load ``sd`` into ``model``: missing, unexpected or mis-shaped keys are an error.

    Keys listed in ``allow_missing`` may be absent (they keep the model's own values).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches: {shapes[:4]}")
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(lines))
    model.load_state_dict(sd, strict=False)


def untie(sd: StateDict) -> tuple[StateDict, dict[str, str]]:
    """Contiguous CPU copies of ``sd`` that safetensors can write (it refuses tensors sharing memory).

    A name whose tensor is exactly another's (tied weights: same storage, offset, shape, stride, dtype)
    is dropped and recorded in the returned ``{alias: kept}``, the first name keeping the data, as
    ``safetensors.torch.save_model`` and transformers do. Other overlapping views are copied.
    """
    out: StateDict = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for name, v in sd.items():
        v = v.detach()
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if v.numel() and key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        out[name] = v.contiguous().cpu()
    spans: dict[int, list[tuple[int, int]]] = {}  # storage -> byte ranges of the tensors kept as they are
    for name, t in out.items():
        start, storage = t.data_ptr(), t.untyped_storage().data_ptr()
        end = start + t.numel() * t.element_size()
        if any(a < end and start < b for a, b in spans.get(storage, [])):
            out[name] = t.clone()  # a different view overlapping a kept one: store its own copy
        elif t.numel():
            spans.setdefault(storage, []).append((start, end))
    return out, aliases


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors serialises the metadata from a Rust HashMap, in an order that changes from call to call,
    so equal weights gave unequal files. The sorted header has the same length (the same strings, compact
    JSON as serde writes it), so the tensor data does not move.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:
            raise RuntimeError(f"{path}: the sorted safetensors header is {len(text)} bytes, the written one {n}")
        f.seek(8)
        f.write(text.ljust(n))


def save_safetensors(sd: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically: a temporary file in the same folder, fsync, then rename.

    The file gets the mode ``0o666 & ~umask`` (readable by other users and services). Tied weights are
    stored once, with their other names in the metadata (:func:`untie`); :func:`load_state_dict_file`
    restores them. Raises ValueError if an alias name is already a metadata key.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases = untie(sd)
    metadata = dict(metadata or {})
    clash = sorted(set(aliases) & set(metadata))
    if clash:
        raise ValueError(f"tied tensor names {clash} are also metadata keys; rename them to save the file")
    metadata.update(aliases)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata=metadata or None)
        _sort_metadata(tmp)  # byte-identical files for equal weights
        # after save_file, not before: safetensors >= 0.8 writes tmp anew and a mode set earlier is lost (0600)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fits(cfg, sd: StateDict) -> str | None:
    """None if ``sd`` loads into ``cfg``'s model (built on the meta device), else why not."""
    from .model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    try:
        load_into(model, sd, allow_missing=("text_position_embeddings.pos",))
    except ValueError as err:
        return str(err)
    return None


def convert(src: str | os.PathLike, dst: str | os.PathLike, family: str = "ace", preset: str | None = None) -> int:
    """Convert checkpoint ``src`` to self-describing safetensors ``dst``: the family's key remap, then the model
    config in the ``omniace_config`` metadata, so that :func:`~.model.load_model` (and ``omniace edit``) need
    no preset. Returns the number of tensor names written (aliases included).

    ``family``: ``"ace"`` (scepter's keys converted) or ``"sd3"`` (EditNet on if the file holds ``editnet.*``
    tensors): the config is ``preset``'s, or without one the family's preset whose shapes the checkpoint fits;
    an sd3 ``src`` may be a diffusers transformer folder, whose config.json is the config. ``"none"``: keys
    kept, a config only with ``preset``. Raises ValueError naming a preset of another family, a checkpoint
    that fits no preset, or several (nothing is written then); FileNotFoundError for a missing ``src``."""
    from dataclasses import replace

    from .config import PRESETS, get_config

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}; expected one of {FAMILIES}")
    src = Path(src)
    cfg = get_config(preset) if preset is not None else None
    if cfg is not None and family != "none" and cfg.family != family:
        raise ValueError(f"preset {preset!r} is a {cfg.family!r} model; --family {family} needs a preset of "
                         f"that family")
    if src.is_dir():
        if family != "sd3" or preset is not None:
            raise ValueError(f"{str(src)!r} is a folder: only --family sd3 converts one (a diffusers transformer "
                             f"folder, whose config.json is the config; no --preset)")
        from .interop import sd3_config_from_diffusers

        config, sd = load_diffusers_folder(src)
        cfg = sd3_config_from_diffusers(config)
    else:
        sd = load_state_dict_file(src)
        if family == "none" and cfg is None:
            save_safetensors(sd, dst, metadata={"format": "pt", "family": family})
            return len(sd)
    editnet = any(k.startswith("editnet.") for k in sd)

    def fit(c):  # the family's remap and EditNet flag (no branch: no branch kind), then whether sd fits
        if family == "sd3" and not src.is_dir():
            c = replace(c, editnet=editnet, control=c.control if editnet else "editnet")
        keys = ace_state_dict(sd, c.in_channels) if family == "ace" else sd
        return c, keys, _fits(c, keys)

    if cfg is not None:
        cfg, sd, why = fit(cfg)
        if why:
            raise ValueError(f"{src}: {why} (config {preset or 'config.json'!r})")
    else:  # the family's presets whose shapes it fits, told apart by config
        found: list[tuple[str, object, StateDict]] = []
        for name, c in PRESETS.items():
            if c.family == family:
                c, keys, why = fit(c)
                if why is None and all(c != f[1] for f in found):
                    found.append((name, c, keys))
        if len(found) != 1:
            fits = f"several {family} presets ({', '.join(f[0] for f in found)})" if found else f"no {family} preset"
            raise ValueError(f"{src}: fits {fits}; name its config with --preset")
        _, cfg, sd = found[0]
    from .model import save_weights

    save_weights(sd, cfg, dst, metadata={"format": "pt", "family": family})
    return len(sd)


def main(argv: list[str] | None = None) -> None:
    """``python -m omniace.engine.weights SRC DST [--family F]``: the same command as ``omniace convert``."""
    from .cli import main as cli_main

    cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
