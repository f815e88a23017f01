"""Held-out evaluation of an editing model: per-task L1/L2 against the ground truth and the judge's success rate.

The held-out split is drawn by the synthetic generator from a seed no training corpus uses (10000 by
default; ``python -m omniace.train.synthetic`` defaults to 0), with every specialist succeeding, so the
target is the correct edit. Metrics follow MagicBrush: L1 and L2 between the edited image and the target,
on pixels scaled to [0, 1]. ``success`` is the fraction of outputs the judge (``scorer.py``) grades
``o_score >= 9``. Every task also reports the *identity* baseline (the unedited source as the output),
because most edits are local and copying the source already scores a low L1: a model must beat it.

``python -m omniace.train.eval --weights runs/x/model.safetensors --out out/eval`` writes ``eval.json``
and ``eval_grid.png`` (source | instruction | output | target, one row per sample).
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omniace.engine.imageio import decode_image

from .scorer import score
from .synthetic import TASKS, generate

HELD_OUT_SEED = 10_000


@dataclass
class EvalSample:
    task: str
    instruction: str
    source: Image.Image
    target: Image.Image
    mask: Image.Image | None


@dataclass
class TaskMetrics:
    n: int
    l1: float
    l2: float
    success: float
    identity_l1: float  # the unedited source scored as the output
    identity_l2: float
    identity_success: float


@dataclass
class EvalResult:
    per_task: dict[str, TaskMetrics]
    overall: TaskMetrics
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "overall": asdict(self.overall),
                "per_task": {k: asdict(v) for k, v in self.per_task.items()}}

    def table(self) -> str:
        head = f"{'task':<24}{'n':>4}{'L1':>8}{'L2':>8}{'success':>9}   {'copy L1':>8}{'copy L2':>8}{'copy succ':>10}"
        rows = [head, "-" * len(head)]
        for name, m in [*self.per_task.items(), ("overall", self.overall)]:
            rows.append(f"{name:<24}{m.n:>4}{m.l1:>8.4f}{m.l2:>8.4f}{m.success:>9.0%}   "
                        f"{m.identity_l1:>8.4f}{m.identity_l2:>8.4f}{m.identity_success:>10.0%}")
        return "\n".join(rows)


def held_out(per_task: int, seed: int = HELD_OUT_SEED, short_sides: tuple[int, ...] = (64,),
             tasks: tuple[str, ...] = TASKS) -> list[EvalSample]:
    """``per_task`` clean single-turn pairs of every task (deterministic in ``seed``)."""
    out = []
    for t, task in enumerate(tasks):
        for rec in generate(per_task, seed=seed + 1000 * t, short_sides=short_sides, failure_rate=0.0,
                            multi_turn=0.0, tasks=(task,)):
            def img(col):
                return decode_image(rec[col]["bytes"], f"{rec['omni_edit_id']} {col}") if rec.get(col) else None

            mask = img("mask_img")
            out.append(EvalSample(task, rec["edited_prompt_list"][0], img("src_img"), img("edited_img"),
                                  None if mask is None else mask.convert("L")))
    return out


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _metrics(rows: list[tuple[float, float, bool, float, float, bool]]) -> TaskMetrics:
    a = np.array(rows, dtype=np.float64)
    return TaskMetrics(len(rows), *(float(x) for x in a.mean(axis=0)))


def evaluate(pipe, samples: list[EvalSample], steps: int = 20, guidance: float = 1.5,
             seed: int = 0) -> tuple[EvalResult, list[Image.Image]]:
    """Edit every sample with ``pipe`` and score it; returns the result and the outputs in order."""
    per_task: dict[str, list] = {}
    outputs = []
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        instruction = ("{image} " + s.instruction) if pipe.is_ace else s.instruction
        masks = s.mask if (pipe.is_ace and s.mask is not None) else None
        out = pipe.edit(s.source, instruction, masks=masks, steps=steps, guidance=guidance, seed=seed + i)[0]
        outputs.append(out)
        o, tgt, src = _pixels(out), _pixels(s.target), _pixels(s.source)
        judged = score(s.source, out, s.instruction, s.mask).o_score >= 9
        copied = score(s.source, s.source, s.instruction, s.mask).o_score >= 9
        per_task.setdefault(s.task, []).append((np.abs(o - tgt).mean(), ((o - tgt) ** 2).mean(), judged,
                                                np.abs(src - tgt).mean(), ((src - tgt) ** 2).mean(), copied))
    every = [r for rows in per_task.values() for r in rows]
    settings = {"samples": len(samples), "steps": steps, "guidance": guidance, "seed": seed,
                "seconds": round(time.perf_counter() - t0, 2)}
    result = EvalResult({k: _metrics(v) for k, v in per_task.items()}, _metrics(every), settings)
    return result, outputs


def write_grid(samples: list[EvalSample], outputs: list[Image.Image], path: str | Path, cell: int = 112) -> None:
    """One row per sample: source | instruction | output | target, each scaled to ``cell`` pixels high."""
    def fit(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.resize((max(1, round(w * cell / h)), cell), Image.NEAREST)

    width = max(fit(s.source).width for s in samples)
    text_w, pad = 200, 6
    header = 18
    grid = Image.new("RGB", (3 * width + text_w + 5 * pad, header + len(samples) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    cols = [pad, pad + width + pad, 2 * pad + width + text_w + pad, 3 * pad + 2 * width + text_w + pad]
    for x, name in zip(cols, ["source", "instruction", "output", "target"]):
        draw.text((x, 3), name, fill="black")
    for r, (s, out) in enumerate(zip(samples, outputs)):
        y = header + r * (cell + pad)
        grid.paste(fit(s.source), (cols[0], y))
        draw.multiline_text((cols[1], y + 4), f"[{s.task}]\n" + "\n".join(textwrap.wrap(s.instruction, 30)),
                            fill="black", spacing=3)
        grid.paste(fit(out), (cols[2], y))
        grid.paste(fit(s.target), (cols[3], y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run(pipe, out: str | Path, per_task: int = 8, steps: int = 20, guidance: float = 1.5, seed: int = 0,
        grid_per_task: int = 1, name: str = "eval", split_seed: int = HELD_OUT_SEED, log=print) -> EvalResult:
    """Evaluate on the held-out split, print the table, write ``{name}.json`` and ``{name}_grid.png``."""
    out = Path(out)
    samples = held_out(per_task, seed=split_seed)
    result, outputs = evaluate(pipe, samples, steps=steps, guidance=guidance, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    shown = [i for i in range(len(samples)) if i % per_task < grid_per_task]
    write_grid([samples[i] for i in shown], [outputs[i] for i in shown], out / f"{name}_grid.png")
    log(result.table())
    log(f"wrote {out / f'{name}.json'} and {out / f'{name}_grid.png'} (source | instruction | output | target)")
    return result


def main(argv: list[str] | None = None) -> None:
    from omniace.engine.pipeline import EditPipeline

    ap = argparse.ArgumentParser(prog="python -m omniace.train.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="a self-describing safetensors file (the trainer's export)")
    ap.add_argument("--out", default="out/eval")
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-per-task", type=int, default=1)
    ap.add_argument("--split-seed", type=int, default=HELD_OUT_SEED,
                    help="generator seed of the split (tune sampling settings on another one, e.g. 20000)")
    a = ap.parse_args(argv)
    pipe = EditPipeline.pretrained(a.weights)
    run(pipe, a.out, a.per_task, a.steps, a.guidance, a.seed, a.grid_per_task, split_seed=a.split_seed)


if __name__ == "__main__":
    main()
