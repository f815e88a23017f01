"""Miniature reproductions of OmniEdit's ablations, trained with the real trainer and scored by ``eval.py``.

- ``importance`` (paper table 6): the importance-weighted loss (binary lambda from ``o_score >= 9``)
  against training on every pair unfiltered, on the ACE family.
- ``conditioning`` (paper table 7): how an MMDiT base is conditioned on the source image: EditNet (the
  branch sees the main tokens of every block and updates image and text streams), a ControlNet-style
  branch (parallel on the input embedding, image stream only), and channel-concatenation fine-tuning
  of the whole base. All three start from one base pretrained on the same corpus without a source
  image; the two branches train with the base frozen, as in the paper.

Every arm gets the same steps, token budget, learning rate, data order and seeds. Results (every seed,
then mean and spread) go to ``docs/ablations.json``, ``docs/ablations.md`` and ``docs/ablations.png``.

    python -m omniace.train.ablations --corpus data/synth --out runs/ablations --seeds 0 1 2

``--recipe`` trains every arm with the embedded default's recipe (``train/recipe_default.sh``: 12,000 steps,
warmup 200, the local tasks weighted 8, fp16 export, no activation checkpointing; :data:`RECIPE_ARGS`) and
scores it at the demo's guidance 1.0. Such a run takes over an hour on 2 CPU cores, so runs checkpoint every
1000 steps: rerunning the same command resumes a stopped run exactly. ``--evaluate-only`` reports the runs
that have finished and trains nothing (a study that spans several sittings). ``--findings F`` stores a
Markdown verdict on the tables (written by whoever read them: do OmniEdit's findings hold, with the seed
spread) and prints it above them; ``--render --findings F`` replaces it without re-evaluating anything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw


@dataclass
class Arm:
    slug: str  # its runs' folder name
    name: str
    preset: str
    args: list[str] = field(default_factory=list)
    needs_base: bool = False


# train/recipe_default.sh's trainer flags beyond train_args' (tests/test_ablations.py checks they match the script)
RECIPE_LOCAL_TASKS = ("object_swap=8,object_addition=8,attribute_modification=8,inpainting=8,reference_guided=8,"
                      "object_removal=8")
RECIPE_ARGS = ["--log-every", "100", "--export-dtype", "fp16", "--no-activation-checkpointing",
               "--task-weight", RECIPE_LOCAL_TASKS]
RECIPE_STEPS, RECIPE_WARMUP, RECIPE_GUIDANCE = 12000, 200, 1.0
CKPT_EVERY = 1000  # at most this many steps are lost to a stop; the same command resumes the run


STUDIES = {
    "importance": [
        # the embedded default's model and objective (train/recipe_default.sh), with and without the weight
        Arm("weighted", "weighted (lambda = 1[o_score >= 9])", "ace-edit", ["--importance", "binary"]),
        Arm("unfiltered", "unfiltered (every pair, lambda = 1)", "ace-edit", ["--importance", "none"]),
    ],
    "conditioning": [
        Arm("editnet", "EditNet (base frozen)", "sd3-small-editnet", ["--mode", "editnet"], needs_base=True),
        Arm("controlnet", "ControlNet-style (base frozen, no text update)", "sd3-small-controlnet", ["--mode", "editnet"],
            needs_base=True),
        Arm("concat", "channel concat (full fine-tune)", "sd3-small-concat", ["--mode", "full"], needs_base=True),
    ],
}


def launch(args: list[str], nproc: int, log_path: Path) -> None:
    """One trainer run (torchrun when nproc > 1); its output goes to ``log_path``."""
    cmd = [sys.executable, "-m", "omniace.train.trainer"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "omniace.train.trainer"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:  # a resumed run's log follows the stopped one's
        proc = subprocess.run(cmd + args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"trainer failed ({proc.returncode}); see {log_path}")


def evaluate_weights(path: Path, per_task: int, steps: int, guidance: float) -> dict:
    from omniace.engine.pipeline import EditPipeline

    from .eval import evaluate, family_tasks, held_out

    pipe = EditPipeline.pretrained(path)
    result, _ = evaluate(pipe, held_out(per_task, tasks=family_tasks(pipe.is_ace)), steps=steps, guidance=guidance,
                         seed=0)
    return result.to_dict()


def train_args(a: argparse.Namespace, preset: str, seed: int, out: Path, steps: int) -> list[str]:
    return ["--data", str(a.corpus), "--out", str(out), "--preset", preset, "--steps", str(steps),
            "--lr", str(a.lr), "--warmup", str(a.warmup), "--token-budget", str(a.token_budget),
            "--ckpt-every", str(min(steps, CKPT_EVERY)), "--log-every", "50", "--decoder", "pil",
            "--seed", str(seed)] + (RECIPE_ARGS if a.recipe else [])


class RunError(Exception):
    """A run folder that cannot be reported: its message is one line naming the folder."""


def last_record(run_dir: Path) -> dict | None:
    """The last record of a run's ``metrics.jsonl``, or None when it has none."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


