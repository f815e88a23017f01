"""Encode an OmniEdit corpus once into VAE latent shards, so latent-space presets train without a VAE.

Launch (``--nproc_per_node`` ranks share the units; plain ``python -m`` runs one process)::

    python -m omniace.train.cache --data omniedit/ --vae sd3-medium/vae --out cache/
    torchrun --nproc_per_node 8 -m omniace.train.cache --data omniedit/ --vae sd3-medium/vae --out cache/
    torchrun --nproc_per_node 8 -m omniace.train.trainer --data cache/ --preset sd3-medium-editnet ...

The VAE is a diffusers ``AutoencoderKL`` folder (``config.json`` and its weights, e.g. the ``vae/`` of an
SD3 pipeline); a latent is ``(posterior mode - shift_factor) * scaling_factor`` with both factors from its
config (``engine.codec.AutoencoderKLCodec``), the mean of the posterior: no sampling noise is cached.

With ``--text-encoder`` the instructions' text states are cached too (every instruction the loader can
build from a row for ``--text-family``, see ``data.instruction_texts``), and the trainer takes them instead of
running a text encoder: ``tiny:PRESET`` (the byte-level encoder a tiny preset trains with) or ``t5:FOLDER``
(``engine.text.T5TextEncoder``, ACE's).

``--out`` holds ``cache.json`` (the format, the VAE and its factors, the text encoder, the settings, the
source shards, one entry per unit; once every unit is written, ``complete`` and the totals),
``skipped.jsonl`` (once complete), ``texts.safetensors`` (with a text encoder: the empty instruction and the
image indicators) and ``units/SSSSS-GGGGG.safetensors``: one per row group ``G`` of source shard ``S``,
holding per kept row ``i`` the latents ``i/src_img`` (none for a text-to-image row), ``i/edited_img``,
``i/ref_img`` (a reference-guided row's), ``i/history[k].image`` (``[C, H/f, W/f]``, ``--dtype``) and ``i/mask_img`` (``[H/f, W/f]`` float, 1 = edit: the binarised mask the
loader trains on), with a text encoder ``i/text/j`` (``[L, Y]``) and ``i/pooled/j`` (``[P]``, SD3 family)
for the row's instruction ``j`` (its ``_texts``), and in its metadata the rows' other columns (``rows``) and
the row group's skipped records (``skipped``).

Rows are checked as the loader checks them (``omniedit_format.check_row`` with ``--patch-size`` times the
VAE's factor as the size unit and the size caps), images decoded by the loader's decoders (header size
first); a bad row, a corrupt image and an unusable shard are skipped, counted and reported one by one
(``on_skip``; ``skipped.jsonl``), never encoded. The token budget and the importance weight are left to
the trainer, so they can change without encoding again.

Resumable and atomic: a unit is written under a temporary name and renamed once complete; a rerun of the
same command skips the units present (with other settings or another VAE it stops, naming the fields).
Unit ``i`` goes to rank ``i % world``; the run ends on rank 0 with ``cache.json`` marked complete, which
the loader requires. Progress (units, rows, images/s, ETA) is logged per unit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
from torch import Tensor

from omniace.engine.codec import AutoencoderKLCodec, PixelCodec
from omniace.engine.config import get_config
from omniace.engine.lcu import indicator_token
from omniace.engine.pipeline import tiny_text_encoder, to_tensor
from omniace.engine.text import EncodedText

from .data import (DataConfig, RecordStream, decode_images, first_error, image_fields, instruction_texts,
                   make_decoder, mask_latent, record_id, report_skip)
from .omniedit_format import check_row

FORMAT = "omniace-latent-cache/1"
MANIFEST = "cache.json"
UNITS = "units"
SKIPPED = "skipped.jsonl"
TEXTS = "texts.safetensors"
PLANNED = ("file", "source", "row_group", "source_rows")  # a unit's entry in the manifest before it is written
# the instructions every cache with text holds once: the empty one (a dropped prompt) and ACE's indicators
SHARED_TEXTS = ["", *(indicator_token(i) for i in range(10))]
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CAPS = DataConfig(paths=[])  # the loader's default size caps


def _opt(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class CacheConfig:
    data: list[str] = _opt([], "OmniEdit Parquet files or folders of them (required)")
    vae: str = _opt("", "diffusers AutoencoderKL folder: config.json and its weights (required); 'pixel': the tiny "
                        "presets' pixel codec (comparisons)")
    out: str = _opt("", "cache folder: cache.json, units/, skipped.jsonl (required)")
    patch_size: int = _opt(2, "the model's patch size: a side must be a multiple of patch size x VAE factor")
    max_pixels: int = _opt(_CAPS.max_pixels, "skip rows with more pixels per image (the loader's cap)")
    max_aspect: float = _opt(_CAPS.max_aspect, "skip rows whose longer / shorter side exceeds this")
    max_side: int | None = _opt(None, "skip rows with a longer side in pixels (default: no cap)")
    dtype: str = _opt("fp32", "dtype of the stored latents and text states: fp32 | bf16 | fp16 (half the disk)")
    vae_dtype: str = _opt("fp32", "dtype the VAE runs in: fp32 | bf16 | fp16")
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK if a GPU is there, else cpu) | cpu | cuda[:N]")
    decoder: str = _opt("auto", "image decoder: auto (DALI if installed, else PIL) | dali | pil")
    batch_size: int = _opt(16, "rows decoded at a time, and images of one size per VAE call")
    text_encoder: str | None = _opt(None, "also cache the instructions' text states: tiny:PRESET (a tiny preset's "
                                          "built-in encoder) | t5:FOLDER (T5TextEncoder)")
    text_family: str | None = _opt(None, "the instruction formats to cache: ace (image indicators, history) | sd3; "
                                         "default: the tiny preset's family, ace for t5")

    def __post_init__(self) -> None:
        for name in ("data", "vae", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in ("dtype", "vae_dtype"):
            if getattr(self, name) not in STORE_DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r}; expected one of {sorted(STORE_DTYPES)}")
        if self.decoder not in ("auto", "dali", "pil"):
            raise ValueError(f"decoder {self.decoder!r}; expected auto, dali or pil")
        if self.patch_size < 1 or self.batch_size < 1:
            raise ValueError(f"patch_size ({self.patch_size}) and batch_size ({self.batch_size}) must be >= 1")
        DataConfig(paths=[], max_pixels=self.max_pixels, max_aspect=self.max_aspect, max_side=self.max_side)
        out = Path(self.out)
        blocker = next((p for p in (out, *out.parents) if p.exists()), None)  # what the folder would be made in
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"--out {self.out}: {blocker} is a file; expected a cache folder")
        vae = Path(self.vae)
        if self.vae != "pixel" and not (vae / "config.json").is_file():
            raise ValueError(f"--vae {self.vae}: not a diffusers AutoencoderKL folder (no config.json there)")
        if self.text_family not in (None, "ace", "sd3"):
            raise ValueError(f"text_family {self.text_family!r}; expected ace or sd3")
        if self.text_encoder is not None:
            kind, _, arg = self.text_encoder.partition(":")
            if kind not in ("tiny", "t5") or not arg:
                raise ValueError(f"text_encoder {self.text_encoder!r}; expected tiny:PRESET or t5:FOLDER")
            if kind == "tiny":
                get_config(arg)  # ValueError naming the presets
            elif not Path(arg).is_dir():
                raise ValueError(f"text_encoder {self.text_encoder!r}: {arg} is not a folder")

    def settings(self) -> dict:
        """What decides the cache's content: a resume must repeat these exactly."""
        return {"data": [str(Path(p).resolve()) for p in self.data], "patch_size": self.patch_size,
                "max_pixels": self.max_pixels, "max_aspect": self.max_aspect, "max_side": self.max_side,
                "dtype": self.dtype, "vae_dtype": self.vae_dtype, "text_encoder": self.text_encoder,
                "text_family": self.text_family}


