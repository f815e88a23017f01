"""The Parquet schema of the published OmniEdit-Filtered-1.2M release, plus our optional columns.

Required (as released): ``omni_edit_id``, ``task``, ``src_img`` / ``edited_img`` (the Hugging Face image
struct: encoded ``bytes`` and a ``path``), ``edited_prompt_list``, ``width``, ``height``, ``sc_score_1``,
``sc_score_2``, ``sc_reasoning``, ``pq_score``, ``pq_reasoning``, ``o_score``. Optional (ours; readers do
without them): ``mask_img``, ``ref_img`` (the second image, ``{image1}``, of a reference-guided edit),
``history`` (earlier turns: prompt + image), ``specialist``, ``failure``. ACE's text-to-image rows
(``task`` ``text_to_image``) have a null ``src_img``: there is no source image.
"""
from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path

from omniace import require

REQUIRED = ("omni_edit_id", "task", "src_img", "edited_img", "edited_prompt_list", "width", "height",
            "sc_score_1", "sc_score_2", "sc_reasoning", "pq_score", "pq_reasoning", "o_score")
OPTIONAL = ("mask_img", "ref_img", "history", "specialist", "failure")
NO_SOURCE_TASKS = ("text_to_image",)  # the only tasks whose src_img may be null
_INDICATOR = re.compile(r"\{image(\d*)\}")
SCORES = ("sc_score_1", "sc_score_2", "pq_score", "o_score")

_repr = reprlib.Repr()  # bad values in reasons, kept short (an image struct holds the whole file)
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 4, 3, 2
_short = _repr.repr


class BadRow(ValueError):
    """A row the loader cannot train on; the message names the field and its bad value."""


def _image(field: str, value) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("bytes"), bytes) or not value["bytes"]:
        raise BadRow(f"{field} {_short(value)} is not an image struct with encoded bytes")


def _text(field: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{field} {_short(value)} is not a non-empty string")


def check_row(row: dict, unit: int, max_pixels: int, max_aspect: float, max_side: int | None = None,
              images: bool = True) -> dict:
    """Validate every field of an OmniEdit row that training reads; returns the row with
    ``edited_prompt_list`` reduced to its usable entries (non-empty strings; nulls and blanks dropped).

    Checks: ``omni_edit_id`` and ``task`` non-empty strings; ``src_img`` / ``edited_img`` image structs with
    bytes (``src_img`` may be null for a ``NO_SOURCE_TASKS`` task), ``mask_img`` and ``ref_img`` null or one;
    at least one usable prompt, and every image indicator a prompt names (``{image}``, ``{image1}``, ...)
    one of the row's current images (source, then reference); ``width`` / ``height`` positive ints,
    multiples of ``unit`` (pixels per token), ``width * height <= max_pixels``, longer / shorter side
    ``<= max_aspect``, each side ``<= max_side`` when given; every score column (``SCORES``) a finite number;
    ``history`` null or a list of ``{prompt: non-empty str, image: image struct}`` with no null entry.
    With ``images=False`` the image fields are not checked (a latent cache's row, whose images were checked
    when they were encoded). Raises :class:`BadRow` (a ``ValueError``) naming the first bad field and its value.
    """
    _text("omni_edit_id", row.get("omni_edit_id"))
    _text("task", row.get("task"))
    if row.get("src_img") is None and row["task"] not in NO_SOURCE_TASKS:
        raise BadRow(f"src_img is null for task {row['task']!r}; only {', '.join(NO_SOURCE_TASKS)} rows may have "
                     f"no source image")
    if images:
        _image("edited_img", row.get("edited_img"))
        for field in ("src_img", "mask_img", "ref_img"):
            if row.get(field) is not None:
                _image(field, row[field])
    prompts = row.get("edited_prompt_list")
    if not isinstance(prompts, list):
        raise BadRow(f"edited_prompt_list {_short(prompts)} is not a list")
    usable = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not usable:
        raise BadRow(f"edited_prompt_list {_short(prompts)} holds no non-empty instruction")
    n_images = (row.get("src_img") is not None) + (row.get("ref_img") is not None)
    for p in usable:
        for m in _INDICATOR.finditer(p):
            if int(m.group(1) or 0) >= n_images:
                raise BadRow(f"edited_prompt_list entry {_short(p)} names {m.group(0)} but the row has {n_images} "
                             f"current image(s) (src_img, then ref_img)")
    w, h = row.get("width"), row.get("height")
    for field, v in (("width", w), ("height", h)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % unit:
            size = f" (size {w}x{h})" if isinstance(w, int) and isinstance(h, int) else ""
            raise BadRow(f"{field} {_short(v)} is not a positive multiple of {unit}{size}")
    if w * h > max_pixels:
        raise BadRow(f"size {w}x{h} has {w * h} pixels, over the cap of {max_pixels}")
    if max(w, h) / min(w, h) > max_aspect:
        raise BadRow(f"size {w}x{h} has aspect ratio {max(w, h) / min(w, h):.2f}, over the cap of {max_aspect}")
    if max_side is not None and max(w, h) > max_side:
        raise BadRow(f"size {w}x{h} has a side over the cap of {max_side} pixels")
    for field in SCORES:
        v = row.get(field)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BadRow(f"{field} {_short(v)} is not a finite number")
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise BadRow(f"history {_short(history)} is not a list")
        for i, turn in enumerate(history):
            if not isinstance(turn, dict):
                raise BadRow(f"history[{i}] {_short(turn)} is not a {{prompt, image}} struct")
            _text(f"history[{i}].prompt", turn.get("prompt"))
            if images:
                _image(f"history[{i}].image", turn.get("image"))
    return {**row, "edited_prompt_list": usable}


def image_struct():
    pa = require("pyarrow", "train", "reading and writing OmniEdit Parquet shards")
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def omniedit_schema(extras: bool = True):
    """The released schema; with ``extras`` our optional columns are appended."""
    pa = require("pyarrow", "train", "reading and writing OmniEdit Parquet shards")
    fields = [
        ("omni_edit_id", pa.string()), ("task", pa.string()), ("src_img", image_struct()),
        ("edited_img", image_struct()), ("edited_prompt_list", pa.list_(pa.string())),
        ("width", pa.int64()), ("height", pa.int64()), ("sc_score_1", pa.int64()), ("sc_score_2", pa.int64()),
        ("sc_reasoning", pa.string()), ("pq_score", pa.int64()), ("pq_reasoning", pa.string()),
        ("o_score", pa.float64()),
    ]
    if extras:
        fields += [("mask_img", image_struct()), ("ref_img", image_struct()),
                   ("history", pa.list_(pa.struct([("prompt", pa.string()), ("image", image_struct())]))),
                   ("specialist", pa.string()), ("failure", pa.string())]
    return pa.schema(fields)


def write_shard(records: list[dict], path: Path) -> Path:
    """Write records as one Parquet file, atomically (a reader never sees half a shard)."""
    pa = require("pyarrow", "train", "writing OmniEdit Parquet shards")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records, schema=omniedit_schema(extras=True))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=256)
    os.replace(tmp, path)
    return path
