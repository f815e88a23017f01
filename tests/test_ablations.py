"""The ablation report: tables, the verdict lines and the plot are rendered from the results JSON; the
runner's --recipe flags match the default's recipe script; --evaluate-only trains nothing."""
import argparse
import json
import re
import shlex
from pathlib import Path

from omniace.train.ablations import RECIPE_STEPS, RECIPE_WARMUP, STUDIES, markdown, plot, run_study, train_args


def _run(seed, l1, success):
    task = {"n": 2, "l1": l1, "l2": l1 / 3, "success": success, "identity_l1": 0.09, "identity_l2": 0.03,
            "identity_success": 0.0}
    return {"seed": seed, "final_train_loss": 0.05, "overall": task, "per_task": {"object_swap": task}}


def test_report_states_the_budget_and_whether_the_lead_beats_the_seed_spread(tmp_path):
    settings = {"date": "2026-11-24", "device": "CPU", "torch": "2.13", "steps": 600, "token_budget": 1024,
                "nproc": 2, "lr": 1e-3, "seeds": [0, 1], "per_task": 6, "sample_steps": 10, "guidance": 1.5}
    arms = {arm.name: {"preset": arm.preset, "args": arm.args, "runs": [_run(0, l1, 0.1), _run(1, l1 + 0.001, 0.0)]}
            for arm, l1 in zip(STUDIES["importance"], (0.12, 0.15))}
    doc = {"studies": {"importance": {"settings": settings, "arms": arms}}}
    text = markdown(doc)
    assert "600 steps" in text and "| copy (source as output) | | 0.0900 |" in text
    assert "| weighted (lambda = 1[o_score >= 9]) | 0, 1 | 0.1205 +- 0.0007 |" in text
    assert "every arm's L1 is still above copying the source" in text
    assert "Lowest L1: weighted" in text and "is more than the two arms' seed spreads" in text
    plot(doc, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def _script_trainer_args(path: Path) -> list[str]:
    """The trainer's flags in a bash recipe, its variables replaced by their defaults (``NAME=${NAME:-v}``)."""
    text = path.read_text().replace("\\\n", " ")
    env = {}
    for name, default, plain in re.findall(r"^(\w+)=(?:\$\{\w+:-([^}]*)\}|(\S+))$", text, re.M):
        env[name] = default or plain
    line = next(ln for ln in text.splitlines() if "-m omniace.train.trainer" in ln)
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line)
    words = shlex.split(line)
    return words[words.index("omniace.train.trainer") + 1:]


def _as_flags(args: list[str]) -> dict[str, str]:
    """``{flag: value}`` (the last one wins, as argparse does; '' for a switch)."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out[args[i]] = args[i + 1] if has_value else ""
        i += 2 if has_value else 1
    return out


def test_recipe_arms_train_with_the_default_recipes_flags():
    """``--recipe`` must train an arm exactly as train/recipe_default.sh trains the default: the weighted arm's
    seed 0 is then the shipped model's own run."""
    script = Path(__file__).resolve().parents[1] / "train" / "recipe_default.sh"
    a = argparse.Namespace(corpus="data/synth-default", lr=1e-3, warmup=RECIPE_WARMUP, token_budget=1024,
                           recipe=True)
    ours = _as_flags(train_args(a, "ace-edit", 0, Path("runs/default"), RECIPE_STEPS) + STUDIES["importance"][0].args)
    theirs = _as_flags(_script_trainer_args(script))
    assert ours.pop("--importance") == "binary"  # the trainer's default: the script leaves it implicit
    assert float(ours.pop("--lr")) == float(theirs.pop("--lr"))
    assert ours == theirs
    plain = _as_flags(train_args(argparse.Namespace(**{**vars(a), "recipe": False}), "ace-edit", 0, Path("r"), 600))
    assert "--task-weight" not in plain and plain["--ckpt-every"] == "600"


def test_evaluate_only_reports_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    import omniace.train.ablations as abl

    def no_training(*args, **kwargs):
        raise AssertionError("--evaluate-only must not train")

    monkeypatch.setattr(abl, "launch", no_training)
    scored = {k: v for k, v in _run(0, 0.05, 0.3).items() if k in ("overall", "per_task")}
    monkeypatch.setattr(abl, "evaluate_weights", lambda *args: scored)
    done = tmp_path / "importance" / "weighted-seed1"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"")
    (done / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.04}) + "\n")
    a = argparse.Namespace(out=tmp_path, seeds=[0, 1], evaluate_only=True, per_task=2, sample_steps=2, guidance=1.0)
    logged = []
    res = run_study("importance", a, {}, log=logged.append)
    assert list(res["arms"]) == [STUDIES["importance"][0].name]
    assert [r["seed"] for r in res["arms"][STUDIES["importance"][0].name]["runs"]] == [1]
    assert sum("not finished" in line for line in logged) == 3  # weighted seed 0, unfiltered seeds 0 and 1