# --- codecs ----------------------------------------------------------------------------------------
def open_codec(cfg: CacheConfig, device: torch.device) -> AutoencoderKLCodec | PixelCodec:
    """The VAE of ``--vae`` on ``device``; ``"pixel"``: the tiny models' pixel codec (tests, comparisons)."""
    if cfg.vae == "pixel":
        return PixelCodec(4)
    try:
        return AutoencoderKLCodec(cfg.vae, device=str(device), dtype=STORE_DTYPES[cfg.vae_dtype])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--vae {cfg.vae}: cannot load a diffusers AutoencoderKL from it "
                         f"({type(err).__name__}: {err})") from None


def describe_codec(codec: AutoencoderKLCodec | PixelCodec, path: str) -> dict:
    """What a cache's latents mean: the loader and the trainer check a model against it."""
    if isinstance(codec, PixelCodec):
        return {"kind": "pixel", "factor": codec.factor, "latent_channels": codec.latent_channels}
    folder = Path(path).resolve()
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())  # the weights by name and size (cheap)
    return {"kind": "AutoencoderKL", "path": str(folder), "fingerprint": digest.hexdigest()[:16],
            "factor": codec.factor, "latent_channels": codec.latent_channels,
            "scaling_factor": codec.scale, "shift_factor": codec.shift}


