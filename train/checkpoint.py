"""Atomic, resumable training checkpoints (torch.distributed.checkpoint) and the final safetensors export.

Layout under ``root``: ``step_00000100/`` holds the DCP shards of the model, optimizer and EMA state,
``loader_rank{r}.json`` (each rank's data position) and ``meta.json`` (step, world size, config).
Every rank writes into ``step_00000100.tmp/``; only when all have finished does rank 0 write
``meta.json`` and rename the folder, so a crash mid-save leaves a ``.tmp`` folder that is never loaded
(and is removed by the next save) while the last complete checkpoint stays intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step_(\d{8})$")


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

    def save(self, step: int, state: dict, loader_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it with its own shards and loader position."""
        rank, world = dist.get_rank(), dist.get_world_size()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # left by a crash mid-save
                shutil.rmtree(stale)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _write_json(tmp / f"loader_rank{rank}.json", loader_state)
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

    def load(self, path: Path, state: dict) -> tuple[dict, dict]:
        """Load shards into ``state`` in place; returns (meta, this rank's loader position)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != world:
            raise ValueError(f"{path} was written by {meta['world_size']} ranks, this run has {world}: "
                             f"the data position is per rank, so resume with --nproc_per_node "
                             f"{meta['world_size']}")
        dcp.load(state, checkpoint_id=str(path))
        loader_state = json.loads((path / f"loader_rank{rank}.json").read_text())
        return meta, loader_state
