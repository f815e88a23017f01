"""The ablation report: tables, the verdict lines and the plot are rendered from the results JSON; the
runner's --recipe flags match the default's recipe script; --evaluate-only trains nothing."""
import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

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


def test_evaluate_only_reports_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import omniace.train.ablations as abl

    def no_training(*args, **kwargs):
        raise AssertionError("--evaluate-only must not train")

    monkeypatch.setattr(abl, "launch", no_training)
    scored = {k: v for k, v in _run(0, 0.05, 0.3).items() if k in ("overall", "per_task")}
    monkeypatch.setattr(abl, "evaluate_weights", lambda *args: scored)
    for name, step in (("weighted-seed1", 10), ("unfiltered-seed0", 7)):  # finished; stopped early
        run = tmp_path / "importance" / name
        run.mkdir(parents=True)
        (run / "model.safetensors").write_bytes(b"")
        (run / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 0.04}) + "\n")
    a = argparse.Namespace(out=tmp_path, seeds=[0, 1], evaluate_only=True, per_task=2, sample_steps=2, guidance=1.0,
                           steps=10)
    logged = []
    res = run_study("importance", a, {}, log=logged.append)
    weighted, unfiltered = (arm.name for arm in STUDIES["importance"])
    assert list(res["arms"]) == [weighted] and [r["seed"] for r in res["arms"][weighted]["runs"]] == [1]
    assert len(res["left_out"]) == 3 and sum("left out" in line for line in logged) == 3
    assert any(f"{unfiltered} seed 0: " in x and "ended at step 7, this study's schedule is 10 steps" in x
               for x in res["left_out"])
    settings = {"date": "d", "device": "CPU", "torch": "t", "steps": 10, "token_budget": 1, "nproc": 2, "lr": 1e-3,
                "seeds": [0, 1], "per_task": 2, "sample_steps": 2, "guidance": 1.0}
    text = markdown({"studies": {"importance": {**res, "settings": settings}}})
    assert "Left out (not finished when this table was made): " in text and "no model.safetensors" in text

    # a study with no finished run leaves the published docs as they are; --corpus is not needed
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ablations.json").write_text('{"studies": {"importance": "published"}}')
    abl.main(["--evaluate-only", "--out", str(tmp_path / "empty"), "--docs", str(docs), "--study", "importance"])
    assert "no finished runs" in capsys.readouterr().out
    assert json.loads((docs / "ablations.json").read_text()) == {"studies": {"importance": "published"}}
    assert not (docs / "ablations.md").exists()


@pytest.mark.parametrize("argv,message", [
    (["--per-task", "0"], "--per-task must be an integer >= 1, got 0"),
    (["--sample-steps", "0"], "--sample-steps must be an integer >= 1, got 0"),
    (["--guidance", "nan"], "guidance"),
])
def test_bad_settings_are_refused_before_any_training(argv, message, tmp_path, capsys):
    import omniace.train.ablations as abl

    with pytest.raises(SystemExit) as e:
        abl.main(["--corpus", str(tmp_path), "--out", str(tmp_path), "--docs", str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_run_that_cannot_be_scored_is_one_line(tmp_path, capsys):
    import omniace.train.ablations as abl

    run = tmp_path / "importance" / "weighted-seed0"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1000, "loss": 0.04}) + "\n")
    with pytest.raises(SystemExit) as e:
        abl.main(["--evaluate-only", "--out", str(tmp_path), "--docs", str(tmp_path / "docs"), "--study", "importance",
                  "--seeds", "0", "--per-task", "1", "--sample-steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and str(run / "model.safetensors") in err and len(err.strip().splitlines()) == 1


def test_findings_are_stored_and_printed_above_the_tables(tmp_path, capsys):
    from omniace.train.ablations import main

    settings = {"date": "2026-12-02", "device": "CPU", "torch": "2.13", "steps": 12000, "token_budget": 1024,
                "nproc": 2, "lr": 1e-3, "seeds": [0], "per_task": 10, "sample_steps": 10, "guidance": 1.0}
    arms = {arm.name: {"preset": arm.preset, "args": arm.args, "runs": [_run(0, l1, 0.3)]}
            for arm, l1 in zip(STUDIES["importance"], (0.035, 0.052))}
    (tmp_path / "ablations.json").write_text(json.dumps({"studies": {"importance": {"settings": settings,
                                                                                    "arms": arms}}}))
    verdict = tmp_path / "verdict.md"
    verdict.write_text("Importance weighting helps: 0.035 against 0.052, one seed each.\n")
    main(["--render", "--docs", str(tmp_path), "--findings", str(verdict)])
    text = (tmp_path / "ablations.md").read_text()
    assert text.index("## What the tables say") < text.index("## importance")
    assert "Importance weighting helps: 0.035 against 0.052" in text
    assert json.loads((tmp_path / "ablations.json").read_text())["findings"].startswith("Importance weighting")
    main(["--render", "--docs", str(tmp_path)])  # re-rendering without the flag keeps the stored verdict
    assert "Importance weighting helps" in (tmp_path / "ablations.md").read_text()
    verdict.write_text("  \n")
    with pytest.raises(SystemExit):
        main(["--render", "--docs", str(tmp_path), "--findings", str(verdict)])
    err = capsys.readouterr().err
    assert "--findings" in err and "is empty" in err


@pytest.mark.parametrize("content, message", [(None, "no "), ("{not json", "not a results JSON"),
                                              ("[]", "no 'studies' object")])
def test_render_refuses_a_missing_or_foreign_results_file(tmp_path, capsys, content, message):
    from omniace.train.ablations import main

    if content is not None:
        (tmp_path / "ablations.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["--render", "--docs", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and str(tmp_path / "ablations.json") in err


def test_findings_with_no_study_written_say_so(tmp_path, capsys):
    from omniace.train.ablations import main

    verdict = tmp_path / "verdict.md"
    verdict.write_text("Nothing to say yet.\n")
    main(["--evaluate-only", "--study", "importance", "--out", str(tmp_path / "runs"), "--docs",
          str(tmp_path / "docs"), "--findings", str(verdict)])
    assert "was not stored: no study was written" in capsys.readouterr().err
    assert not (tmp_path / "docs" / "ablations.json").exists()
