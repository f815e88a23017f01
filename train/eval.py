"""Held-out evaluation of an editing model: per-task L1/L2 against the ground truth and the judge's success rate.

The held-out split is drawn by the synthetic generator from a seed no training corpus uses (10000 by
default; ``python -m omniace.train.synthetic`` defaults to 0), with every specialist succeeding, so the
target is the correct edit. Metrics follow MagicBrush: L1 and L2 between the edited image and the target,
on pixels scaled to [0, 1]. ``success`` is the fraction of outputs the judge (``scorer.py``) grades
``o_score >= 9``. Every task also reports the *identity* baseline (the unedited source as the output),
because most edits are local and copying the source already scores a low L1: a model must beat it.

ACE's task families each get their row: ``text_to_image`` (``pipe.edit(None, ...)`` at the target's size;
there is no source, so its copy baseline scores a mid-grey image), ``controllable_generation`` (the
condition map is the source; copying it is the baseline), ``reference_guided`` (``pipe.edit([source,
reference], "{image} ... {image1} ...")``) and ``multi_turn@1`` .. ``@3``: chains of three edits of a fresh
scene run turn by turn through one ``EditSession``, each turn fed the session's previous output as a user
would; the judge grades turn k's output against the image it was fed, L1/L2 compare it with the ground
truth of turn k, and the copy columns score the fed image as the output. The SD3 family takes exactly one
image per request and no session: :func:`family_tasks` gives the tasks it can run.

``python -m omniace.train.eval --weights runs/x/model.safetensors --out out/eval`` writes ``eval.json``
and ``eval_grid.png`` (source | instruction | output | target, one row per sample). ``--from-target 0,106,999``
prints instead the model's one-call prediction from its noised ground truth at those timesteps
(:func:`from_target`): what the model cannot draw even when handed the answer, apart from the sampler.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omniace.engine.imageio import decode_image
from omniace.engine.sampler import check_int

from .scenes import ASPECTS, frame_size, random_scene, render
from .scorer import MID_GREY, score
from .synthetic import OBJECT_TASKS, TASKS, generate, make_edit

HELD_OUT_SEED = 10_000
MULTI_TURN = "multi_turn"  # a held-out task of TURNS rows, multi_turn@1 .. multi_turn@TURNS
TURNS = 3
CHAIN_TASKS = (*OBJECT_TASKS, "background_swap")  # turns that leave a scene the judge can read by colour
EVAL_TASKS = (*TASKS, MULTI_TURN)
ONE_IMAGE_TASKS = tuple(t for t in TASKS if t not in ("text_to_image", "reference_guided"))


def family_tasks(is_ace: bool) -> tuple[str, ...]:
    """The held-out tasks a pipeline family runs: every one for ACE; for SD3 (one condition image per
    request, no session; its ControlNet-style and concat models need exactly one) the single-image ones."""
    return EVAL_TASKS if is_ace else ONE_IMAGE_TASKS


@dataclass
class EvalSample:
    task: str
    instruction: str
    source: Image.Image | None  # None: text-to-image
    target: Image.Image
    mask: Image.Image | None
    reference: Image.Image | None = None  # {image1} of a reference-guided edit
    turn: int = 0  # multi-turn: 1 .. TURNS; turn k > 1 is fed the session's output of turn k - 1


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


def chains(n: int, seed: int, short_sides: tuple[int, ...] = (64,), turns: int = TURNS) -> list[EvalSample]:
    """``n`` chains of ``turns`` clean edits (:data:`CHAIN_TASKS`), each on a fresh scene, turn by turn in
    order: turn k's source and target are the ground-truth scenes before and after it (deterministic in ``seed``)."""
    out = []
    for c in range(n):
        rng = random.Random(f"{seed}:chain:{c}")
        w, h = frame_size(rng.choice(list(ASPECTS)), rng.choice(short_sides))
        scene = random_scene(rng)
        for k in range(1, turns + 1):
            edit = None
            while edit is None:  # background_swap always fits: this ends
                edit = make_edit(rng.choice(CHAIN_TASKS), scene, rng)
            out.append(EvalSample(f"{MULTI_TURN}@{k}", edit.prompts[0], render(scene, w, h),
                                  render(edit.target, w, h), None, turn=k))
            scene = edit.target
    return out


