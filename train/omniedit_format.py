"""The Parquet schema of the published OmniEdit-Filtered-1.2M release, plus our optional columns.

Required (as released): ``omni_edit_id``, ``task``, ``src_img`` / ``edited_img`` (the Hugging Face image
struct: encoded ``bytes`` and a ``path``), ``edited_prompt_list``, ``width``, ``height``, ``sc_score_1``,
``sc_score_2``, ``sc_reasoning``, ``pq_score``, ``pq_reasoning``, ``o_score``. Optional (ours; readers do
without them): ``mask_img``, ``history`` (earlier turns: prompt + image), ``specialist``, ``failure``.
"""
from __future__ import annotations

import os
from pathlib import Path

from omniace import require

REQUIRED = ("omni_edit_id", "task", "src_img", "edited_img", "edited_prompt_list", "width", "height",
            "sc_score_1", "sc_score_2", "sc_reasoning", "pq_score", "pq_reasoning", "o_score")
OPTIONAL = ("mask_img", "history", "specialist", "failure")


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
        fields += [("mask_img", image_struct()),
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
