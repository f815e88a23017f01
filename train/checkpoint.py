"""Atomic, resumable training checkpoints (torch.distributed.checkpoint) and the final safetensors export.

Layout under ``root``: ``step_00000100/`` holds the DCP shards of the model, optimizer and EMA state,
``rank{r}.json`` (each rank's state outside the tensors: its data position, its open log window) and
``meta.json`` (step, world size, the run's configuration, which a resumed run compares with its own).
Every rank writes into ``step_00000100.tmp/``; only when all have finished does rank 0 write
``meta.json`` and rename the folder, so a crash mid-save leaves a ``.tmp`` folder that is never loaded
(and is removed by the next save) while the last complete checkpoint stays intact.

Loading never executes pickled code: DCP's index and its non-tensor entries are pickles, which stock
``dcp.load`` reads with ``pickle.load`` and ``torch.load(weights_only=False)``; :func:`dcp_load` reads the
index with an allow-list of the exact DCP classes and the entries with ``weights_only=True``.
"""
from __future__ import annotations

import json
import enum
import os
import pathlib
import pickle
import re
import shutil
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _dcp_classes() -> dict[tuple[str, str], object]:
    """The exact objects a DCP index pickle may name, keyed by (module, qualified name) as pickled."""
    from torch.distributed.checkpoint import filesystem, metadata
    from torch.serialization import _get_layout

    allowed: dict[tuple[str, str], object] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")}
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = _get_layout  # str -> one of torch's layout constants
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something a DCP index never holds."""


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles only the exact classes in ``allowed`` and builds only the objects it creates.

    ``find_class`` is the single door through which a pickle reaches code (GLOBAL, STACK_GLOBAL, INST, OBJ
    and the EXT opcodes all pass through it). Looking the (module, name) pair up in a dict, instead of
    importing the module and resolving the name, means a dotted name (``os.system`` inside an allowed module,
    which protocol 4 would resolve attribute by attribute) or any other attribute of an allowed module is
    never resolved at all. BUILD, which sets attributes on whatever object is below it on the stack, is
    refused on the allowed globals themselves and on shared singletons (classes, functions, enum members,
    dtypes): a crafted index could otherwise rewrite ``pathlib.PosixPath`` or a DCP class for the whole
    process. The pure-Python unpickler is used because BUILD cannot be intercepted in the C one; an index
    is small (kilobytes per thousand tensors).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed: dict[tuple[str, str], object]):
        super().__init__(file)
        self.allowed = allowed
        self._shared = {id(v) for v in allowed.values()}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):  # TypeError: an unhashable key pushed by a crafted stream
            raise RefusedPickle(f"references {module}.{name}, which a DCP index never holds") from None

    def persistent_load(self, pid):
        raise RefusedPickle("uses a persistent id, which a DCP index never holds")

    def load_build(self):
        target = self.stack[-2]
        if id(target) in self._shared or isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType,
                                                             enum.Enum, torch.dtype, torch.layout)):
            raise RefusedPickle(f"sets attributes of {target!r}, which a DCP index never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def read_dcp_metadata(path: Path):
    """Read a DCP checkpoint's ``.metadata`` index without executing code, and check it.

    Args: ``path``, a DCP checkpoint folder. Returns the ``torch.distributed.checkpoint.metadata.Metadata``.
    Raises ``FileNotFoundError`` without a ``.metadata`` file, ``ValueError`` when the pickle names any global
    outside the DCP index classes (torch itself would import and call it: code execution), is not a
    ``Metadata``, or points a shard outside the folder (``../`` in a storage path).
    """
    from torch.distributed.checkpoint.metadata import Metadata

    meta = Path(path) / ".metadata"
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: no DCP .metadata file")
    try:
        with open(meta, "rb") as f:
            md = RestrictedUnpickler(f, _dcp_classes()).load()
    except RefusedPickle as err:
        raise ValueError(f"{path}: refusing to load this checkpoint: its .metadata pickle {err} (loading it "
                         f"could execute code)") from None
    except Exception as err:  # noqa: BLE001 - a restricted load that fails any other way is a refusal too
        raise ValueError(f"{path}: refusing to load this checkpoint: its .metadata is not a readable DCP index "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(md, Metadata):
        raise ValueError(f"{path}: refusing to load this checkpoint: its .metadata holds a {type(md).__name__}, "
                         f"not a DCP Metadata index")
    for index, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or Path(rel).name != rel or rel in (".", ".."):
            raise ValueError(f"{path}: refusing to load this checkpoint: entry {getattr(index, 'fqn', index)!r} "
                             f"reads {rel!r}, not a file inside the checkpoint folder")
    return md


def _safe_reader_and_planner(path: Path):
    """A FileSystemReader and load planner that unpickle nothing beyond data.

    Stock DCP reads ``.metadata`` with ``pickle.load`` and every non-tensor entry (optimizer hyper-parameters)
    with ``torch.load(weights_only=False)``: both would run code from a crafted checkpoint. Here the index
    goes through :func:`read_dcp_metadata` and the entries through ``torch.load(weights_only=True)``.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise ValueError(f"{path}: per-rank DCP metadata files are not supported")
            md = read_dcp_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafePlanner(DefaultLoadPlanner):
        # DefaultLoadPlanner.load_bytes with weights_only=True: the same placement, no pickled code
        def load_bytes(self, read_item, value) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as err:  # noqa: BLE001 - weights_only refused it: name the entry, never fall back
                raise ValueError(f"{path}: refusing to load this checkpoint: entry {fqn!r} needs pickled code "
                                 f"to load ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeReader(str(path)), SafePlanner()


def dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``path`` into ``state`` in place, through the safe reader."""
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(path)  # refuse before any collective or file read starts
    reader, planner = _safe_reader_and_planner(path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as err:  # DCP wraps each rank's error: surface a refusal as itself
        refusals = [exc for exc, _ in err.failures.values() if isinstance(exc, ValueError)]
        if refusals:
            raise refusals[0] from None
        raise


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
        dcp_load(state, path)
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
    index = read_dcp_metadata(path)
    cfg = config_from_dict(meta["model_config"])
    with torch.device("meta"):
        model = build_model(cfg)
    sd = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    state: dict = {"model": sd}
    if weights == "ema":
        names = {k.split(".", 1)[1] for k in index.state_dict_metadata if k.startswith("ema.")}
        state["ema"] = {k: torch.empty_like(sd[k]) for k in names}
    dcp_load(state, path, no_dist=True)
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


def cli() -> None:
    """``python -m omniace.train.checkpoint``: a refused or missing checkpoint is one line, exit 2."""
    import sys

    try:
        main()
    except (ValueError, OSError) as err:
        print(f"python -m omniace.train.checkpoint: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