def held_out(per_task: int, seed: int = HELD_OUT_SEED, short_sides: tuple[int, ...] = (64,),
             tasks: tuple[str, ...] = EVAL_TASKS) -> list[EvalSample]:
    """``per_task`` clean single-turn pairs of every task, and for ``multi_turn`` ``per_task`` chains of
    :data:`TURNS` turns (deterministic in ``seed``). ValueError naming an unknown task."""
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad:
        raise ValueError(f"unknown held-out task(s) {bad}; expected some of {EVAL_TASKS}")
    out = []
    for t, task in enumerate(tasks):
        if task == MULTI_TURN:
            out += chains(per_task, seed + 1000 * t, short_sides)
            continue
        for rec in generate(per_task, seed=seed + 1000 * t, short_sides=short_sides, failure_rate=0.0,
                            multi_turn=0.0, tasks=(task,)):
            def img(col):
                return decode_image(rec[col]["bytes"], f"{rec['omni_edit_id']} {col}") if rec.get(col) else None

            mask = img("mask_img")
            out.append(EvalSample(task, rec["edited_prompt_list"][0], img("src_img"), img("edited_img"),
                                  None if mask is None else mask.convert("L"), img("ref_img")))
    return out


def fed_image(samples: list[EvalSample], outputs: list[Image.Image], i: int) -> Image.Image | None:
    """What sample ``i``'s request was given: its source, or for turn k > 1 of a chain the previous output."""
    return outputs[i - 1] if samples[i].turn > 1 else samples[i].source


def _check_samples(pipe, samples: list[EvalSample]) -> None:
    """Before any model work: every sample's task runs on ``pipe``'s family, every chain's turns in order."""
    if not pipe.is_ace:
        bad = sorted({s.task for s in samples if s.source is None or s.reference is not None or s.turn})
        if bad:
            raise ValueError(f"held-out task(s) {bad} need the ACE family (no image, two images or an EditSession); "
                             f"this pipeline's SD3 model takes one image per request: use "
                             f"held_out(..., tasks=family_tasks(False))")
    for i, s in enumerate(samples):
        if s.turn > 1 and (i == 0 or samples[i - 1].turn != s.turn - 1):
            raise ValueError(f"sample {i} ({s.task}) is turn {s.turn} of a chain but sample {i - 1} is not its turn "
                             f"{s.turn - 1}; a chain's turns must be consecutive, in order")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _metrics(rows: list[tuple[float, float, bool, float, float, bool]]) -> TaskMetrics:
    a = np.array(rows, dtype=np.float64)
    return TaskMetrics(len(rows), *(float(x) for x in a.mean(axis=0)))


def _score_row(s: EvalSample, fed: Image.Image | None, out: Image.Image) -> tuple:
    """(L1, L2, judged, copy L1, copy L2, copy judged) of ``out`` for a request fed ``fed`` (None: text-to-image,
    whose copy baseline is a mid-grey image)."""
    copy = fed if fed is not None else Image.new("RGB", s.target.size, MID_GREY)
    o, tgt, c = _pixels(out), _pixels(s.target), _pixels(copy)
    judged = score(fed, out, s.instruction, s.mask, ref_img=s.reference).o_score >= 9
    copied = score(fed, copy, s.instruction, s.mask, ref_img=s.reference).o_score >= 9
    return (np.abs(o - tgt).mean(), ((o - tgt) ** 2).mean(), judged,
            np.abs(c - tgt).mean(), ((c - tgt) ** 2).mean(), copied)