def open_text_encoder(cfg: CacheConfig, device: torch.device):
    """``(encoder, info)`` for ``--text-encoder``, or ``(None, None)``; ``info`` (family, widths) goes in the
    manifest, where the trainer checks a model against it."""
    if cfg.text_encoder is None:
        return None, None
    kind, _, arg = cfg.text_encoder.partition(":")
    if kind == "tiny":
        model_cfg = get_config(arg)
        encoder, family = tiny_text_encoder(model_cfg), model_cfg.family
    else:
        from omniace.engine.text import T5TextEncoder

        encoder, family = T5TextEncoder(arg, device=str(device), dtype=torch.float32), "ace"
    family = cfg.text_family or family
    return encoder, {"encoder": cfg.text_encoder, "family": family, "dim": encoder.dim,
                     "pooled_dim": encoder.pooled_dim}


def _text_tensors(encoded: list[EncodedText], prefix: str, dtype: torch.dtype) -> dict[str, Tensor]:
    out = {}
    for j, e in enumerate(encoded):
        out[f"{prefix}text/{j}"] = e.tokens.to(dtype).contiguous()
        if e.pooled is not None:
            out[f"{prefix}pooled/{j}"] = e.pooled.to(dtype).contiguous()
    return out


@torch.no_grad()
def encode_batch(codec: AutoencoderKLCodec | PixelCodec, images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, C, H/f, W/f]`` float32 on the CPU: ``codec.encode`` of each image,
    in one VAE call."""
    vae = getattr(codec, "vae", None)
    if vae is None:
        return torch.stack([codec.encode(x) for x in images])
    lat = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
    return ((lat - codec.shift) * codec.scale).float().cpu()


# --- writing ---------------------------------------------------------------------------------------
def unit_file(source: int, group: int) -> str:
    return f"{UNITS}/{source:05d}-{group:05d}.safetensors"


def _stored_row(row: dict) -> dict:
    """The row's columns without image bytes (their paths kept): what the loader reads besides latents."""
    out = dict(row)
    for name in ("src_img", "edited_img", "mask_img", "ref_img"):
        if out.get(name) is not None:
            out[name] = {"path": out[name].get("path")}
    if out.get("history"):
        out["history"] = [{"prompt": t["prompt"], "image": {"path": t["image"].get("path")}} for t in out["history"]]
    return out


