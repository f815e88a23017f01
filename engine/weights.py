"""Checkpoint I/O: safetensors and pickle-free ``.pth`` loading, key maps, atomic saves, converter.

``python -m omniace.engine.weights IN.pth OUT.safetensors [--family ace]`` converts a released
checkpoint to safetensors (after the family's key remap).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)``.

    An optional top-level ``state_dict`` (or ``model``/``ema``) wrapper is unwrapped. A file that would
    need pickled code to load is refused with an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses arbitrary pickled objects
        raise ValueError(
            f"{path}: cannot be loaded without executing pickled code ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); convert it to safetensors with a trusted tool first"
        ) from err
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(obj)


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
    """Write safetensors atomically: a temporary file in the same folder, fsync, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a weights file is for other users and services too
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert(src: str, dst: str, family: str = "ace") -> int:
    sd = load_state_dict_file(src)
    if family == "ace":
        sd = remap_ace_keys(sd, x_embed_in_channels=sd["x_embedder.proj.weight"].shape[1] + 1
                            if "x_embedder.proj.weight" in sd and sd["x_embedder.proj.weight"].shape[1] == 4
                            else None)
    save_safetensors(sd, dst, metadata={"format": "pt", "family": family})
    return len(sd)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert a checkpoint to safetensors (pickle-free load).")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--family", choices=["ace", "sd3", "none"], default="ace")
    args = ap.parse_args(argv)
    n = convert(args.src, args.dst, args.family)
    print(f"wrote {n} tensors to {args.dst}")


if __name__ == "__main__":
    main()
