"""A resumed run must compute what the checkpoint's run computed: its recorded configuration is compared first.

Without the check a different ``--data`` fails with an IndexError inside the loader and a different preset
with a size mismatch deep inside DCP; with it the run stops before any heavy work with one message naming
every differing field, and ``--allow-config-change`` lets named ones through on purpose.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# TrainConfig fields a user changes on resume on purpose (a longer schedule, other log and checkpoint
# intervals, the export dtype) or that do not change what is computed (both decoders give identical
# arrays; activation checkpointing recomputes the same values; the model overrides are compared by their
# effect, the model_config lines, so another spelling of the same model resumes)
FREE = frozenset({"out", "steps", "stop_at", "log_every", "ckpt_every", "keep", "export_dtype", "decoder",
                  "activation_checkpointing", "allow_config_change", "model_override"})
# differences no flag can allow: the checkpoint's tensors or per-rank data positions would not fit
FIXED = {"preset": "the weights' shapes come from it",
         "model_config": "the checkpoint's tensors have its shapes",
         "mode": "the optimizer state is that of its trainable parameters",
         "world_size": "the data position is saved per rank"}
_PATHS = ("data", "init")  # compared resolved, so a relative and an absolute spelling agree


class ConfigMismatchError(ValueError):
    """The checkpoint was written by a run with another configuration."""


def resolve_paths(config: dict) -> dict:
    """``config`` with its file paths absolute (what the checkpoint records)."""
    out = dict(config)
    if out.get("data") is not None:
        out["data"] = [str(Path(p).resolve()) for p in out["data"]]
    if out.get("init") is not None:
        out["init"] = str(Path(out["init"]).resolve())
    return out


def signature(config: dict, world_size: int, model_config: dict) -> dict:
    """The fields that decide what a run computes: ``config`` (a TrainConfig as a dict) less ``FREE``, the
    world size, and the model config flattened to ``model_config.<key>``; JSON-normalised (tuples as lists)."""
    sig = {k: v for k, v in resolve_paths(config).items() if k not in FREE}
    sig["world_size"] = world_size
    sig.update({f"model_config.{k}": v for k, v in model_config.items()})
    return json.loads(json.dumps(sig))


def allowable(config_fields: Iterable[str]) -> list[str]:
    """Field names ``--allow-config-change`` accepts."""
    return sorted(f for f in config_fields if f not in FREE and f not in FIXED)


def _group(key: str) -> str:
    return key.split(".", 1)[0]  # model_config.depth -> model_config


def compare(recorded: dict, current: dict, allowed: Iterable[str], where: str | Path) -> list[str]:
    """Check two :func:`signature` s; return the differing fields that ``allowed`` lets through.

    Raises :class:`ConfigMismatchError` listing each other difference as ``field: checkpoint X, this run Y``.
    """
    allowed = set(allowed)
    missing = object()
    differ = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k, missing) != current.get(k, missing))
    if "preset" in differ:  # another preset: every model_config line would repeat that
        differ = [k for k in differ if _group(k) != "model_config"]
    refused = [k for k in differ if _group(k) in FIXED or _group(k) not in allowed]
    if not refused:
        return differ
    parts = []
    for k in refused:
        part = f"{k}: checkpoint {recorded.get(k, '(not recorded)')!r}, this run {current.get(k, '(not set)')!r}"
        if _group(k) in FIXED:
            part += f" (cannot change on resume: {FIXED[_group(k)]})"
        parts.append(part)
    hint = sorted({_group(k) for k in refused if _group(k) not in FIXED})
    how = f", or pass --allow-config-change {','.join(hint)} to resume anyway" if hint else ""
    if "world_size" in refused:
        how += f"; resume with --nproc_per_node {recorded.get('world_size')} (times the nodes)"
    raise ConfigMismatchError(f"{where} was written by a run with another configuration: {'; '.join(parts)}. "
                              f"Rerun with the checkpoint's values, or train into another --out{how}")
