"""The ablation report: tables, the verdict lines and the plot are rendered from the results JSON."""
from omniace.train.ablations import STUDIES, markdown, plot


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
    assert "600 steps" in text and "| copy (source as output) | 0.0900 |" in text
    assert "every arm's L1 is still above copying the source" in text
    assert "Lowest L1: weighted" in text and "is more than the two arms' seed spreads" in text
    plot(doc, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