def evaluate(pipe, samples: list[EvalSample], steps: int = 20, guidance: float = 1.0,
             seed: int = 0, batch_size: int = 16) -> tuple[EvalResult, list[Image.Image]]:
    """Edit every sample with ``pipe`` and score it; returns the result and the outputs in order.

    Text-to-image samples are generated at the target's size; reference samples get ``[source, reference]``;
    a chain's turns go through one ``EditSession`` (a new one at each turn 1); the other requests are stepped
    ``batch_size`` at a time (:meth:`EditPipeline.run_jobs`: the outputs do not depend on it). The copy
    baseline is the image the request was fed (a mid-grey image for text-to-image, which has none). ValueError before any model
    work for a task ``pipe``'s family cannot run, a chain out of order or a ``batch_size`` not an integer >= 1."""
    from omniace.engine.pipeline import EditSession

    check_int(batch_size, "batch_size", 1)
    _check_samples(pipe, samples)
    t0 = time.perf_counter()
    outputs: list[Image.Image | None] = [None] * len(samples)
    # single requests are independent: stepped together in batches (same results, less per-call overhead)
    single = [i for i, s in enumerate(samples) if not s.turn]
    prefix = "{image} " if pipe.is_ace else ""  # ACE names the edited image; SD3 takes the bare instruction
    for start in range(0, len(single), batch_size):
        chunk = single[start:start + batch_size]
        jobs = []
        for i in chunk:
            s = samples[i]
            kw = dict(steps=steps, guidance=guidance, seed=seed + i)
            if s.source is None:
                jobs.append(pipe.prepare_edit(None, s.instruction, size=s.target.size, **kw))
            else:
                images = [s.source] + ([s.reference] if s.reference is not None else [])
                masks = s.mask if (pipe.is_ace and s.mask is not None) else None
                jobs.append(pipe.prepare_edit(images, prefix + s.instruction, masks=masks, **kw))
        for i, out in zip(chunk, pipe.run_jobs(jobs)):
            outputs[i] = out
    session = None
    for i, s in enumerate(samples):  # a chain's turns, in order, through one EditSession
        if s.turn:
            session = EditSession(pipe) if s.turn == 1 else session
            outputs[i] = session.edit(prefix + s.instruction, s.source if s.turn == 1 else None, steps=steps,
                                      guidance=guidance, seed=seed + i)
    per_task: dict[str, list] = {}
    for i, (s, out) in enumerate(zip(samples, outputs)):
        per_task.setdefault(s.task, []).append(_score_row(s, fed_image(samples, outputs, i), out))
    every = [r for rows in per_task.values() for r in rows]
    settings = {"samples": len(samples), "steps": steps, "timestep_spacing": pipe.timestep_spacing,
                "guidance": guidance, "seed": seed, "seconds": round(time.perf_counter() - t0, 2)}
    result = EvalResult({k: _metrics(v) for k, v in per_task.items()}, _metrics(every), settings)
    return result, outputs


def from_target(pipe, samples: list[EvalSample], timesteps: list[int], seed: int = 0,
                batch_size: int = 16) -> dict[int, EvalResult]:
    """The model's one-call clean prediction from its own noised ground truth, scored as :func:`evaluate` scores.

    For each ``t`` in ``timesteps`` (DDPM steps 0..999) every single request (chains are skipped) gets
    ``x_t = alpha_t x0 + sigma_t eps`` of its target (eps from ``seed + i``), one model call at ``t`` (guidance
    1.0), and its x0 estimate decoded as the output. It tells what the model cannot draw from what the sampler's
    trajectory gets wrong: at ``t = 0`` the input is the answer (sigma_0 = 0.01), so an output that fails the
    judge there fails whatever the sampler. DDIM pipelines (the ACE family) only; ValueError otherwise, or for a
    timestep outside 0..999, before any model work.
    """
    import torch

    from omniace.engine.lcu import patchify
    from omniace.engine.pipeline import to_tensor
    from omniace.engine.sampler import DDIMSampler

    sampler = pipe.sampler(1)
    if not isinstance(sampler, DDIMSampler):
        raise ValueError(f"from_target noises targets on the DDPM schedule: this pipeline samples with "
                         f"{type(sampler).__name__}, not DDIMSampler")
    for t in timesteps:
        check_int(t, "timestep", 0, sampler.num_train_steps - 1)
    check_int(batch_size, "batch_size", 1)
    _check_samples(pipe, samples)
    sigma, alpha = sampler.schedule()
    single = [i for i, s in enumerate(samples) if not s.turn]
    prefix = "{image} " if pipe.is_ace else ""
    outputs: dict[int, dict[int, Image.Image]] = {t: {} for t in timesteps}
    for start in range(0, len(single), batch_size):
        chunk = single[start:start + batch_size]
        jobs, x0, eps = [], [], []
        for i in chunk:
            s = samples[i]
            if s.source is None:
                job = pipe.prepare_edit(None, s.instruction, size=s.target.size, steps=1, guidance=1.0)
            else:
                images = [s.source] + ([s.reference] if s.reference is not None else [])
                masks = s.mask if (pipe.is_ace and s.mask is not None) else None
                job = pipe.prepare_edit(images, prefix + s.instruction, masks=masks, steps=1, guidance=1.0)
            jobs.append(job)
            target = s.target if job.output is None else job.output.image(s.target)
            x0.append(patchify(pipe.codec.encode(to_tensor(target)), pipe.cfg.patch_size))
            eps.append(torch.randn(x0[-1].shape, generator=torch.Generator().manual_seed(seed + i)))
        batch = pipe.pack([smp for job in jobs for smp in job.samples])
        x0, eps = torch.cat(x0).to(pipe.device), torch.cat(eps).to(pipe.device)
        for t in timesteps:
            x_t = float(alpha[t]) * x0 + float(sigma[t]) * eps
            with torch.no_grad():
                out = pipe.model(batch, x_t, torch.full((len(jobs),), t, dtype=torch.long, device=pipe.device))
            if sampler.prediction == "eps":
                out = (x_t - float(sigma[t]) * out) / float(alpha[t])
            for i, job, part in zip(chunk, jobs, out.split([job.target_tokens for job in jobs])):
                job.x = part.float()
                outputs[t][i] = pipe.finish(job)
    results = {}
    for t in timesteps:
        per_task: dict[str, list] = {}
        for i in single:
            s = samples[i]
            per_task.setdefault(s.task, []).append(_score_row(s, s.source, outputs[t][i]))
        every = [r for rows in per_task.values() for r in rows]
        results[t] = EvalResult({k: _metrics(v) for k, v in per_task.items()}, _metrics(every),
                                {"samples": len(single), "from_target_timestep": t, "seed": seed})
    return results


