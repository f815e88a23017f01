"""Streaming OmniEdit Parquet -> decoded images -> aspect buckets under a token budget -> packed LCU batches.

Order and resume: the row groups of all shards are permuted per epoch from the seed, rows inside a group
are shuffled from the seed too, and global record ``i`` goes to rank ``i % world``, so every rank sees a
fixed, disjoint sequence. ``state_dict()`` holds the epoch, the cursor and the keys of records waiting in
buckets; a loader restored from it yields exactly the batches the original would have yielded next.

Decoding: NVIDIA DALI (``fn.decoders.image``; ``device="mixed"`` on a GPU, the CPU decoder with
``device_id=None`` without one) or PIL through ``engine.imageio.decode_image``; both give the same RGB
arrays (EXIF orientation applied, 16-bit and float scaled, alpha dropped: see ``engine/imageio.py``). What
DALI cannot read (GIF, WebP with EXIF, CMYK TIFF, ...) or reads off by one (16-bit colour PNG) goes to the
PIL decoder inside the DALI one, so the two loaders yield the same batches and skip the same records.

Bad data never stops the run and never disappears silently: every field of a row is validated when the row
is read (``omniedit_format.check_row``); a bad row, a row whose tokens alone exceed the budget, a corrupt
image and a shard that cannot be read or lacks a column are skipped, counted in ``stats`` (``bad_row``,
``over_budget``, ``corrupt_image``, ``bad_shard``) and passed one by one to ``on_skip`` with the record's id
and the reason. Only when no shard is usable is it an error.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omniace import require
from omniace.engine.codec import PixelCodec
from omniace.engine.imageio import decode_rgb_array, open_image, oriented_size
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, PackedLCU, indicator_token, pack
from omniace.engine.pipeline import mask_to_latent, renumber, to_tensor

from .importance import ImportanceConfig, importance_weight
from .omniedit_format import REQUIRED, BadRow, check_row

COLUMNS = (*REQUIRED, "mask_img", "ref_img", "history")  # what the loader reads; absent optional ones are fine


@dataclass
class DataConfig:
    paths: list[str]  # Parquet files or folders of them
    token_budget: int = 2048  # image tokens per batch (every frame of every sample), per rank
    patch_size: int = 2
    codec_factor: int = 4
    seed: int = 0
    decoder: str = "auto"  # auto | dali | pil
    prompt: str = "random"  # which entry of edited_prompt_list: random (seeded) | first
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    drop_zero_weight: bool = True  # lambda = 0 pairs carry no gradient: skip them instead of computing nothing
    max_history: int = 2
    family: str = "ace"  # ace: "{image} "-prefixed units with history and a mask channel; sd3: one unit, no mask
    drop_prompt: float = 0.0  # probability of an empty instruction (trains the unconditional branch of CFG)
    condition: bool = True  # False: no source image, the target from the instruction alone (base pretraining)
    # size caps per image; a row over them is skipped as a bad row before decoding. The largest presets
    # train at 1024^2 pixels; OmniEdit's widest ratio is 16:9 (1.78), the embedded corpus's too.
    max_pixels: int = 2048 * 2048
    max_aspect: float = 2.0  # longer side / shorter side
    max_side: int | None = None  # longest side in pixels; size_caps(model config) gives a preset's (SD3)

    def __post_init__(self) -> None:
        if self.family not in ("ace", "sd3"):
            raise ValueError(f"data family {self.family!r}; expected 'ace' or 'sd3'")
        if not 0.0 <= self.drop_prompt < 1.0:
            raise ValueError(f"drop_prompt {self.drop_prompt} must be in [0, 1)")
        if self.max_pixels <= 0 or self.max_aspect < 1.0 or (self.max_side is not None and self.max_side <= 0):
            raise ValueError(f"size caps max_pixels {self.max_pixels}, max_aspect {self.max_aspect}, max_side "
                             f"{self.max_side}; expected max_pixels > 0, max_aspect >= 1, max_side None or > 0")

    @property
    def history(self) -> int:
        return self.max_history if self.family == "ace" else 0  # the SD3 family takes one unit per sample


def size_caps(model_cfg) -> dict[str, int]:
    """The DataConfig size caps a model preset imposes: an SD3 model's positional table covers at most
    ``pos_embed_max_size`` patches per side (a larger image raises in its forward); ACE has no such cap."""
    n = getattr(model_cfg, "pos_embed_max_size", None)
    return {} if n is None else {"max_side": n * model_cfg.patch_size * model_cfg.codec_factor}


@dataclass
class TrainBatch:
    packed: PackedLCU
    weights: Tensor  # [B] importance weight per sample
    tasks: list[str]
    ids: list[str]


def list_shards(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.parquet"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such Parquet file or folder: {p}")
    if not files:
        raise FileNotFoundError(f"no .parquet files under {paths}")
    return files


class RecordStream:
    """Records ``(key, row)`` in a seeded, rank-sharded, resumable order; ``key = (shard, row_group, row)``.

    A shard that cannot be opened or lacks a required column is left out and listed in ``bad_shards``
    (path, reason); ``files`` holds the usable ones. Raises ``ValueError`` naming every shard and what is
    wrong with it when none is usable, ``FileNotFoundError`` for a path that does not exist. Subclasses
    (the latent cache's ``CacheStream``) override ``_open`` and ``rows`` and keep the order and the resume.
    """

    def __init__(self, paths: list[str], seed: int, rank: int = 0, world: int = 1):
        self.seed, self.rank, self.world = seed, rank, world
        self.files: list[Path] = []
        self.bad_shards: list[tuple[Path, str]] = []
        self.groups: list[tuple[int, int, int]] = []  # (shard, row group, rows)
        self._open(paths)
        self.epoch, self.group_cursor, self.row_cursor, self.global_index = 0, 0, 0, 0

    def _open(self, paths: list[str]) -> None:
        pq = require("pyarrow.parquet", "train", "reading OmniEdit Parquet shards")
        self._pf = {}
        for f in list_shards(paths):
            try:
                pf = pq.ParquetFile(f)
            except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
                self.bad_shards.append((f, f"not a readable Parquet file ({err})"))
                continue
            missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
            if missing:
                self.bad_shards.append((f, f"not an OmniEdit shard, missing column(s) {missing}"))
                continue
            s = len(self.files)
            self.files.append(f)
            self._pf[s] = pf
            self.groups += [(s, g, pf.metadata.row_group(g).num_rows) for g in range(pf.num_row_groups)]
        if not self.files:
            raise ValueError("no usable OmniEdit shard: " + "; ".join(f"{f}: {why}" for f, why in self.bad_shards))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.groups)))
        random.Random(f"{self.seed}:{epoch}:groups").shuffle(order)
        return order

    def rows(self, s: int, g: int) -> list[dict]:
        """The rows of row group ``g`` of shard ``s``, in file order."""
        pf = self._pf[s]
        cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
        return pf.read_row_group(g, columns=cols).to_pylist()

    def read(self, key: tuple[int, int, int]) -> dict:
        s, g, r = key
        return self.rows(s, g)[r]

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], dict]]:
        while True:
            order = self._order(self.epoch)
            while self.group_cursor < len(order):
                s, g, n = self.groups[order[self.group_cursor]]
                perm = list(range(n))
                random.Random(f"{self.seed}:{self.epoch}:{s}:{g}").shuffle(perm)
                rows = None
                while self.row_cursor < n:
                    i, r = self.global_index, perm[self.row_cursor]
                    self.row_cursor += 1
                    self.global_index += 1
                    if i % self.world == self.rank:
                        rows = rows if rows is not None else self.rows(s, g)
                        yield (s, g, r), rows[r]
                self.group_cursor, self.row_cursor = self.group_cursor + 1, 0
            self.epoch, self.group_cursor = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "group_cursor": self.group_cursor, "row_cursor": self.row_cursor,
                "global_index": self.global_index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.group_cursor = state["epoch"], state["group_cursor"]
        self.row_cursor, self.global_index = state["row_cursor"], state["global_index"]


Decoded = np.ndarray | ValueError  # an RGB uint8 [H, W, 3] array, or why the image cannot be decoded


def _pil(blob: bytes, what: str) -> Decoded:
    try:
        return decode_rgb_array(blob, what)
    except ValueError as err:
        return err


class PILDecoder:
    """``engine.imageio.decode_rgb_array`` on each encoded image; ``what`` names each one in its error."""

    name = "pil"

    def __call__(self, blobs: list[bytes], whats: list[str]) -> list[Decoded]:
        return [_pil(b, what) for b, what in zip(blobs, whats)]


class DALIDecoder:
    """``fn.decoders.image`` on batches of encoded bytes: ``mixed`` (nvJPEG) on a GPU, CPU otherwise.

    Gives :class:`PILDecoder`'s arrays: each image's header is read by PIL first (cheap), so a mode
    ``decode_image`` refuses is refused here with the same reason, and what DALI cannot read or reads
    differently (:meth:`for_pil`) goes to ``decode_image`` itself, as does anything else DALI fails on.
    """

    # what fn.decoders.image reads (DALI 2.4 CPU, measured; not GIF, TGA, ICO, PCX, DDS, ...)
    FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "PPM", "JPEG2000")

    name = "dali"

    def __init__(self, device_id: int | None = None, batch_size: int = 64, threads: int = 2):
        require("nvidia.dali", "dali", "the DALI decoder")
        from nvidia.dali import fn, pipeline_def, types

        self.batch_size = batch_size

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def decode():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            return fn.decoders.image(enc, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)

        self.pipe = decode()
        self.pipe.build()
        self.gpu = device_id is not None

    def _run(self, blobs: list[bytes]) -> list[np.ndarray]:
        self.pipe.feed_input("enc", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        (out,) = self.pipe.run()
        out = out.as_cpu() if self.gpu else out
        return [np.array(out.at(i)) for i in range(len(blobs))]

    @classmethod
    def for_pil(cls, img: Image.Image, blob: bytes) -> bool:
        """True where DALI cannot read ``img`` (a format outside ``FORMATS``; CMYK TIFF) or reads it off by
        one from ``decode_image`` (PNG of 16 bits per colour channel: DALI rounds v / 257, Pillow keeps
        v >> 8; the IHDR chunk comes first, its bit depth at byte 24 and colour type at byte 25)."""
        if img.format not in cls.FORMATS or (img.format == "TIFF" and img.mode == "CMYK"):
            return True
        return img.format == "PNG" and blob[24] == 16 and blob[25] in (2, 4, 6)

    def _one(self, blob: bytes, what: str) -> Decoded:
        try:
            return self._run([blob])[0]
        except Exception:  # noqa: BLE001 - a file DALI cannot read (WebP with EXIF, ...): PIL decides
            return _pil(blob, what)

    def __call__(self, blobs: list[bytes], whats: list[str]) -> list[Decoded]:
        result: list[Decoded | None] = [None] * len(blobs)
        ok = []
        for i, (blob, what) in enumerate(zip(blobs, whats)):
            try:
                img = open_image(blob, what)
            except ValueError as err:
                result[i] = err
                continue
            if self.for_pil(img, blob):
                result[i] = _pil(blob, what)
            else:
                ok.append(i)
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start:start + self.batch_size]
            try:
                for i, arr in zip(idx, self._run([blobs[i] for i in idx])):
                    result[i] = arr
            except Exception:  # noqa: BLE001 - one bad image fails the DALI batch: retry one by one
                for i in idx:
                    result[i] = self._one(blobs[i], whats[i])
        return result


def make_decoder(kind: str) -> PILDecoder | DALIDecoder:
    if kind == "pil":
        return PILDecoder()
    gpu = torch.cuda.current_device() if torch.cuda.is_available() else None
    if kind == "dali":
        return DALIDecoder(gpu)
    try:
        return DALIDecoder(gpu)
    except ImportError:
        return PILDecoder()


def record_id(row: dict, shard: Path, group: int, index: int) -> str:
    """The row's ``omni_edit_id``, or where it is when it has no usable one."""
    rid = row.get("omni_edit_id")
    return rid if isinstance(rid, str) and rid.strip() else f"{shard}:row_group={group}:row={index}"


def report_skip(stats: dict[str, int], warned: set[str], on_skip: Callable[[dict], None] | None,
                log: Callable[[str], None], kind: str, rid: str, reason: str) -> None:
    """Count a skipped record in ``stats``; ``on_skip`` (a skipped.jsonl) gets every one of them, the log
    the first of each kind (``warned`` holds the kinds logged)."""
    stats[kind] = stats.get(kind, 0) + 1
    if on_skip is not None:
        on_skip({"id": str(rid), "kind": kind, "reason": reason})
    if kind not in warned:
        warned.add(kind)
        rest = "counted in stats" + (" and passed to on_skip" if on_skip is not None else "")
        log(f"data: skipping a record ({kind}): {rid}: {reason}; further ones are {rest}")


def image_fields(row: dict, history: int | None, mask: bool) -> dict[str, dict]:
    """The image structs of a validated row by field name: ``src_img`` (not for a text-to-image row, which has
    none), ``edited_img``, ``ref_img`` (when the row has one), ``mask_img`` (with ``mask``, when the row has
    one) and ``history[k].image`` for its last ``history`` turns (all when None), ``k`` being the turn's
    index in the row's list."""
    named = {k: row[k] for k in ("src_img", "edited_img", "ref_img") if row.get(k) is not None}
    if mask and row.get("mask_img") is not None:
        named["mask_img"] = row["mask_img"]
    turns = row.get("history") or []
    for k in range(0 if history is None else max(0, len(turns) - history), len(turns)):
        named[f"history[{k}].image"] = turns[k]["image"]
    return named


def decode_images(decoder: Callable[[list[bytes], list[str]], list[Decoded]],
                  items: list[tuple[dict[str, dict], tuple[int, int]]]) -> list[dict[str, Decoded]]:
    """Decode every named image struct of each item ``(named, (width, height))`` in one decoder call.

    Returns per item ``{name: RGB uint8 [H, W, 3] array or ValueError}`` in ``named``'s order. Each image's
    size is read from its header first: one that differs from its row's (a small file that decodes to a
    huge image, or another image than the row's) is refused before any pixel is decoded; an image that
    fails to decode, or decodes to another size, is a ValueError naming it.
    """
    out: list[dict[str, Decoded | None]] = [dict.fromkeys(named) for named, _ in items]
    blobs, where = [], []
    for j, (named, (w, h)) in enumerate(items):
        for name, img in named.items():
            try:
                size = oriented_size(img["bytes"], name)
            except ValueError as err:
                out[j][name] = err
                continue
            if size != (w, h):
                out[j][name] = ValueError(f"{name} is {size[0]}x{size[1]} (its header), the row says {w}x{h} "
                                          f"(width x height)")
                continue
            blobs.append(img["bytes"])
            where.append((j, name))
    for (j, name), arr in zip(where, decoder(blobs, [name for _, name in where]) if blobs else []):
        w, h = items[j][1]
        if not isinstance(arr, ValueError) and arr.shape[:2] != (h, w):
            arr = ValueError(f"{name} decodes to {arr.shape[1]}x{arr.shape[0]}, the row says {w}x{h} (width x height)")
        out[j][name] = arr
    return out


def first_error(images: dict[str, Decoded]) -> str | None:
    """Why the first image of ``decode_images``' result for one row cannot be used, or None if all can."""
    return next((str(arr) for arr in images.values() if isinstance(arr, ValueError)), None)


def mask_latent(rgb: np.ndarray, factor: int) -> Tensor:
    """A decoded ``mask_img`` as the loader trains on it: its luma binarised, on the latent grid ``[H/f, W/f]``."""
    return mask_to_latent(Image.fromarray(rgb), rgb.shape[0] // factor, rgb.shape[1] // factor)


def current_text(prompt: str, offset: int, source: bool) -> str:
    """The ACE family's instruction of a row's current unit, whose images start at index ``offset`` of the
    sample (after the kept history's, one each): the prompt's own indicators shifted by ``offset``
    (``{image1}`` behind two history images is ``{image3}``, as ``EditSession`` renames them), behind the
    source image's indicator when the unit has one (text-to-image: the prompt alone)."""
    text = renumber(prompt, offset)
    return f"{indicator_token(offset)} {text}" if source else text


def instruction_texts(row: dict, family: str) -> list[str]:
    """Every instruction the loader may build from a validated row (besides the empty one of a dropped
    prompt): SD3 family, each usable prompt; ACE family, each prompt and history prompt behind each image
    indicator it can get (which depends on how many history turns are kept: ``max_history``)."""
    prompts = row["edited_prompt_list"]
    if family == "sd3":
        return list(dict.fromkeys(prompts))
    turns = row.get("history") or []
    source = row.get("src_img") is not None
    out = [current_text(p, k, source) for k in range(len(turns) + 1) for p in prompts]
    out += [f"{indicator_token(i)} {t['prompt']}" for j, t in enumerate(turns) for i in range(j + 1)]
    return list(dict.fromkeys(out))


def aspect_key(width: int, height: int) -> str:
    r = Fraction(width, height).limit_denominator(16)
    return f"{r.numerator}:{r.denominator}"


class EditLoader:
    """Yields :class:`TrainBatch` es of packed samples, bucketed by aspect ratio, within ``token_budget``.

    ``text_encode(list[str])`` encodes instructions to ``[L, Y]`` tensors or ``EncodedText`` (with the
    pooled vector the SD3 family needs). ``cfg.paths`` are OmniEdit Parquet shards, whose images go through
    the pixel codec (space-to-depth by ``codec_factor``, the tiny models' codec), or latent caches written
    by ``python -m omniace.train.cache`` (VAE latents, read as they are; their factor must be
    ``codec_factor``): the same order, buckets, budget, skips and resume either way, one kind per loader.
    A row whose tokens alone exceed the budget is skipped
    (``over_budget``), never yielded over it. With ``drop_prompt`` the current instruction is emptied for a
    seeded fraction of draws (a fresh choice every epoch), as the pipeline's unconditional CFG branch sees it.
    """

    def __init__(self, cfg: DataConfig, text_encode: Callable[[list[str]], list], rank: int = 0,
                 world: int = 1, log: Callable[[str], None] = print,
                 on_skip: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.on_skip = on_skip
        self.text_encode = text_encode
        self.log = log
        self.stats: dict[str, int] = {"records": 0, "corrupt_image": 0, "bad_row": 0, "over_budget": 0,
                                      "zero_weight": 0, "bad_shard": 0}
        self._warned: set[str] = set()
        from .cache import CacheStream, is_cache  # (cache.py builds on this module)

        self.decoder: PILDecoder | DALIDecoder | None = None
        if any(map(is_cache, cfg.paths)):
            self.stream = CacheStream(cfg.paths, cfg.seed, rank, world, codec_factor=cfg.codec_factor)
            self.source = f"latent cache: {self.stream.describe()}"
            if rank == 0:
                for line in self.stream.skipped_when_encoded():
                    self.log(f"data: {line}")
        else:
            self.stream = RecordStream(cfg.paths, cfg.seed, rank, world)
            self.decoder = make_decoder(cfg.decoder)
            self.codec = PixelCodec(cfg.codec_factor)
            self.source = f"decoder {self.decoder.name}"
        if rank == 0:  # every rank scans the same shards: one report, so stats summed over ranks count each once
            for f, why in self.stream.bad_shards:
                self._report("bad_shard", str(f), why)
        self.buckets: dict[str, list[tuple[tuple[int, int, int], dict]]] = {}
        self.batches_yielded = 0
        self.since_batch = 0  # records drawn since the last batch

    def _report(self, kind: str, record_id: str, reason: str) -> None:
        report_skip(self.stats, self._warned, self.on_skip, self.log, kind, record_id, reason)

    def tokens(self, row: dict) -> int:
        """Image tokens of a row's sample: its target, source and reference images (with ``condition``) and
        its kept history images, all of the row's size."""
        unit = self.cfg.patch_size * self.cfg.codec_factor
        per_image = (int(row["width"]) // unit) * (int(row["height"]) // unit)
        current = self.cfg.condition * sum(row.get(k) is not None for k in ("src_img", "ref_img"))
        return per_image * (1 + current + min(len(row.get("history") or []), self.cfg.history))

    def _record_id(self, key: tuple[int, int, int], row: dict) -> str:
        return record_id(row, self.stream.files[key[0]], *key[1:])

    def _validated(self, row: dict) -> dict:
        """``check_row`` with this config's caps: the row with its usable prompts only, or ``BadRow``. A cached
        row's images were checked when they were encoded; it holds their latents, not their bytes."""
        cfg = self.cfg
        row = check_row(row, cfg.patch_size * cfg.codec_factor, cfg.max_pixels, cfg.max_aspect, cfg.max_side,
                        images=self.decoder is not None)
        if row.get("ref_img") is not None and not (cfg.family == "ace" and cfg.condition):
            raise BadRow(f"ref_img: a {row['task']!r} row has a second condition image ({{image1}}); this loader "
                         f"(family {cfg.family!r}, condition {cfg.condition}) gives a sample "
                         f"{'one condition image' if cfg.condition else 'none'}: train it with the ACE family, or "
                         f"leave the task out of the corpus (--tasks)")
        if row.get("src_img") is None and cfg.family == "sd3" and cfg.condition:
            # ControlNet-style and channel-concat models need one condition image in every sample; EditNet
            # could do without, but every arm of a comparison must see the same data
            raise BadRow(f"src_img: a {row['task']!r} row has no source image; the SD3 family's conditioned "
                         f"models take exactly one condition image per sample: leave the task out of the corpus "
                         f"(--tasks), or train without a condition image (base pretraining)")
        return row

    def _admit(self, key: tuple[int, int, int], row: dict) -> tuple[dict, float] | None:
        """The validated row and its importance weight, or None once the row is reported as skipped."""
        try:
            row = self._validated(row)
            weight = importance_weight(row, self.cfg.importance)
        except (KeyError, ValueError) as err:  # BadRow is a ValueError; importance_weight raises both
            self._report("bad_row", self._record_id(key, row), err.args[0] if err.args else repr(err))
            return None
        need = self.tokens(row)
        if need > self.cfg.token_budget:
            self._report("over_budget", row["omni_edit_id"], f"{need} image tokens at {row['width']}x"
                         f"{row['height']} with its context, over the token budget of {self.cfg.token_budget}")
            return None
        return row, weight

    def _sample(self, row: dict, latents: dict[str, Tensor]) -> LCUSample:
        """One LCU sample from a row and its latents by field name (``mask_img`` on the latent grid)."""
        rng = random.Random(f"{self.cfg.seed}:{row['omni_edit_id']}")
        prompts = row["edited_prompt_list"]
        prompt = prompts[0] if self.cfg.prompt == "first" else rng.choice(prompts)
        if self.cfg.drop_prompt and random.Random(f"{self.cfg.seed}:{row['_draw']}:drop").random() < self.cfg.drop_prompt:
            prompt = None
        ace = self.cfg.family == "ace"
        mask = latents.get("mask_img") if ace else None  # its luma, binarised, as the pipeline reads a user's mask
        units = []
        turns = row.get("history") or []
        first = len(turns) - len(self._history(row))
        # each unit names its image by its index in the whole context, as EditSession renames them
        for i, turn in enumerate(self._history(row)):
            units.append(ConditionUnit(f"{indicator_token(i)} {turn['prompt']}",
                                       [ImageInput(latents[f"history[{first + i}].image"])]))
        # the current unit: the source (a text-to-image row has none; its text gets no indicator), then the
        # reference (its {image1} renumbered behind the history); the empty instruction is exactly the
        # pipeline's negative prompt (no indicator either)
        current = []
        if self.cfg.condition:
            if "src_img" in latents:
                current.append(ImageInput(latents["src_img"], mask))
            if "ref_img" in latents:
                current.append(ImageInput(latents["ref_img"]))
        source = self.cfg.condition and "src_img" in latents
        text = "" if prompt is None else (current_text(prompt, len(units), source) if ace else prompt)
        units.append(ConditionUnit(text, current))
        return LCUSample(units, ImageInput(latents["edited_img"], mask))

    def _history(self, row: dict) -> list[dict]:
        n = self.cfg.history
        return (row.get("history") or [])[-n:] if n else []

    def _latents(self, items: list[tuple[tuple[int, int, int], dict]]) -> list[dict[str, Tensor] | None]:
        """Each item's latents by field name: read from the cache, or decoded and put through the pixel
        codec; None for a row with an image that cannot be used (reported as ``corrupt_image``)."""
        if self.decoder is None:
            return [self.stream.latents(key) for key, _ in items]
        f = self.cfg.codec_factor
        named = [(image_fields(row, self.cfg.history, self.cfg.family == "ace"), (row["width"], row["height"]))
                 for _, row in items]
        out = []
        for (_, row), images in zip(items, decode_images(self.decoder, named)):
            why = first_error(images)
            if why is not None:
                self._report("corrupt_image", row["omni_edit_id"], why)
                out.append(None)
                continue
            out.append({name: mask_latent(arr, f) if name == "mask_img" else self.codec.encode(to_tensor(arr))
                        for name, arr in images.items()})
        return out

    def _encode_texts(self, items: list[tuple[tuple[int, int, int], dict]], texts: list[str]) -> list:
        """``text_encode(texts)``, or the text states a latent cache holds for these records' instructions."""
        if self.decoder is not None or self.stream.text is None:
            return self.text_encode(texts)
        return self.stream.text_encoder(items).encode(texts)

    def _decode_and_pack(self, items: list[tuple[tuple[int, int, int], dict]]) -> TrainBatch | None:
        samples, weights, tasks, ids = [], [], [], []
        for (_, row), latents in zip(items, self._latents(items)):
            if latents is None:
                continue
            samples.append(self._sample(row, latents))
            weights.append(importance_weight(row, self.cfg.importance))
            tasks.append(row["task"])
            ids.append(row["omni_edit_id"])
        if not samples:
            return None
        units = [u for s in samples for u in s.units]
        for u, enc in zip(units, self._encode_texts(items, [u.instruction for u in units])):
            u.text, u.pooled = (enc, None) if isinstance(enc, Tensor) else (enc.tokens, enc.pooled)
        packed = pack(samples, self.cfg.patch_size, codec_factor=self.cfg.codec_factor,
                      with_mask=self.cfg.family == "ace")
        return TrainBatch(packed, torch.tensor(weights, dtype=torch.float32), tasks, ids)

    def __iter__(self) -> Iterator[TrainBatch]:
        # this rank's records in one pass over the data: a pass that yields nothing must not loop forever
        pass_len = max(1, -(-sum(n for _, _, n in self.stream.groups) // self.stream.world))
        for key, row in self.stream:
            row["_draw"] = self.stream.global_index  # this draw's index: seeds the per-epoch prompt dropout
            self.stats["records"] += 1
            self.since_batch += 1
            batch = self._take(key, row)
            if batch is None and self.since_batch >= pass_len:
                batch = self._flush_fullest(pass_len)
            if batch is not None:
                self.batches_yielded += 1
                self.since_batch = 0
                yield batch

    def _take(self, key, row: dict) -> TrainBatch | None:
        """Admit one record into its aspect bucket; the bucket's batch when the record does not fit it."""
        admitted = self._admit(key, row)
        if admitted is None:
            return None
        row, weight = admitted
        if self.cfg.drop_zero_weight and weight == 0:
            self.stats["zero_weight"] += 1
            return None
        bucket = self.buckets.setdefault(aspect_key(row["width"], row["height"]), [])
        if bucket and sum(self.tokens(r) for _, r in bucket) + self.tokens(row) > self.cfg.token_budget:
            ready = list(bucket)
            bucket[:] = [(key, row)]
            return self._decode_and_pack(ready)
        bucket.append((key, row))
        return None

    def _flush_fullest(self, pass_len: int) -> TrainBatch | None:
        """A whole pass without a batch: pack the fullest bucket as it is (a small corpus whose buckets never
        overflow), or fail naming what was skipped when no record was usable at all."""
        full = [b for b in self.buckets.values() if b]
        if not full:
            counts = {k: v for k, v in self.stats.items() if v}
            raise ValueError(f"a whole pass over the data ({pass_len} records on rank {self.stream.rank}) gave no "
                             f"usable record: {counts} (the first skip of each kind is in the log above); check "
                             f"--token-budget, --importance-column/--importance-threshold and the data")
        bucket = max(full, key=len)
        ready = list(bucket)
        bucket.clear()
        return self._decode_and_pack(ready)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "batches": self.batches_yielded, "stats": dict(self.stats),
                "since_batch": self.since_batch,
                "buckets": {k: [[*key, row["_draw"]] for key, row in v] for k, v in self.buckets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.batches_yielded = state["batches"]
        self.since_batch = state.get("since_batch", 0)  # absent in checkpoints written before it existed
        self.stats.update(state["stats"])
        self.buckets = {k: [self._restore(entry) for entry in entries] for k, entries in state["buckets"].items()}

    def _restore(self, entry: list[int]) -> tuple[tuple[int, int, int], dict]:
        key = tuple(entry[:3])
        row = self._validated(self.stream.read(key))  # as it entered its bucket: usable prompts only
        row["_draw"] = entry[3]
        return key, row