def unfinished(run_dir: Path, steps: int) -> str | None:
    """Why ``run_dir`` is not a finished run of ``steps`` steps (no export, no metrics, another length), or None."""
    if not (run_dir / "model.safetensors").exists():
        return f"no model.safetensors in {run_dir} (not finished)"
    last = last_record(run_dir)
    if last is None:
        return f"no metrics.jsonl records in {run_dir}"
    if last.get("step") != steps:
        return f"{run_dir} ended at step {last.get('step')}, this study's schedule is {steps} steps"
    return None


def run_study(study: str, a: argparse.Namespace, settings: dict, log=print) -> dict:
    """Train (unless ``a.evaluate_only``) and evaluate every arm and seed of ``study``; returns its results, with
    ``left_out`` naming the runs ``--evaluate-only`` found unfinished. RunError for a run it cannot score."""
    results: dict = {"settings": settings, "arms": {}, "left_out": []}
    base = None
    if any(arm.needs_base for arm in STUDIES[study]):
        base_dir = a.out / study / "base"
        base = base_dir / "model.safetensors"
        if not base.exists() and not a.evaluate_only:
            log(f"[{study}] pretraining the sd3-small base ({a.base_steps} steps, no source image)")
            launch(train_args(a, "sd3-small", 0, base_dir, a.base_steps), a.nproc, base_dir / "train.log")
        if base.exists():
            results["base"] = {"preset": "sd3-small", "steps": a.base_steps}
    for arm in STUDIES[study]:
        runs = []
        for seed in a.seeds:
            run_dir = a.out / study / f"{arm.slug}-seed{seed}"
            weights = run_dir / "model.safetensors"
            why = unfinished(run_dir, a.steps) if a.evaluate_only else None
            if why:
                log(f"[{study}] {arm.name} seed {seed}: left out: {why}")
                results["left_out"].append(f"{arm.name} seed {seed}: {why}")
                continue
            if not weights.exists():  # a finished run is reused: rerunning the script only re-evaluates
                args = train_args(a, arm.preset, seed, run_dir, a.steps) + arm.args
                if arm.needs_base:
                    args += ["--init", str(base)]
                launch(args, a.nproc, run_dir / "train.log")
            try:
                metrics = evaluate_weights(weights, a.per_task, a.sample_steps, a.guidance)
            except (ValueError, OSError) as err:
                raise RunError(f"{weights}: {' '.join(str(err).split())}") from None
            last = last_record(run_dir)
            if last is None:
                raise RunError(f"{run_dir} has a model.safetensors but no metrics.jsonl records")
            runs.append({"seed": seed, "final_train_loss": last["loss"], **metrics})
            o = metrics["overall"]
            log(f"[{study}] {arm.name} seed {seed}: L1 {o['l1']:.4f} L2 {o['l2']:.4f} success {o['success']:.0%}")
        if runs:
            results["arms"][arm.name] = {"preset": arm.preset, "args": arm.args, "runs": runs}
    return results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(doc: dict) -> str:
    lines = ["# OmniEdit ablations, in miniature", "",
             "Generated by `python -m omniace.train.ablations` (`train/ablations.py`, whose docstring says what "
             "each arm is). Mean +- standard deviation over seeds; L1/L2 on [0, 1] pixels against the ground "
             "truth (lower is better); success = the judge's o_score >= 9 (higher is better). The *copy* row "
             "scores the unedited source as the output: the bar any edit model has to clear.", ""]
    if doc.get("findings"):  # the reader's verdict on the tables below, kept in the JSON (--findings)
        lines += ["## What the tables say", "", doc["findings"].strip(), ""]
    for study, res in doc["studies"].items():
        s = res["settings"]
        lines += [f"## {study}", "",
                  f"{s['date']}, {s['device']}, torch {s['torch']}. Every arm: {s['steps']} steps, token budget "
                  f"{s['token_budget']} per rank x {s['nproc']} ranks, lr {s['lr']}, seeds {s['seeds']}; "
                  f"evaluated on the held-out split ({s['per_task']} pairs per task, {s['sample_steps']} sampling "
                  f"steps, guidance {s['guidance']})." + (
                      " Trained with the embedded default's recipe (`train/recipe_default.sh`: warmup "
                      f"{s['warmup']}, the flags `{' '.join(RECIPE_ARGS)}`)." if s.get("recipe") else ""), ""]
        if "base" in res:
            lines += [f"Shared base: {res['base']['preset']} pretrained {res['base']['steps']} steps on the "
                      "same corpus without the source image.", ""]
        lines += ["| arm | seeds | L1 | L2 | success | final train loss |", "|---|---|---|---|---|---|"]
        copy = None
        for name, arm in res["arms"].items():
            runs = arm["runs"]
            cells = []
            for key in ("l1", "l2", "success"):
                m, sd = _mean_sd([r["overall"][key] for r in runs])
                spread = len(runs) > 1
                if key == "success":
                    cells.append(f"{m:.1%} +- {sd:.1%}" if spread else f"{m:.1%}")
                else:
                    cells.append(f"{m:.4f} +- {sd:.4f}" if spread else f"{m:.4f}")
            loss = _mean_sd([r["final_train_loss"] for r in runs])
            seeds = ", ".join(str(r["seed"]) for r in runs)
            lines.append(f"| {name} | {seeds} | {' | '.join(cells)} | {loss[0]:.4f} |")
            copy = runs[0]["overall"]
        lines.append(f"| copy (source as output) | | {copy['identity_l1']:.4f} | {copy['identity_l2']:.4f} | "
                     f"{copy['identity_success']:.1%} | |")
        l1 = {name: _mean_sd([r["overall"]["l1"] for r in arm["runs"]]) for name, arm in res["arms"].items()}
        n_runs = {name: len(arm["runs"]) for name, arm in res["arms"].items()}
        if all(m > copy["identity_l1"] for m, _ in l1.values()):
            lines += ["", f"At this budget every arm's L1 is still above copying the source ({copy['identity_l1']:.4f}): "
                      "the table compares how far each arm got in the same steps, not where it would converge."]
        (best, (m0, sd0)), *rest = sorted(l1.items(), key=lambda kv: kv[1][0])
        if rest:
            name1, (m1, sd1) = rest[0]
            if min(n_runs[best], n_runs[name1]) < 2:
                lines += ["", f"Lowest L1: {best}, ahead of {name1} by {m1 - m0:.4f}; with one seed of an arm there "
                          "is no spread to weigh the lead against."]
            else:
                verdict = "more than" if m1 - m0 > sd0 + sd1 else "within"
                lines += ["", f"Lowest L1: {best}; its lead over {name1} ({m1 - m0:.4f}) is {verdict} the two "
                          f"arms' seed spreads combined ({sd0 + sd1:.4f})."]
        tasks = list(next(iter(res["arms"].values()))["runs"][0]["per_task"])
        lines += ["", "Success rate per task (mean over seeds):", "",
                  "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, arm in res["arms"].items():
            cells = [f"{statistics.fmean(r['per_task'][t]['success'] for r in arm['runs']):.0%}" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if res.get("left_out"):
            lines += ["", "Left out (not finished when this table was made): " + "; ".join(res["left_out"]) + "."]
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Bars of the mean overall success and L1 per arm, one dot per seed (PIL, no plotting dependency)."""
    arms = [(study, name, arm) for study, res in doc["studies"].items() for name, arm in res["arms"].items()]
    row_h, left, width = 34, 330, 260
    img = Image.new("RGB", (left + 2 * width + 110, 50 + row_h * len(arms)), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), "success rate (0-100%)", fill="black")
    d.text((left + width + 50, 8), "L1 vs target (0-0.2; red: copying the source)", fill="black")
    for i, (study, name, arm) in enumerate(arms):
        y = 40 + i * row_h
        d.text((8, y + 6), f"[{study}] {name}"[:52], fill="black")
        for col, (key, scale, color) in enumerate([("success", 1.0, (60, 120, 200)), ("l1", 0.2, (200, 110, 60))]):
            x0 = left + col * (width + 50)
            vals = [r["overall"][key] for r in arm["runs"]]
            m = statistics.fmean(vals)
            d.rectangle([x0, y, x0 + int(width * min(1.0, m / scale)), y + row_h - 10], fill=color)
            for v in vals:
                x = x0 + int(width * min(1.0, v / scale))
                d.ellipse([x - 3, y + 9, x + 3, y + 15], fill="black")
            if key == "l1":  # the copy-the-source baseline as a red tick
                xc = x0 + int(width * min(1.0, arm["runs"][0]["overall"]["identity_l1"] / scale))
                d.line([xc, y - 3, xc, y + row_h - 7], fill=(200, 0, 0), width=2)
            label = f"{m:.0%}" if key == "success" else f"{m:.3f}"
            d.text((x0 + int(width * min(1.0, m / scale)) + 8, y + 6), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    from omniace.engine.cli import GUIDANCE  # omniace demo's argument type: one message for a bad value

    ap = argparse.ArgumentParser(prog="python -m omniace.train.ablations", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, help="OmniEdit Parquet corpus (required unless --render)")
    ap.add_argument("--render", action="store_true", help="only re-render the .md and .png from the .json")
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", action="store_true",
                    help=f"train with the embedded default's recipe: {RECIPE_STEPS} steps, warmup {RECIPE_WARMUP}, "
                         f"guidance {RECIPE_GUIDANCE}, and {' '.join(RECIPE_ARGS)}")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="train nothing: report the runs already finished in --out")
    ap.add_argument("--steps", type=int, default=None, help=f"default 1000 ({RECIPE_STEPS} with --recipe)")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None, help=f"default 100 ({RECIPE_WARMUP} with --recipe)")
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--per-task", type=int, default=6)
    ap.add_argument("--sample-steps", type=int, default=10)  # the demo's settings (chosen on a validation split)
    ap.add_argument("--guidance", type=GUIDANCE, default=None, help=f"default 1.5 ({RECIPE_GUIDANCE} with --recipe)")
    ap.add_argument("--tag", default="", help="keep these results beside earlier ones: the study is stored as "
                    "'<study> (<tag>)' in the docs, e.g. a longer budget")
    ap.add_argument("--findings", type=Path, default=None,
                    help="a Markdown file: the plain verdict on the tables (do OmniEdit's findings hold, with the "
                         "seed spread), stored in the JSON and printed above the tables; with --render, replaces it")
    a = ap.parse_args(argv)
    for name, plain, recipe in (("steps", 1000, RECIPE_STEPS), ("warmup", 100, RECIPE_WARMUP),
                                ("guidance", 1.5, RECIPE_GUIDANCE)):
        if getattr(a, name) is None:
            setattr(a, name, recipe if a.recipe else plain)
    doc_path = a.docs / "ablations.json"
    findings = None
    if a.findings is not None:
        try:
            findings = a.findings.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            ap.error(f"--findings {a.findings}: cannot read it as text ({err})")
        if not findings.strip():
            ap.error(f"--findings {a.findings} is empty: write the verdict, or leave the flag out")
    if a.render and not doc_path.exists():
        ap.error(f"--render: no {doc_path} to render (run a study first, or point --docs at its folder)")
    try:  # a study's results are added to those already published
        doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"studies": {}}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        ap.error(f"{doc_path}: not a results JSON this script wrote ({err})")
    if not isinstance(doc, dict) or not isinstance(doc.get("studies"), dict):
        ap.error(f"{doc_path}: not a results JSON this script wrote (no 'studies' object)")
    if findings is not None:
        doc["findings"] = findings.strip()
    if a.render:
        if findings is not None:
            doc_path.write_text(json.dumps(doc, indent=1) + "\n")
        (a.docs / "ablations.md").write_text(markdown(doc) + "\n")
        plot(doc, a.docs / "ablations.png")
        print(f"rendered {a.docs / 'ablations.md'} and {a.docs / 'ablations.png'} from {doc_path}")
        return
    if a.corpus is None and not a.evaluate_only:
        ap.error("--corpus is required (unless --render or --evaluate-only)")
    for name in ("per_task", "sample_steps", "steps", "base_steps", "token_budget", "nproc"):  # before any training
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(a, name)}")
    import torch

    studies = list(STUDIES) if a.study == "all" else [a.study]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("render", "findings")}
    settings = {**settings, "date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__}
    written = False
    for study in studies:
        try:
            result = run_study(study, a, settings)
        except RunError as err:
            ap.exit(1, f"{ap.prog}: error: {err}\n")
        if not result["arms"]:  # nothing to show: the published table stays as it is
            print(f"[{study}] no finished runs in {a.out / study}: nothing written for this study")
            continue
        written = True
        doc["studies"][f"{study} ({a.tag})" if a.tag else study] = result
        a.docs.mkdir(parents=True, exist_ok=True)
        doc_path.write_text(json.dumps(doc, indent=1) + "\n")
        (a.docs / "ablations.md").write_text(markdown(doc) + "\n")
        plot(doc, a.docs / "ablations.png")
    if written:
        print(f"wrote {doc_path}, {a.docs / 'ablations.md'} and {a.docs / 'ablations.png'}")
    elif findings is not None:
        print(f"--findings {a.findings} was not stored: no study was written (`--render --findings` stores it)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