@dataclass
class UnitResult:
    tensors: dict[str, Tensor]
    rows: list[dict]
    skipped: list[dict]
    images: int  # images put through the VAE


class Encoder:
    """Encodes row groups of a :class:`~omniace.train.data.RecordStream` into unit tensors, skipping (with
    ``on_skip`` and a count in ``stats``) what the loader would skip."""

    def __init__(self, cfg: CacheConfig, codec, log: Callable[[str], None] = print, text=(None, None)):
        self.cfg, self.codec, self.log = cfg, codec, log
        self.text_encoder, self.text = text
        self.decoder = make_decoder(cfg.decoder)
        self.stats: dict[str, int] = {"rows": 0, "bad_row": 0, "corrupt_image": 0}
        self._warned: set[str] = set()
        self.dtype = STORE_DTYPES[cfg.dtype]

    def unit(self, stream: RecordStream, s: int, g: int) -> UnitResult:
        cfg, f = self.cfg, self.codec.factor
        skipped: list[dict] = []

        def skip(kind: str, rid: str, reason: str) -> None:
            report_skip(self.stats, self._warned, skipped.append, self.log, kind, rid, reason)

        valid = []
        for r, row in enumerate(stream.rows(s, g)):
            try:
                valid.append(check_row(row, cfg.patch_size * f, cfg.max_pixels, cfg.max_aspect, cfg.max_side))
            except ValueError as err:  # BadRow
                skip("bad_row", record_id(row, stream.files[s], g, r), err.args[0])
        tensors: dict[str, Tensor] = {}
        kept: list[dict] = []
        n_images = 0
        for start in range(0, len(valid), cfg.batch_size):  # a few rows at a time: decoded images are large
            rows = valid[start:start + cfg.batch_size]
            named = [(image_fields(row, None, mask=True), (row["width"], row["height"])) for row in rows]
            by_size: dict[tuple[int, int], list[tuple[str, Tensor]]] = {}
            for row, images in zip(rows, decode_images(self.decoder, named)):
                why = first_error(images)
                if why is not None:
                    skip("corrupt_image", row["omni_edit_id"], why)
                    continue
                i = len(kept)
                kept.append(row)
                for name, arr in images.items():
                    if name == "mask_img":
                        tensors[f"{i}/{name}"] = mask_latent(arr, f)
                    else:
                        by_size.setdefault(arr.shape[:2], []).append((f"{i}/{name}", to_tensor(arr)))
            for todo in by_size.values():  # one VAE call per image size
                for k in range(0, len(todo), cfg.batch_size):
                    chunk = todo[k:k + cfg.batch_size]
                    for (key, _), lat in zip(chunk, encode_batch(self.codec, torch.stack([x for _, x in chunk]))):
                        tensors[key] = lat.to(self.dtype).contiguous()
                    n_images += len(chunk)
        stored = [_stored_row(row) for row in kept]
        if self.text_encoder is not None:
            for i, row in enumerate(stored):
                row["_texts"] = instruction_texts(row, self.text["family"])
                tensors.update(_text_tensors(self.text_encoder.encode(row["_texts"]), f"{i}/", self.dtype))
        self.stats["rows"] += len(kept)
        source = str(stream.files[s])
        return UnitResult(tensors, stored,
                          [{**r, "source": source, "row_group": g} for r in skipped], n_images)


def write_unit(path: Path, result: UnitResult) -> None:
    """One unit file, atomically: a reader (or a resumed run) sees the whole file or none."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(result.tensors, str(tmp), metadata={"format": FORMAT, "rows": json.dumps(result.rows),
                                                   "skipped": json.dumps(result.skipped),
                                                   "images": str(result.images)})
    os.replace(tmp, path)


def read_unit_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable latent cache unit ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latent cache unit of format {FORMAT} (format {meta.get('format')!r})")
    return meta


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plan(cfg: CacheConfig, codec, stream: RecordStream, text: dict | None = None) -> dict:
    """The manifest of a cache of ``stream``'s row groups, before any unit is written."""
    return {"format": FORMAT, "complete": False, "codec": describe_codec(codec, cfg.vae), "text": text,
            "settings": cfg.settings(), "sources": [str(f.resolve()) for f in stream.files],
            "bad_shards": [{"id": str(f), "kind": "bad_shard", "reason": why} for f, why in stream.bad_shards],
            "units": [dict(zip(PLANNED, (unit_file(s, g), s, g, n))) for s, g, n in stream.groups]}


