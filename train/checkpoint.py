"""Atomic, resumable training checkpoints (torch.distributed.checkpoint) and the final safetensors export.

Layout under ``root``: ``step_00000100/`` holds the DCP shards of the model, optimizer and EMA state,
``rank{r}.json`` (each rank's state outside the tensors: its data position, its open log window) and
``meta.json`` (step, world size, the run's configuration, which a resumed run compares with its own).
Every rank writes into ``step_00000100.tmp/``; only when all have finished does rank 0 write
``meta.json`` and rename the folder, so a crash mid-save leaves a ``.tmp`` folder that is never loaded
(and is removed by the next save) while the last complete checkpoint stays intact.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# DCP's ``.metadata`` is a plain pickle (torch reads it with pickle.load): before any load it is replayed
# here with only the globals a DCP index holds, so a crafted checkpoint cannot run code
_SAFE_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                 ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_metadata(path: Path) -> None:
    """Refuse a checkpoint whose DCP index would need arbitrary pickled code to load."""
    meta = Path(path) / ".metadata"
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: no DCP .metadata file")
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: refusing to load this checkpoint: its .metadata pickle references {err}, "
                         f"which a DCP index never holds (loading it could execute code)") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep {keep}: at least one checkpoint must be kept")
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: dict, rank_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it with its own shards and its JSON-able ``rank_state``."""
        rank, world = dist.get_rank(), dist.get_world_size()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # left by a crash mid-save
                shutil.rmtree(stale)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _write_json(tmp / f"rank{rank}.json", rank_state)
        dist.barrier()
        if rank == 0:
            _write_json(tmp / "meta.json", {**meta, "step": step, "world_size": world})
            _fsync_dir(tmp)
            if final.exists():  # a re-run of the same step: replaced only once the new one is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        dist.barrier()
        return final

    @staticmethod
    def read_meta(path: Path) -> dict:
        """A checkpoint's ``meta.json``: step, world size, config and model config."""
        return json.loads((Path(path) / "meta.json").read_text())

    def load(self, path: Path, state: dict) -> tuple[dict, dict]:
        """Load shards into ``state`` in place; returns (meta, this rank's ``rank_state``).

        The caller checks first that the checkpoint fits this run (``resume_check``: world size, preset, ...).
        """
        rank = dist.get_rank()
        meta = self.read_meta(path)
        check_metadata(path)
        dcp.load(state, checkpoint_id=str(path))
        own = path / f"rank{rank}.json"
        if not own.exists():  # written before the per-rank file held more than the data position
            return meta, {"loader": json.loads((path / f"loader_rank{rank}.json").read_text())}
        return meta, json.loads(own.read_text())


def export_checkpoint(path: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32") -> Path:
    """Write one checkpoint's weights as a self-describing safetensors file, in a single process.

    ``weights="ema"`` takes the EMA copy of every trainable parameter and the model's own values for the
    frozen ones (what the trainer exports at the end); ``"model"`` the raw weights. Evaluating a run
    mid-way, or a checkpoint of a run that was stopped, needs no process group and no resume.
    """
    from omniace.engine.config import config_from_dict
    from omniace.engine.model import build_model, save_weights

    if weights not in ("ema", "model"):
        raise ValueError(f"weights {weights!r}; expected 'ema' or 'model'")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {sorted(EXPORT_DTYPES)}")
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no meta.json)")
    meta = json.loads((path / "meta.json").read_text())
    check_metadata(path)
    cfg = config_from_dict(meta["model_config"])
    with torch.device("meta"):
        model = build_model(cfg)
    sd = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    state: dict = {"model": sd}
    if weights == "ema":
        reader = dcp.FileSystemReader(str(path))
        names = {k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("ema.")}
        state["ema"] = {k: torch.empty_like(sd[k]) for k in names}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    if weights == "ema":
        sd.update(state["ema"])
    save_weights(sd, cfg, out, EXPORT_DTYPES[dtype], {"step": str(meta["step"]), "weights": weights})
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m omniace.train.checkpoint",
                                 description="export a training checkpoint's weights to safetensors")
    ap.add_argument("checkpoint", help="a step_XXXXXXXX folder, or a run's checkpoints/ folder (its latest)")
    ap.add_argument("out")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    a = ap.parse_args(argv)
    path = Path(a.checkpoint)
    if not (path / "meta.json").exists():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise SystemExit(f"{path}: no complete checkpoint there")
        path = latest
    print(f"wrote {export_checkpoint(path, a.out, a.weights, a.dtype)} from {path}")


if __name__ == "__main__":
    main()