def _shown_source(s: EvalSample, fed: Image.Image | None) -> Image.Image:
    """The grid's source cell: the image fed in (a condition map, a chain's previous output) with a
    reference image small at its top right, beside it; a blank white cell for text-to-image."""
    if fed is None:
        return Image.new("RGB", s.target.size, "white")
    if s.reference is None:
        return fed
    w, h = fed.size
    ref = s.reference.resize((max(1, w * 2 // 5), max(1, h * 2 // 5)), Image.NEAREST)
    shown = Image.new("RGB", (w + 2 + ref.width, h), "white")
    shown.paste(fed, (0, 0))
    shown.paste(ref, (w + 2, 0))
    return shown


def write_grid(samples: list[EvalSample], outputs: list[Image.Image], path: str | Path, cell: int = 112,
               fed: list[Image.Image | None] | None = None) -> None:
    """One row per sample: source | instruction | output | target, each scaled to ``cell`` pixels high.
    ``fed``: what each request was given (default: the samples' sources; a chain's turns were given the
    previous output); the source cell shows it (see :func:`_shown_source`)."""
    def fit(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.resize((max(1, round(w * cell / h)), cell), Image.NEAREST)

    fed = [s.source for s in samples] if fed is None else fed
    shown = [_shown_source(s, f) for s, f in zip(samples, fed)]
    width = max(fit(img).width for img in shown)
    text_w, pad = 200, 6
    header = 18
    grid = Image.new("RGB", (3 * width + text_w + 5 * pad, header + len(samples) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    cols = [pad, pad + width + pad, 2 * pad + width + text_w + pad, 3 * pad + 2 * width + text_w + pad]
    for x, name in zip(cols, ["source", "instruction", "output", "target"]):
        draw.text((x, 3), name, fill="black")
    for r, (s, out, f, src) in enumerate(zip(samples, outputs, fed, shown)):
        y = header + r * (cell + pad)
        grid.paste(fit(src), (cols[0], y))
        note = ("\n(no source image)" if f is None else "") + ("\n(reference: right of it)" if s.reference else "")
        draw.multiline_text((cols[1], y + 4), f"[{s.task}]\n" + "\n".join(textwrap.wrap(s.instruction, 30)) + note,
                            fill="black", spacing=3)
        grid.paste(fit(out), (cols[2], y))
        grid.paste(fit(s.target), (cols[3], y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run(pipe, out: str | Path, per_task: int = 8, steps: int = 20, guidance: float = 1.0, seed: int = 0,
        grid_per_task: int = 1, name: str = "eval", split_seed: int = HELD_OUT_SEED, log=print,
        tasks: tuple[str, ...] | None = None) -> EvalResult:
    """Evaluate on the held-out split (``tasks``, default: every task ``pipe``'s family runs,
    :func:`family_tasks`), print the table, write ``{name}.json`` and ``{name}_grid.png`` (the first
    ``grid_per_task`` samples of each task row)."""
    out = Path(out)
    samples = held_out(per_task, seed=split_seed, tasks=family_tasks(pipe.is_ace) if tasks is None else tasks)
    result, outputs = evaluate(pipe, samples, steps=steps, guidance=guidance, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    seen: collections.Counter = collections.Counter()
    shown = []
    for i, s in enumerate(samples):
        if seen[s.task] < grid_per_task:
            shown.append(i)
        seen[s.task] += 1
    write_grid([samples[i] for i in shown], [outputs[i] for i in shown], out / f"{name}_grid.png",
               fed=[fed_image(samples, outputs, i) for i in shown])
    log(result.table())
    log(f"wrote {out / f'{name}.json'} and {out / f'{name}_grid.png'} (source | instruction | output | target)")
    return result


def main(argv: list[str] | None = None) -> None:
    from omniace.engine.cli import GUIDANCE  # omniace demo's argument types: one message for a bad value
    from omniace.engine.pipeline import EditPipeline

    ap = argparse.ArgumentParser(prog="python -m omniace.train.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="a self-describing safetensors file (the trainer's export)")
    ap.add_argument("--out", default=None, help="folder for eval.json and eval_grid.png (default out/eval)")
    ap.add_argument("--per-task", type=int, default=8)
    # None until parsed, so --from-target can tell a flag given from its default
    defaults = {"steps": 20, "guidance": 1.0}
    ap.add_argument("--steps", type=int, default=None, help=f"DDIM steps per edit (default {defaults['steps']})")
    ap.add_argument("--guidance", type=GUIDANCE, default=None,
                    help=f"classifier-free guidance scale (default {defaults['guidance']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-per-task", type=int, default=None,
                    help="pairs per task shown in eval_grid.png (default 1)")
    ap.add_argument("--split-seed", type=int, default=HELD_OUT_SEED,
                    help="generator seed of the split (tune sampling settings on another one, e.g. 20000)")
    ap.add_argument("--from-target", metavar="T[,T...]", type=_timesteps,
                    help="instead of sampling: the model's one-call prediction from the noised ground truth at "
                         "these DDPM timesteps (e.g. 0,106,391,999; from_target), success and L1 per task and t")
    ap.add_argument("--shape-probe", action="store_true",
                    help="instead of scoring: edit each swap, addition and inpainting naming each shape in turn, "
                         "and print how much of its box the drawn object fills and what the judge reads "
                         "(train/shape_probe.py: does the model read the shape word?)")
    a = ap.parse_args(argv)
    if a.from_target and a.shape_probe:
        ap.error("--from-target and --shape-probe are two different reports; give one of them")
    for flag, given in (("--from-target", a.from_target), ("--shape-probe", a.shape_probe)):
        if given and a.out is not None:
            ap.error(f"--out is not written with {flag}, which prints its table; drop one of them")
        if given and a.grid_per_task is not None:
            ap.error(f"--grid-per-task sets the scored run's eval_grid.png, which {flag} does not draw; "
                     f"drop one of them")
    if a.from_target and (a.steps is not None or a.guidance is not None):  # one model call, no sampler
        ap.error(f"--from-target calls the model once per timestep, without the sampler: drop "
                 f"{'--steps' if a.steps is not None else '--guidance'}")
    a.grid_per_task = 1 if a.grid_per_task is None else a.grid_per_task
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.out is not None and Path(a.out).exists() and not Path(a.out).is_dir():  # before the evaluation's minutes
        ap.error(f"--out {a.out!r} is a file; expected a folder (made if missing) for eval.json and eval_grid.png")
    for name in ("per_task", "grid_per_task", "steps"):  # refused before loading anything (exit 2)
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(a, name)}")
    try:  # a missing, damaged or foreign weights file: one line, like omniace's CLI (engine/cli.py)
        pipe = EditPipeline.pretrained(a.weights)
    except (ValueError, OSError) as err:
        ap.exit(1, f"{ap.prog}: error: {' '.join(str(err).split())}\n")
    if a.shape_probe:
        from .shape_probe import probe, table

        if not pipe.is_ace:
            ap.exit(1, f"{ap.prog}: error: --shape-probe edits with masks and the {{image}} prefix: an ACE-family "
                       f"model only\n")
        # the split's own swaps, additions and inpaintings (each task's pairs depend on its place in the split)
        print(table(probe(pipe, held_out(a.per_task, seed=a.split_seed), a.steps, a.guidance, a.seed)))
        return
    if a.from_target:
        samples = held_out(a.per_task, seed=a.split_seed, tasks=family_tasks(pipe.is_ace))
        try:
            results = from_target(pipe, samples, a.from_target, seed=a.seed)
        except ValueError as err:
            ap.exit(1, f"{ap.prog}: error: {err}\n")
        print("task".ljust(24) + "".join(f"t={t} (success, L1)".rjust(24) for t in a.from_target))
        for task in results[a.from_target[0]].per_task:
            cells = (results[t].per_task[task] for t in a.from_target)
            print(task.ljust(24) + "".join(f"{m.success:8.0%} {m.l1:.4f}".rjust(24) for m in cells))
        return
    run(pipe, a.out or "out/eval", a.per_task, a.steps, a.guidance, a.seed, a.grid_per_task, split_seed=a.split_seed)


def _timesteps(text: str) -> list[int]:
    """``--from-target`` values: comma-separated integers 0..999."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 0,106,391,999") from None
    bad = [v for v in values if not 0 <= v <= 999]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} is not a DDPM timestep; expected integers in [0, 999]")
    return list(dict.fromkeys(values))  # each once, in the order given


if __name__ == "__main__":
    main()