def prepare(out: Path, manifest: dict) -> bool:
    """Write the manifest of a new cache, or check an existing one against it; True when resuming.

    Raises ValueError naming each field (codec, settings, sources, units) that differs from the existing
    cache's: its units would mean something else."""
    path = out / MANIFEST
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, manifest)
        return False
    old = json.loads(path.read_text())
    old["units"] = [{k: u.get(k) for k in PLANNED} for u in old.get("units", [])]  # (a complete one adds "rows")
    diffs = [k for k in ("format", "codec", "text", "settings", "sources", "units") if old.get(k) != manifest[k]]
    for k in ("codec", "settings"):
        if k in diffs and isinstance(old.get(k), dict):
            diffs[diffs.index(k)] = ", ".join(f"{k}.{n} (cache {old[k].get(n)!r}, this run {v!r})"
                                              for n, v in manifest[k].items() if old[k].get(n) != v) or k
    if diffs:
        raise ValueError(f"{out} holds a latent cache made differently: {'; '.join(diffs)}; use another --out, "
                         f"or delete it to encode again")
    return True


def finalize(out: Path, log: Callable[[str], None] = print) -> dict:
    """Mark the cache complete: every unit present; the totals and ``skipped.jsonl`` from the units' metadata.

    Raises ValueError naming the first units that are missing (a rank failed: rerun to finish them)."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    missing = [u["file"] for u in manifest["units"] if not (out / u["file"]).is_file()]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {len(manifest['units'])} units are not written ({missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}); rerun the same command to finish them")
    skipped = list(manifest["bad_shards"])
    totals = {"rows": 0, "images": 0, "bad_row": 0, "corrupt_image": 0, "bad_shard": len(skipped)}
    for u in manifest["units"]:
        meta = read_unit_metadata(out / u["file"])
        u["rows"] = len(json.loads(meta["rows"]))
        totals["rows"] += u["rows"]
        totals["images"] += int(meta["images"])
        for rec in json.loads(meta["skipped"]):
            totals[rec["kind"]] += 1
            skipped.append(rec)
    tmp = out / (SKIPPED + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in skipped))
    os.replace(tmp, out / SKIPPED)
    for stale in (out / UNITS).glob("*.tmp"):  # left by a killed run; every unit is complete now
        stale.unlink()
    manifest.update(complete=True, totals=totals)
    _write_json(path, manifest)
    log(f"cache: complete: {out}: {totals['rows']} rows, {totals['images']} images encoded; skipped "
        f"{totals['bad_row']} bad rows, {totals['corrupt_image']} with a corrupt image, {totals['bad_shard']} "
        f"bad shards ({SKIPPED})")
    return manifest


def _rate(images: int, seconds: float) -> str:
    return f"{images / max(seconds, 1e-9):.3g} images/s"  # 3 digits: a CPU encodes well under 1 image/s


def encode_units(cfg: CacheConfig, codec, stream: RecordStream, manifest: dict, rank: int = 0, world: int = 1,
                 log: Callable[[str], None] = print, text=(None, None)) -> dict:
    """Write this rank's units (``i % world == rank``) that are not there yet; returns this rank's counts
    (units written, rows kept, images encoded, seconds)."""
    out = Path(cfg.out)
    mine = [u for i, u in enumerate(manifest["units"]) if i % world == rank]
    todo = [u for u in mine if not (out / u["file"]).is_file()]
    if len(todo) < len(mine):
        log(f"cache: rank {rank}: {len(mine) - len(todo)} of its {len(mine)} units are written already")
    encoder = Encoder(cfg, codec, log, text)
    start, images, rows_done = time.perf_counter(), 0, 0
    rows_todo = sum(u["source_rows"] for u in todo)
    for k, u in enumerate(todo, 1):
        result = encoder.unit(stream, u["source"], u["row_group"])
        write_unit(out / u["file"], result)
        images += result.images
        rows_done += u["source_rows"]
        took = time.perf_counter() - start
        eta = timedelta(seconds=round(took / rows_done * (rows_todo - rows_done))) if rows_done else "?"
        log(f"cache: rank {rank}: unit {k}/{len(todo)} ({Path(stream.files[u['source']]).name} row group "
            f"{u['row_group']}): {len(result.rows)} rows, {len(result.skipped)} skipped | "
            f"{_rate(images, took)} | ETA {eta}")
    took = time.perf_counter() - start
    return {"units": len(todo), "rows": encoder.stats["rows"], "images": images, "seconds": took}


def _alone(obj):
    return obj


def build_cache(cfg: CacheConfig, rank: int = 0, world: int = 1, log: Callable[[str], None] = print,
                share: Callable[[object], object] = _alone, device: torch.device | None = None) -> dict | None:
    """The whole job on one rank: plan, write this rank's units, and on rank 0 (once every rank is done) mark
    the cache complete. Returns the manifest on rank 0, None elsewhere. ``share(obj)`` returns rank 0's
    ``obj`` on every rank (a broadcast under torchrun; it also synchronises them), so a refusal on rank 0
    (another cache in ``--out``) is raised on every rank."""
    codec = open_codec(cfg, device or torch.device("cpu"))
    text = open_text_encoder(cfg, device or torch.device("cpu"))
    stream = RecordStream(cfg.data, seed=0)  # every rank plans the same units from the same shards
    manifest = plan(cfg, codec, stream, text[1])
    refused = None
    if rank == 0:
        try:
            resumed = prepare(Path(cfg.out), manifest)
        except ValueError as err:
            refused = err
        else:
            if text[0] is not None:
                write_unit(Path(cfg.out) / TEXTS, UnitResult(
                    _text_tensors(text[0].encode(SHARED_TEXTS), "", STORE_DTYPES[cfg.dtype]),
                    [{"_texts": SHARED_TEXTS}], [], 0))
            for rec in manifest["bad_shards"]:
                log(f"cache: skipping a shard (bad_shard): {rec['id']}: {rec['reason']}")
            log(f"cache: {'resuming ' if resumed else ''}{len(manifest['units'])} units "
                f"({sum(n for *_, n in stream.groups)} rows in {len(stream.files)} shards) -> {cfg.out} on {world} "
                f"rank(s); VAE {manifest['codec']['kind']} (factor {codec.factor}, {codec.latent_channels} channels)")
    refused = share(refused)
    if refused is not None:
        raise refused
    done = encode_units(cfg, codec, stream, manifest, rank, world, log, text)
    log(f"cache: rank {rank}: encoded {done['images']} images ({done['rows']} rows, {done['units']} units) in "
        f"{done['seconds']:.1f} s: {_rate(done['images'], done['seconds'])}")
    share(None)  # every rank's units are written
    return finalize(Path(cfg.out), log) if rank == 0 else None


# --- reading ---------------------------------------------------------------------------------------
def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    """A complete cache's manifest; ValueError naming the folder for another format or an unfinished cache."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: a cache of format {manifest.get('format')!r}; this omniace reads {FORMAT}")
    if not manifest.get("complete"):
        done = sum((Path(path) / u["file"]).is_file() for u in manifest["units"])
        raise ValueError(f"{path}: the latent cache is incomplete ({done} of {len(manifest['units'])} units written); "
                         f"rerun python -m omniace.train.cache with the same arguments to finish it")
    return manifest


