"""Does a model draw the shape its instruction names? The shape-word probe.

Every held-out swap, addition and inpainting is edited three times, its instruction naming each shape in turn
(``... with a blue circle`` / ``square`` / ``triangle``), with the same source, mask and seed. Each output's new
object is measured as the judge measures it (:func:`omniace.train.scorer.new_object`): the fraction of its bounding
box it fills (a square ~1, a circle ~0.79, a triangle ~0.5) and the shape the judge reads from that. A model that
reads the shape word draws three different fills; one that ignores it draws the same blob three times, and the
judge halves its score wherever the blob is not the shape asked.

    python -m omniace.train.eval --weights W --shape-probe --per-task 10 --split-seed 20000 --steps 10
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import numpy as np

from .scenes import SHAPES
from .scorer import edit_region, fill_fraction, new_object, parse, rgb, shape_of

PROBED_TASKS = ("object_swap", "object_addition", "inpainting")
# the shape word of the object the edit draws: the last "<colour> <shape>" of the instruction
_NEW_SHAPE = re.compile(rf"\b({'|'.join(SHAPES)})\b")


@dataclass
class ShapeRow:
    asked: str
    n: int  # outputs with a new object of at least 6 pixels
    missing: int  # outputs with none
    mean_fill: float | None
    drawn: dict[str, int]  # the judge's reading of each drawn object: shape -> count


def with_shape(instruction: str, shape: str) -> str:
    """``instruction`` with the shape of the object it draws (its last shape word) replaced by ``shape``.
    ValueError when it names no shape."""
    words = list(_NEW_SHAPE.finditer(instruction))
    if not words:
        raise ValueError(f"instruction {instruction!r} names no shape ({', '.join(SHAPES)})")
    m = words[-1]
    return instruction[:m.start()] + shape + instruction[m.end():]


def probe(pipe, samples, steps: int = 10, guidance: float = 1.0, seed: int = 0,
          batch_size: int = 16) -> list[ShapeRow]:
    """One :class:`ShapeRow` per shape in :data:`omniace.train.scenes.SHAPES`, over the ``samples`` of
    :data:`PROBED_TASKS` (the others are skipped; ValueError when none is left). ``pipe`` is an ACE
    :class:`~omniace.engine.pipeline.EditPipeline`; every variant of a sample gets that sample's seed."""
    chosen = [s for s in samples if s.task in PROBED_TASKS and not s.turn]
    if not chosen:
        raise ValueError(f"no samples of {PROBED_TASKS} to probe")
    jobs, meta = [], []
    for i, s in enumerate(chosen):
        for shape in SHAPES:
            instruction = with_shape(s.instruction, shape)
            jobs.append(pipe.prepare_edit([s.source], "{image} " + instruction, masks=s.mask, steps=steps,
                                          guidance=guidance, seed=seed + i))
            meta.append((s, shape, instruction))
    outputs = []
    for start in range(0, len(jobs), batch_size):
        outputs += pipe.run_jobs(jobs[start:start + batch_size])
    fills: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    drawn: dict[str, dict[str, int]] = {shape: {} for shape in SHAPES}
    missing = dict.fromkeys(SHAPES, 0)
    for (s, shape, instruction), out in zip(meta, outputs):
        kind, args = parse(instruction)
        src, got = rgb(s.source), rgb(out)
        mask = None if s.mask is None else np.asarray(s.mask.convert("L").resize(s.source.size)) > 127
        obj = new_object(kind, args, src, got, edit_region(kind, args, src, mask))
        fill = fill_fraction(obj)
        if fill is None:
            missing[shape] += 1
            continue
        fills[shape].append(fill)
        read = shape_of(obj)
        drawn[shape][read] = drawn[shape].get(read, 0) + 1
    return [ShapeRow(shape, len(fills[shape]), missing[shape],
                     statistics.fmean(fills[shape]) if fills[shape] else None, drawn[shape]) for shape in SHAPES]


# how much of its bounding box each shape fills when drawn exactly (the corpus's ground truth measures 0.99, 0.78
# and 0.52 on validation 20000); the judge reads square above 0.9, circle above 0.65, triangle below
EXACT_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def table(rows: list[ShapeRow]) -> str:
    """The probe as a markdown table: per shape asked, how many outputs drew a new object (6 pixels or more of
    the colour asked), their mean fill against the shape's exact fill, and what the judge reads of them."""
    lines = ["| shape asked | outputs with a new object | mean fill of its box | exact shape's fill "
             "| the judge reads (of those outputs) | outputs with none |", "|---|---|---|---|---|---|"]
    for r in rows:
        reads = ", ".join(f"{shape} {100 * r.drawn.get(shape, 0) / r.n:.0f}%" for shape in SHAPES) if r.n else "-"
        fill = "-" if r.mean_fill is None else f"{r.mean_fill:.3f}"
        lines.append(f"| {r.asked} | {r.n} | {fill} | {EXACT_FILL[r.asked]:.3f} | {reads} | {r.missing} |")
    return "\n".join(lines)
