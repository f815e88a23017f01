"""The torchrun FSDP2 trainer on CPU (gloo): loss falls, kill-and-resume is bit-identical, lambda = 0 gives no
gradient, a bare OmniEdit file trains, EditNet mode keeps the base frozen, a non-finite loss stops cleanly."""
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from omniace.engine.config import get_config  # noqa: E402
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack  # noqa: E402
from omniace.engine.model import build_model, load_model  # noqa: E402
from omniace.train.checkpoint import CheckpointManager, export_checkpoint  # noqa: E402
from omniace.train.objective import Objective, target_sample_index, weighted_loss  # noqa: E402
from omniace.train.omniedit_format import omniedit_schema  # noqa: E402
from omniace.train.parallelize import set_trainable  # noqa: E402
from omniace.train.synthetic import write_corpus  # noqa: E402
from omniace.train.trainer import TrainConfig, lr_at  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_corpus")
    write_corpus(d, 160, shard_size=40, log=lambda m: None, seed=11, fmt="png")
    return d


def trainer_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "omniace.train.trainer"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "omniace.train.trainer"]


def run_trainer(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(trainer_cmd(nproc) + args, capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_loss_falls_and_a_killed_run_resumes_bit_identically(corpus, tmp_path):
    args = ["--data", str(corpus), "--steps", "16", "--lr", "3e-3", "--warmup", "2", "--log-every", "1",
            "--ckpt-every", "4", "--decoder", "pil", "--token-budget", "500"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_trainer(args + ["--out", str(whole)], nproc=2)
    curve = losses(whole)
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.02, curve

    # SIGKILL the whole torchrun group as soon as the step-4 checkpoint is complete (no clean shutdown)
    proc = subprocess.Popen(trainer_cmd(2) + args + ["--out", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if "checkpoint:" in line and "step_00000004" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    resumed = run_trainer(args + ["--out", str(killed)], nproc=2)
    assert "resumed from" in resumed.stdout
    assert losses(killed) == curve  # the same loss, bit for bit, at every step
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the single-process export of a checkpoint's EMA weights is the trainer's own final export
    c = load_file(export_checkpoint(CheckpointManager(whole / "checkpoints").latest(), tmp_path / "ema.safetensors"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def _batch(seed: int, weights=(1.0, 0.0)):
    g = torch.Generator().manual_seed(seed)
    cfg = get_config("ace-tiny")
    c = cfg.in_channels

    def r(*shape):
        return torch.randn(*shape, generator=g)

    samples = [LCUSample([ConditionUnit("{image} edit", [ImageInput(r(c, 6, 10))], text=r(7, cfg.y_channels))],
                         ImageInput(r(c, 6, 10))),
               LCUSample([ConditionUnit("{image} other", [ImageInput(r(c, 8, 4))], text=r(5, cfg.y_channels))],
                         ImageInput(r(c, 8, 4)))]
    return pack(samples, cfg.patch_size, codec_factor=cfg.codec_factor), torch.tensor(weights)


def _grads(batch, weights, second_target=None):
    torch.manual_seed(0)
    model = build_model("ace-tiny")
    for p in model.parameters():  # leave the zero init so every weight has a gradient path
        torch.nn.init.normal_(p, std=0.05)
    obj = Objective("eps")
    if second_target is not None:
        batch.tokens[batch.target_index[batch.sample_of_token[batch.target_index] == 1]] = second_target
    sample_of = target_sample_index(batch)
    noised = obj.noise(batch.target_tokens(), sample_of, 2, torch.Generator().manual_seed(3))
    pred = model(batch, noised.x_t, noised.t)
    loss = weighted_loss(obj.per_sample(pred, noised.target, sample_of, 2), weights, 2)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_zero_weight_sample_contributes_no_gradient():
    batch, w = _batch(0)
    n1 = int((batch.sample_of_token[batch.target_index] == 1).sum())
    other = torch.randn(n1, batch.tokens.shape[1], generator=torch.Generator().manual_seed(9))
    base = _grads(batch, w)
    changed = _grads(_batch(0)[0], w, second_target=other)  # sample 1's target replaced by noise
    assert base.keys() == changed.keys() and len(base) > 20
    assert all(torch.equal(base[k], changed[k]) for k in base)  # lambda = 0: exactly nothing
    weighted = _grads(_batch(0)[0], torch.tensor([1.0, 1.0]), second_target=other)
    assert any(not torch.equal(base[k], weighted[k]) for k in base)  # the check can fail: lambda = 1 counts


def test_a_bare_omniedit_parquet_written_by_pyarrow_trains(tmp_path):
    def png(color, size=(64, 48)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": "x.png"}

    rows = [{"omni_edit_id": f"id{i}", "task": "attribute_modification", "src_img": png((200, 10 * i, 0)),
             "edited_img": png((0, 10 * i, 200)), "edited_prompt_list": ["make it blue"], "width": 64, "height": 48,
             "sc_score_1": 9, "sc_score_2": 10, "sc_reasoning": "ok", "pq_score": 10, "pq_reasoning": "ok",
             "o_score": 9.5} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows, schema=omniedit_schema(extras=False)), tmp_path / "omniedit.parquet")
    out = tmp_path / "run"
    run_trainer(["--data", str(tmp_path / "omniedit.parquet"), "--out", str(out), "--steps", "3", "--log-every", "1",
                 "--decoder", "pil", "--token-budget", "200"])
    assert len(losses(out)) == 3
    model = load_model(out / "model.safetensors")
    assert model.cfg == get_config("ace-tiny")


def test_editnet_mode_trains_the_control_branch_only(tmp_path):
    """SD3 family, flow objective, bf16 mixed precision (fp32 sharded weights): the base stays bit-equal."""
    torch.manual_seed(0)
    base = build_model("sd3-tiny-editnet")
    trainable = set_trainable(base, "editnet")
    assert trainable and all(n.startswith("editnet.") for n in trainable)
    init = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(init, tmp_path / "init.safetensors")
    corpus = tmp_path / "c"
    write_corpus(corpus, 24, shard_size=24, log=lambda m: None, seed=2, fmt="png")
    out = tmp_path / "run"
    run_trainer(["--data", str(corpus), "--out", str(out), "--preset", "sd3-tiny-editnet", "--mode", "editnet",
                 "--init", str(tmp_path / "init.safetensors"), "--steps", "2", "--lr", "1e-2", "--warmup", "1",
                 "--decoder", "pil", "--token-budget", "400", "--no-activation-checkpointing", "--precision", "bf16"])
    got = load_file(out / "model.safetensors")
    frozen = [k for k in init if not k.startswith("editnet.")]
    assert all(torch.equal(got[k], init[k].float()) for k in frozen)
    assert any(not torch.equal(got[k], init[k]) for k in init if k.startswith("editnet."))


def test_a_nonfinite_loss_stops_the_run_with_the_last_checkpoint_intact(corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(corpus), "--out", str(out), "--steps", "6", "--lr", "1e30", "--warmup", "0",
                        "--grad-clip", "1e30", "--ckpt-every", "1", "--decoder", "pil", "--token-budget", "300"],
                       check=False)
    assert proc.returncode != 0
    assert "FloatingPointError" in proc.stderr and "stopped before updating the weights" in proc.stderr
    last = CheckpointManager(out / "checkpoints").latest()
    assert last is not None and f"Last good checkpoint: {last}" in proc.stderr
    assert not (out / "model.safetensors").exists()


def test_checkpoint_discovery_ignores_a_save_that_crashed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "meta.json").write_text("{}")
    (root / "step_00000008.tmp").mkdir()  # crashed mid-save: never renamed
    (root / "step_00000012").mkdir()  # no meta.json: not complete
    assert CheckpointManager(root).latest() == root / "step_00000004"


def test_learning_rate_schedule_and_config_checks():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=104, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 54) == pytest.approx(0.55)
    assert lr_at(cfg, 104) == pytest.approx(0.1) and lr_at(cfg, 500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="mode 'lora'"):
        TrainConfig(mode="lora")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("prediction", ["eps", "x0", "flow"])
def test_objective_noises_each_sample_at_its_own_level(prediction):
    """x_t and the target follow each sample's own timestep; a perfect prediction has zero loss."""
    x0 = torch.randn(9, 6)
    sample_of = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    obj = Objective(prediction)
    nb = obj.noise(x0, sample_of, 2, torch.Generator().manual_seed(0))
    noise = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))  # the objective's first draw
    for b in range(2):
        rows = sample_of == b
        t = nb.t[b]
        if prediction == "flow":
            s = t / 1000
            torch.testing.assert_close(nb.x_t[rows], (1 - s) * x0[rows] + s * noise[rows])
            torch.testing.assert_close(nb.target[rows], noise[rows] - x0[rows])
        else:
            a, s = obj.alpha[t], obj.sigma[t]
            torch.testing.assert_close(nb.x_t[rows], a * x0[rows] + s * noise[rows])
            torch.testing.assert_close(nb.target[rows], noise[rows] if prediction == "eps" else x0[rows])
    assert obj.per_sample(nb.target, nb.target, sample_of, 2).abs().max() == 0
    with pytest.raises(ValueError, match="unknown prediction type 'v'"):
        Objective("v")


def test_a_checkpoint_whose_index_would_run_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "model_config": {"family": "ace"}}))
    (ckpt / ".metadata").write_bytes(__import__("pickle").dumps({"x": Evil()}))
    with pytest.raises(ValueError, match=r"refusing to load this checkpoint: its .metadata pickle references posix.system"):
        export_checkpoint(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