def cache_codec(paths: list[str]) -> dict | None:
    """The codec of the latent caches ``paths`` (all complete, all of one codec), or None when none of them is
    a cache (Parquet data). Raises ValueError for a mix of the two, an unfinished cache, or two codecs."""
    flags = [is_cache(p) for p in paths]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError(f"--data mixes latent caches and Parquet data ({[p for p, c in zip(paths, flags) if not c]} "
                         f"hold no {MANIFEST}); give all of one kind")
    manifests = [read_manifest(p) for p in paths]
    for what, key in (("VAEs", "codec"), ("text encoders", "text")):
        if any(m[key] != manifests[0][key] for m in manifests):
            raise ValueError(f"the latent caches {paths} were encoded with different {what}: "
                             f"{[m[key] for m in manifests]}")
    return manifests[0]["codec"]


def cache_text(paths: list[str]) -> dict | None:
    """The text encoder the latent caches ``paths`` hold text states of (family, widths), or None."""
    return read_manifest(paths[0])["text"] if cache_codec(paths) is not None else None


class CachedText:
    """A text encoder that looks its instructions up in text states a latent cache holds (``table``)."""

    def __init__(self, table: dict[str, EncodedText], info: dict):
        self.table, self.info = table, info
        self.dim, self.pooled_dim = info["dim"], info["pooled_dim"]

    def encode(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        """The cached states of ``texts``; ValueError naming an instruction the cache holds none of."""
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise ValueError(f"instruction {missing[0]!r} has no text state in the latent cache (its instructions "
                             f"were encoded by {self.info['encoder']} for the {self.info['family']} family)")
        return [self.table[t] for t in texts]


def _read_texts(path: Path, row: int | None, texts: list[str]) -> dict[str, EncodedText]:
    from safetensors import safe_open

    prefix = "" if row is None else f"{row}/"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        return {t: EncodedText(f.get_tensor(f"{prefix}text/{j}").float(),
                               f.get_tensor(f"{prefix}pooled/{j}").float() if f"{prefix}pooled/{j}" in keys else None)
                for j, t in enumerate(texts)}


def cached_text_encoder(paths: list[str]) -> CachedText:
    """The shared instructions (the empty one, the image indicators) of a cache with text: what the trainer
    asks a text encoder for besides the records' instructions (ACE's indicator table)."""
    return CachedText(_read_texts(Path(paths[0]) / TEXTS, None, SHARED_TEXTS), cache_text(paths))


class CacheStream(RecordStream):
    """The records of complete latent caches in :class:`RecordStream`'s seeded, rank-sharded, resumable
    order (a unit plays a row group). ``codec_factor`` (the model's) must be the caches' VAE factor."""

    def __init__(self, paths: list[str], seed: int, rank: int = 0, world: int = 1, codec_factor: int | None = None):
        self.codec_factor = codec_factor
        super().__init__(paths, seed, rank, world)

    def _open(self, paths: list[str]) -> None:
        self.codec = cache_codec(paths)
        if self.codec is None:
            raise ValueError(f"{paths}: no latent cache ({MANIFEST}) there")
        if self.codec_factor is not None and self.codec["factor"] != self.codec_factor:
            raise ValueError(f"the latent cache's VAE has factor {self.codec['factor']}; the model's codec factor is "
                             f"{self.codec_factor}")
        self.caches = [(Path(p), read_manifest(p)) for p in paths]
        self.text = self.caches[0][1]["text"]
        self._shared = cached_text_encoder(paths).table if self.text is not None else {}
        for folder, manifest in self.caches:
            for u in manifest["units"]:
                self.groups.append((len(self.files), 0, u["rows"]))
                self.files.append(folder / u["file"])
        if not sum(n for *_, n in self.groups):
            raise ValueError(f"the latent caches {paths} hold no row (see their {SKIPPED})")

    def rows(self, s: int, g: int) -> list[dict]:
        return json.loads(read_unit_metadata(self.files[s])["rows"])

    def latents(self, key: tuple[int, int, int]) -> dict[str, Tensor]:
        """Row ``key``'s latents (float32) by field name: ``src_img``, ``edited_img``, ``ref_img``,
        ``history[k].image``, ``mask_img`` (those the row has)."""
        from safetensors import safe_open

        s, _, r = key
        prefix = f"{r}/"
        with safe_open(str(self.files[s]), "pt") as f:
            return {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys()
                    if k.startswith(prefix) and k.split("/")[1] not in ("text", "pooled")}

    def text_encoder(self, items: list[tuple[tuple[int, int, int], dict]]) -> CachedText:
        """The cached text states of these records' instructions (their ``_texts``) and the shared ones."""
        table = dict(self._shared)
        for (s, _, r), row in items:
            table.update(_read_texts(self.files[s], r, row["_texts"]))
        return CachedText(table, self.text)

    def describe(self) -> str:
        c = self.codec
        what = f"{c['kind']} {c.get('path', '')}".strip()
        rows = sum(n for *_, n in self.groups)
        return f"{', '.join(str(p) for p, _ in self.caches)} ({rows} rows; {what}, factor {c['factor']}, " \
               f"{c['latent_channels']} channels)"

    def skipped_when_encoded(self) -> list[str]:
        """One line per cache that left source rows out when it was encoded (they are in its skipped.jsonl)."""
        lines = []
        for folder, manifest in self.caches:
            t = manifest["totals"]
            kinds = {k: t[k] for k in ("bad_row", "corrupt_image", "bad_shard") if t[k]}
            if kinds:
                lines.append(f"the latent cache {folder} left out {kinds} when it was encoded; each one is in "
                             f"{folder / SKIPPED}")
        return lines


# --- the command -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m omniace.train.cache", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(CacheConfig):
        flag = "--" + f.name.replace("_", "-")
        value = f.default_factory() if f.default is MISSING else f.default
        if f.name == "data":
            ap.add_argument(flag, nargs="+", required=True, help=f.metadata["help"])
        elif f.name in ("vae", "out"):
            ap.add_argument(flag, required=True, help=f.metadata["help"])
        elif value is None:
            ap.add_argument(flag, type=int if f.name == "max_side" else str, default=None, help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=type(value), default=value, help=f.metadata["help"])
    ap.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    return ap


def _device(name: str) -> torch.device:
    if name == "auto":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    """Exit 0 when the cache is complete, 1 on an error (one line on stderr), 2 on bad arguments."""
    ns = vars(build_parser().parse_args(argv))
    debug = ns.pop("debug")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = CacheConfig(**ns)
    except ValueError as err:
        if debug:
            raise
        if rank == 0:  # every rank parses the same argv: one line
            print(f"omniace-cache: error: {err}", file=sys.stderr)
        sys.exit(2)
    dist, share = None, _alone
    if world > 1:
        import torch.distributed as dist

        def share(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        # a rank that finishes early waits for the slowest one at the last share: a long timeout
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    try:
        build_cache(cfg, rank, world, log=lambda m: print(m, flush=True), share=share, device=_device(cfg.device))
        if dist is not None:
            # no rank tears its process group down while a peer is still inside the last collective: gloo
            # aborts such a peer's exit ("terminate called without an active exception", exit -6)
            dist.barrier()
    except Exception as err:  # noqa: BLE001 - one line, as the trainer prints its errors
        if debug:
            raise
        # a ValueError comes from what every rank shares (arguments, shards, VAE, the cache in --out): rank 0
        # says it; another error (a full disk) may be this rank's own
        if rank == 0 or not isinstance(err, ValueError):
            print(f"omniace-cache: error{f' on rank {rank}' if rank else ''}: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
