"""The torchrun FSDP2 trainer on CPU (gloo): loss falls, kill-and-resume and SIGTERM-and-resume are bit-identical
(metrics, skipped records, weights), a killed launcher takes its workers with it, one run per output folder,
a resume with another configuration is refused, lambda = 0 gives no gradient, a bare OmniEdit file trains,
EditNet mode keeps the base frozen, a non-finite loss stops cleanly with one error line."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from omniace.engine.config import get_config  # noqa: E402
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack  # noqa: E402
from omniace.engine.model import build_model, load_model  # noqa: E402
from omniace.train.checkpoint import CheckpointManager, export_checkpoint  # noqa: E402
from omniace.train.objective import Objective, target_sample_index, weighted_loss  # noqa: E402
from omniace.engine.weights import save_safetensors  # noqa: E402
from omniace.train.omniedit_format import omniedit_schema, write_shard  # noqa: E402
from omniace.train.parallelize import set_trainable  # noqa: E402
from omniace.train.resume_check import ConfigMismatchError, compare, signature  # noqa: E402
from omniace.train.runlock import LOCK_FILE, RunLock, RunLockedError  # noqa: E402
from omniace.train.runlog import TIMING_KEYS  # noqa: E402
from omniace.train.synthetic import write_corpus  # noqa: E402
from omniace.train.trainer import TrainConfig, all_finite, lr_at, main  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the fields of a metrics record that a resumed run must repeat exactly (the others follow the wall clock)
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "loss_per_task", "data")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """160 synthetic pairs in 4 shards; in each, 2 kept rows (o_score >= 9) have an undecodable edited image and
    2 rows a size that is not a multiple of the patch, so runs skip records of both kinds."""
    d = tmp_path_factory.mktemp("train_corpus")
    for shard in write_corpus(d, 160, shard_size=40, log=lambda m: None, seed=11, fmt="png"):
        rows = pq.read_table(shard).to_pylist()
        for row in [r for r in rows if r["o_score"] >= 9][:2]:
            row["edited_img"] = {"bytes": b"not an image", "path": "broken.png"}
        for row in rows[-2:]:
            row["width"] -= 3
        write_shard(rows, shard)
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


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in jsonl(run / "metrics.jsonl")]


def exact_records(run: Path) -> list[dict]:
    records = jsonl(run / "metrics.jsonl")
    assert all(set(r) == {*EXACT_KEYS, *TIMING_KEYS} for r in records)  # no field escapes the comparison
    return [{k: r[k] for k in EXACT_KEYS} for r in records]


def _stat(pid: int) -> list[str] | None:
    try:  # the fields after "(comm)": state, ppid, ...
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes the launcher started (torchrun puts each in a session of its own)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and int(st[1]) == launcher:
            env = (entry / "environ").read_bytes().split(b"\0")
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry.name)
    return found


def assert_all_end(pids, timeout: float = 5.0) -> None:
    """The kernel kills a worker whose launcher died at once; an orphan would train on for many seconds."""
    def alive(pid):
        st = _stat(pid)
        return st is not None and st[0] not in "ZX"  # a zombie has ended, only not been reaped

    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:  # never leave one training in the background
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"worker(s) {survivors} outlived their launcher"


def launch(args: list[str], on_line) -> tuple[subprocess.Popen, str]:
    """A two-rank torchrun in its own session; ``on_line(proc, line)`` sees each output line, True stops reading."""
    proc = subprocess.Popen(trainer_cmd(2) + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line(proc, line):
            break
    return proc, "".join(lines)


def stopped_at(output: str, ranks: str) -> int:
    m = re.search(r"stopped by SIGTERM at step (\d+) \(received by ranks? ([\d, ]+)\): checkpoint (\S+); rerun",
                  output)
    assert m and m[2] == ranks, output[-3000:]
    assert Path(m[3]).name == f"step_{int(m[1]):08d}" and (Path(m[3]) / "meta.json").is_file()
    return int(m[1])


def test_two_ranks_loss_falls_and_killed_or_preempted_runs_resume_bit_identically(corpus, tmp_path):
    """--ckpt-every 3 with --log-every 2: the checkpoints fall inside open log windows."""
    args = ["--data", str(corpus), "--steps", "16", "--lr", "3e-3", "--warmup", "2", "--log-every", "2",
            "--ckpt-every", "3", "--decoder", "pil", "--token-budget", "500"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_trainer(args + ["--out", str(whole)], nproc=2)
    curve = losses(whole)
    assert len(curve) == 8
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.02, curve
    reference = exact_records(whole)
    assert [r["step"] for r in reference] == list(range(2, 17, 2))
    # every skipped record is in skipped.jsonl (not only the first of each kind), and the totals agree
    skipped = jsonl(whole / "skipped.jsonl")
    totals = reference[-1]["data"]
    kinds = {k: sum(r["kind"] == k for r in skipped) for k in ("corrupt_image", "bad_row")}
    assert kinds == {k: totals[k] for k in kinds} and min(kinds.values()) >= 2, (kinds, totals)
    assert all(r["id"] and r["reason"] and r["rank"] in (0, 1) and 1 <= r["step"] <= 16 for r in skipped)
    assert [r["data"]["records"] for r in reference] == sorted(r["data"]["records"] for r in reference)

    # 1. SIGKILL torchrun's process group once the step-3 checkpoint is complete: its workers, in sessions of
    # their own, must die with it (or they would go on writing into the folder a resumed run uses)
    pids = []

    def kill_at_3(proc, line):
        if "checkpoint:" in line and "step_00000003" in line:
            pids.extend(workers(proc.pid).values())
            os.killpg(proc.pid, signal.SIGKILL)
            return True

    proc, _ = launch(args + ["--out", str(killed)], kill_at_3)
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert len(pids) == 2
    assert_all_end(pids)
    assert not (killed / "model.safetensors").exists(), "the killed run's workers went on and finished it"

    # 2. resume; a scheduler's SIGTERM reaches rank 1 only: both ranks checkpoint at the next step and exit 0
    def term_rank1(proc, line):
        if line.startswith("step 6 |"):
            os.kill(workers(proc.pid)[1], signal.SIGTERM)

    proc, out = launch(args + ["--out", str(killed)], term_rank1)
    assert proc.wait(timeout=120) == 0, out[-3000:]
    assert "resumed from" in out and "lock: took over" in out  # the killed run's lock was stale
    first = stopped_at(out, "1")
    assert 6 < first < 16 and not (killed / "model.safetensors").exists()

    # 3. resume; SIGTERM to torchrun, which forwards it to every worker
    pids = []

    def term_launcher(proc, line):
        if line.startswith(f"step {first - first % 2 + 4} |"):  # the second log line after the resume
            pids.extend(workers(proc.pid).values())
            proc.send_signal(signal.SIGTERM)

    proc, out = launch(args + ["--out", str(killed)], term_launcher)
    proc.wait(timeout=120)
    second = stopped_at(out, "0, 1")
    assert first < second < 16
    assert_all_end(pids)

    # 4. resume to the end: the same records (bit for bit), the same skipped records, the same bytes
    resumed = run_trainer(args + ["--out", str(killed)], nproc=2)
    assert f"resumed from {killed / 'checkpoints' / f'step_{second:08d}'}" in resumed.stdout
    assert exact_records(killed) == reference
    assert (killed / "skipped.jsonl").read_text() == (whole / "skipped.jsonl").read_text()
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    a = load_file(whole / "model.safetensors")
    # the single-process export of a checkpoint's EMA weights is the trainer's own final export
    c = load_file(export_checkpoint(CheckpointManager(whole / "checkpoints").latest(), tmp_path / "ema.safetensors"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)

    # 5. a resume with another seed and lr is refused before any work, with one message for both ranks
    bad = run_trainer(args + ["--out", str(killed), "--steps", "20", "--seed", "5", "--lr", "1e-3"], nproc=2,
                      check=False)
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0 and text.count("omniace-train: error") == 1, text[-3000:]
    assert "lr: checkpoint 0.003, this run 0.001" in text and "seed: checkpoint 0, this run 5" in text
    assert "--allow-config-change lr,seed" in text and not (killed / "checkpoints" / "step_00000017").exists()


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
             "o_score": 9.5} for i in range(9)]
    for row in rows[6:8]:  # undecodable edited images
        row["edited_img"] = {"bytes": b"\x89PNG garbage", "path": "x.png"}
    rows[8]["width"] = 60  # not a multiple of the 8-pixel patch
    pq.write_table(pa.Table.from_pylist(rows, schema=omniedit_schema(extras=False)), tmp_path / "omniedit.parquet")
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(tmp_path / "omniedit.parquet"), "--out", str(out), "--steps", "3",
                        "--log-every", "1", "--decoder", "pil", "--token-budget", "200", "--warmup", "5"])
    assert len(losses(out)) == 3
    model = load_model(out / "model.safetensors")
    assert model.cfg == get_config("ace-tiny")
    assert "warning: --warmup 5 is longer than --steps 3" in proc.stdout and "decoder pil" in proc.stdout
    assert re.search(r"step 3 \| .* \| [\d.]+ s/step \| ETA 0:00:00 \|", proc.stdout)
    # every skipped record is logged with its id and reason; the totals in metrics.jsonl count the same
    skipped = jsonl(out / "skipped.jsonl")
    assert {(r["id"], r["kind"]) for r in skipped} == {("id6", "corrupt_image"), ("id7", "corrupt_image"),
                                                      ("id8", "bad_row")}
    assert any("60x48" in r["reason"] for r in skipped if r["id"] == "id8")
    data = jsonl(out / "metrics.jsonl")[-1]["data"]
    assert data["corrupt_image"] + data["bad_row"] == len(skipped) and data["bad_row"] >= 1


def test_editnet_mode_trains_the_control_branch_only(tmp_path):
    """SD3 family, flow objective, bf16 mixed precision (fp32 sharded weights): the base stays bit-equal, and
    FSDP2 finds no view among the outputs it hooks for the backward (the gathered ``input_modulation``)."""
    torch.manual_seed(0)
    base = build_model("sd3-tiny-editnet")
    trainable = set_trainable(base, "editnet")
    assert trainable and all(n.startswith("editnet.") for n in trainable)
    init = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(init, tmp_path / "init.safetensors")
    corpus = tmp_path / "c"
    write_corpus(corpus, 24, shard_size=24, log=lambda m: None, seed=2, fmt="png")
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(corpus), "--out", str(out), "--preset", "sd3-tiny-editnet", "--mode", "editnet",
                        "--init", str(tmp_path / "init.safetensors"), "--steps", "2", "--lr", "1e-2", "--warmup", "1",
                        "--decoder", "pil", "--token-budget", "400", "--no-activation-checkpointing", "--precision",
                        "bf16"])
    got = load_file(out / "model.safetensors")
    frozen = [k for k in init if not k.startswith("editnet.")]
    assert all(torch.equal(got[k], init[k].float()) for k in frozen)
    assert any(not torch.equal(got[k], init[k]) for k in init if k.startswith("editnet."))
    # the whole model trained (base modulations take gradients): no FSDP view warning
    for p in (proc, run_trainer(["--data", str(corpus), "--out", str(tmp_path / "full"), "--preset", "sd3-tiny-editnet",
                                 "--steps", "1", "--decoder", "pil", "--token-budget", "400"])):
        assert "returned a view tensor" not in p.stderr, p.stderr[-2000:]


def test_a_nonfinite_loss_stops_the_run_with_the_last_checkpoint_intact(corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(corpus), "--out", str(out), "--steps", "6", "--lr", "1e30", "--warmup", "0",
                        "--grad-clip", "1e30", "--ckpt-every", "1", "--decoder", "pil", "--token-budget", "300"],
                       check=False)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("omniace-train")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # one readable line
    assert re.match(r"omniace-train: error: FloatingPointError: step \d+: the (loss|gradient norm) is not finite "
                    r"\(rank 0: (nan|-?inf) \(samples \['", errors[0]), errors[0]
    assert "stopped before updating the weights" in errors[0]
    last = CheckpointManager(out / "checkpoints").latest()
    assert last is not None and f"Last good checkpoint: {last}" in errors[0]
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
    (warning,) = TrainConfig(warmup=200, steps=100).warnings()
    assert "--warmup 200 is longer than --steps 100" in warning and "ends at 50% of it" in warning
    assert TrainConfig(warmup=100, steps=100).warnings() == []  # reaches --lr at the last step
    with pytest.raises(ValueError, match=r"allow_config_change \['sed'\]: expected names among \[.*'seed'"):
        TrainConfig(allow_config_change=["sed"])
    with pytest.raises(ValueError, match=r"allow_config_change \['preset'\]"):
        TrainConfig(allow_config_change=["seed", "preset"])


def test_help_documents_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens too ("ace-\ntiny")
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's wrapping
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        help = " ".join(f.metadata["help"].split())
        if f.name == "data":
            assert help in text and "(required)" in help
        else:
            default = f.default_factory() if f.default is MISSING else f.default
            assert f"{help} (default: {default})" in text, f.name
    assert "--debug on an error, show the full traceback" in text


def test_equal_weights_give_byte_identical_safetensors(tmp_path):
    """safetensors writes its metadata from a hash map (another order per call); the writer sorts it."""
    sd = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    meta = {**{f"key{i}": f"value {i}" for i in range(8)}, "omniace_config": json.dumps({"é": '"q"\n'})}
    for name in ("x", "y", "z"):
        save_safetensors(sd, tmp_path / f"{name}.safetensors", metadata=meta)
    x = (tmp_path / "x.safetensors").read_bytes()
    assert (tmp_path / "y.safetensors").read_bytes() == x == (tmp_path / "z.safetensors").read_bytes()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == meta
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


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


def _noise_level_fraction(nb, u: torch.Tensor, prediction: str) -> torch.Tensor:
    """Checks the drawn timesteps against the expected fractions ``u`` (flow sigma = u, DDPM t = floor(1000 u));
    returns each draw's fraction of the schedule (a DDPM step at its centre)."""
    if prediction == "flow":
        torch.testing.assert_close(nb.t, u * 1000)
        return u
    assert torch.equal(nb.t, (u * 1000).long())
    return (nb.t.float() + 0.5) / 1000


def _logit_normal_mass(normal, lo: float, hi: float) -> float:
    return float(normal.cdf(torch.logit(torch.tensor(hi)).clamp(max=50)) - normal.cdf(torch.logit(torch.tensor(lo))))


@pytest.mark.parametrize("prediction", ["x0", "flow"])
def test_logit_normal_timesteps_follow_sd3s_density(prediction):
    """``logit_normal`` draws u = sigmoid(z std + mean): DDPM t = floor(1000 u), flow sigma = u. Checked draw by
    draw against the formula, and as a distribution against the normal CDF (20,000 draws: the standard error of
    a fraction is <= 0.0035, the tolerance 0.015)."""
    n, mean, std = 20_000, -1.1, 0.8
    obj = Objective(prediction, "logit_normal", mean, std)
    x0, sample_of = torch.zeros(n, 2), torch.arange(n)
    nb = obj.noise(x0, sample_of, n, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    torch.randn(n, 2, generator=gen)  # the noise comes first
    frac = _noise_level_fraction(nb, torch.sigmoid(torch.randn(n, generator=gen) * std + mean), prediction)
    normal = torch.distributions.Normal(mean, std)
    for lo, hi in ((0.1, 0.4), (0.0, 0.1), (0.4, 1.0)):
        want = _logit_normal_mass(normal, lo, hi)
        got = float(((frac >= lo) & (frac < hi)).float().mean())
        assert abs(got - want) < 0.015, (lo, hi, got, want)
    # uniform spreads DDPM t evenly; flow's uniform sigma too
    for pred in ("eps", "flow"):
        t = Objective(pred, "uniform").noise(x0, sample_of, n, torch.Generator().manual_seed(6)).t.float()
        t = t if pred == "flow" else t + 0.5
        assert abs(float(((t >= 100) & (t < 400)).float().mean()) - 0.3) < 0.015
        assert 0 <= float(t.min()) and float(t.max()) < 1000


@pytest.mark.parametrize("prediction", ["x0", "flow"])
def test_a_uniform_mix_replaces_that_fraction_of_logit_normal_draws(prediction):
    """``uniform_mix`` m: each sample's u is uniform with probability m, else logit-normal. Checked draw by draw
    against the formula, and as a distribution (20,000 draws, tolerance 0.015 on a fraction whose standard
    error is <= 0.0035): the pure-noise end t >= 900 holds m/10 + (1 - m) P_LN of the draws."""
    n, mean, std, mix = 20_000, -1.1, 1.0, 0.4
    x0, sample_of = torch.zeros(n, 2), torch.arange(n)
    nb = Objective(prediction, "logit_normal", mean, std, mix).noise(x0, sample_of, n, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    torch.randn(n, 2, generator=gen)  # the noise comes first
    ln = torch.sigmoid(torch.randn(n, generator=gen) * std + mean)
    flat = torch.rand(n, generator=gen)
    frac = _noise_level_fraction(nb, torch.where(torch.rand(n, generator=gen) < mix, flat, ln), prediction)
    normal = torch.distributions.Normal(mean, std)
    for lo, hi in ((0.9, 1.0), (0.1, 0.4), (0.0, 0.1)):
        want = mix * (hi - lo) + (1 - mix) * _logit_normal_mass(normal, lo, hi)
        got = float(((frac >= lo) & (frac < hi)).float().mean())
        assert abs(got - want) < 0.015, (lo, hi, got, want)
    # mix 0 is the plain logit-normal draw, with no extra random numbers taken
    plain = Objective(prediction, "logit_normal", mean, std).noise(x0, sample_of, n, torch.Generator().manual_seed(3))
    zero = Objective(prediction, "logit_normal", mean, std, 0.0).noise(x0, sample_of, n, torch.Generator().manual_seed(3))
    assert torch.equal(plain.t, zero.t) and torch.equal(plain.x_t, zero.x_t)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="uniform_mix .* must be a fraction in \\[0, 1\\]"):
            Objective(prediction, "logit_normal", mean, std, bad)


def test_the_default_timestep_draws_are_unchanged():
    """``auto`` keeps each family's draw bit for bit (runs resume across versions): uniform DDPM t, SD3 flow."""
    x0, sample_of = torch.randn(7, 3), torch.tensor([0, 0, 1, 2, 2, 2, 3])
    ddpm = Objective("eps").noise(x0, sample_of, 4, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    torch.randn(7, 3, generator=gen)
    assert torch.equal(ddpm.t, torch.randint(0, 1000, (4,), generator=gen))
    flow = Objective("flow").noise(x0, sample_of, 4, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    torch.randn(7, 3, generator=gen)
    assert torch.equal(flow.t, torch.sigmoid(torch.randn(4, generator=gen)) * 1000)


@pytest.mark.parametrize("kwargs, message", [
    ({"timestep_sampling": "lognormal"}, "unknown timestep_sampling 'lognormal'"),
    ({"timestep_sampling": "logit_normal", "logit_std": 0.0}, "logit_std 0.0 finite and > 0"),
    ({"timestep_sampling": "logit_normal", "logit_mean": float("nan")}, "logit_mean nan must be finite")])
def test_bad_timestep_sampling_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Objective("x0", **kwargs)


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


def test_one_run_per_output_folder(tmp_path):
    """A second run on a held folder stops at once, before it writes anything, naming the holder in one line."""
    out = tmp_path / "run"
    with RunLock(out):
        holder = rf"host {re.escape(socket.gethostname())}, pid {os.getpid()}, since \d{{4}}-"
        with pytest.raises(RunLockedError, match=rf"{re.escape(str(out))} is in use by another training run "
                                                 rf"\({holder}"):
            RunLock(out).acquire()
        (tmp_path / "empty").mkdir()  # data that exists (a missing path is refused first) but is never read:
        args = ["--data", str(tmp_path / "empty"), "--out", str(out)]  # the lock is checked before the data
        proc = run_trainer(args, check=False)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("omniace-train")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert re.match(rf"omniace-train: error: RunLockedError: .*\({holder}", errors[0]), errors[0]
        assert os.listdir(out) == [LOCK_FILE]
        debug = run_trainer(args + ["--debug"], check=False)
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "RunLockedError" in debug.stderr
    assert (out / LOCK_FILE).read_text() == ""  # released: nobody holds it
    with RunLock(out) as lock:
        assert lock.previous is None


def test_a_dead_or_silent_holder_does_not_block(tmp_path):
    code = ("import sys, time; from omniace.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}, since .*it holds the lock"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path) as lock:  # its record stays behind; the kernel released its lock: stale
        assert lock.previous is not None and lock.previous.pid == holder.pid
    # a record from another host (where flock may not reach across hosts): a live holder keeps beating
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "node-7", "pid": 4242, "since": "2026-01-01T00:00:00+00:00"}))
    os.utime(path, (time.time() - 1, time.time() - 1))
    beats = threading.Timer(0.3, os.utime, (path,))
    beats.start()
    waited = []
    with pytest.raises(RunLockedError, match=r"host node-7, pid 4242, since 2026-01-01T00:00:00\+00:00; its "
                                             r"heartbeat goes on"):
        RunLock(tmp_path, stale_after_s=30, log=waited.append).acquire()
    beats.join()
    assert waited and "waiting up to" in waited[0]
    # ... a dead one goes silent: its record is taken over once stale (a requeued run waits, then starts)
    start = time.monotonic()
    with RunLock(tmp_path, heartbeat_s=0.05, stale_after_s=0.5) as lock:
        assert lock.previous.host == "node-7" and time.monotonic() - start < 5
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 0.3  # this run's heartbeat


def test_resume_config_check_names_each_difference():
    cfg = asdict(TrainConfig(data=["corpus"]))
    model = {"family": "ace", "depth": 2, "prediction": "eps"}
    recorded = signature(cfg, 2, model)
    # legitimately changed on resume: the schedule's length, the intervals
    assert compare(recorded, signature({**cfg, "steps": 99, "log_every": 1, "keep": 5}, 2, model), [], "c") == []
    # a relative and an absolute spelling of the same folder agree
    assert compare(recorded, signature({**cfg, "data": [str(Path("corpus").resolve())]}, 2, model), [], "c") == []
    other = signature({**cfg, "data": ["other"], "seed": 3, "drop_prompt": 0.0}, 2, model)
    with pytest.raises(ConfigMismatchError) as err:
        compare(recorded, other, ["drop_prompt"], "ckpt/step_00000004")
    msg = str(err.value)
    assert msg.startswith("ckpt/step_00000004 was written by a run with another configuration: ")
    assert (f"data: checkpoint ['{Path('corpus').resolve()}'], this run ['{Path('other').resolve()}']; "
            f"seed: checkpoint 0, this run 3.") in msg
    assert "drop_prompt" not in msg and "--allow-config-change data,seed to resume anyway" in msg
    assert compare(recorded, other, ["data", "seed", "drop_prompt"], "c") == ["data", "drop_prompt", "seed"]
    # the preset, the model's shapes and the world size cannot be allowed
    with pytest.raises(ConfigMismatchError) as err:
        compare(recorded, signature({**cfg, "preset": "ace-small"}, 4, {**model, "depth": 6}), ["seed"], "c")
    msg = str(err.value)
    assert "preset: checkpoint 'ace-tiny', this run 'ace-small' (cannot change on resume" in msg
    assert "world_size: checkpoint 2, this run 4" in msg and "--nproc_per_node 2" in msg
    assert "model_config" not in msg and "--allow-config-change" not in msg  # implied by the preset
    with pytest.raises(ConfigMismatchError, match=r"model_config.depth: checkpoint 2, this run 6 \(cannot change"):
        compare(recorded, signature(cfg, 2, {**model, "depth": 6}), [], "c")  # the preset's definition changed


def test_a_resume_with_other_data_and_preset_is_refused_unless_allowed(corpus, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    other.mkdir()
    (other / "part.parquet").write_bytes((corpus / "part-00002.parquet").read_bytes())
    common = ["--out", str(out), "--steps", "4", "--log-every", "1", "--ckpt-every", "2", "--decoder", "pil",
              "--token-budget", "300"]
    run_trainer(["--data", str(corpus), "--stop-at", "2"] + common)
    # a checkpoint from before a field existed (here uniform_mix) resumes: the field counts as its default
    meta_path = out / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["uniform_mix"]
    meta_path.write_text(json.dumps(meta))
    bad = run_trainer(["--data", str(other), "--preset", "sd3-tiny-editnet"] + common, check=False)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("omniace-train")]
    assert bad.returncode == 1 and len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert f"data: checkpoint ['{corpus.resolve()}'], this run ['{other.resolve()}']" in errors[0]
    assert "preset: checkpoint 'ace-tiny', this run 'sd3-tiny-editnet' (cannot change on resume" in errors[0]
    # allowed, other data starts from its beginning (positions in the old shards mean nothing there)
    ok = run_trainer(["--data", str(other), "--allow-config-change", "data"] + common)
    assert "the new data starts at its beginning" in ok.stdout and "allowed changes: data" in ok.stdout
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4] and (out / "model.safetensors").exists()


# from a fresh user's run ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--ema-decay", "1.5"], "ema_decay must be a finite number in [0, 1], got 1.5"),
    (["--grad-clip", "0"], "grad_clip must be a finite number > 0, got 0.0"),
    (["--token-budget", "0"], "token_budget (0) and keep (2) must be >= 1"),
    (["--stop-at", "0"], "stop_at must be >= 1, got 0"),
    (["--decoder", "bogus"], "decoder 'bogus'; expected auto, dali or pil"),
    (["--timestep-sampling", "lognormal"], "timestep_sampling 'lognormal'; expected one of ('auto', 'uniform'"),
    (["--logit-std", "0"], "logit_std must be a finite number > 0, got 0.0"),
    (["--uniform-mix", "1.5"], "uniform_mix must be a finite number in [0, 1], got 1.5"),
    (["--logit-mean", "-inf"], "logit_mean must be a finite number, got -inf"),  # read as a value, not a flag
    (["--logit-mean", "-1e-1x"], "argument --logit-mean: invalid float value: '-1e-1x'"),
    (["--logit-mean", "--lr", "1"], "argument --logit-mean: expected one argument"),
    (["--model-override", "pixel_conv=x"], "model override 'pixel_conv=x': 'x' is not an integer"),
    (["--model-override", "family=sd3"], "model override 'family=sd3': the family cannot be changed"),
    (["--model-override", "num_heads=0"], "num_heads must be an integer >= 1, got 0"),
    (["--model-override", "mlp_ratio=nan"], "mlp_ratio must be a finite number > 0, got nan"),
    (["--model-override", "codec_factor=8"], "is a latent-space model (codec factor 8, 48 channels)"),
    (["--logit-std", "abc"], "argument --logit-std: invalid float value: 'abc' (--help lists the flags)"),
    (["--model-override", "depth=3,depth=4"], "depth is already set to 3"),
    (["--preset", "ace-edit", "--model-override", "pixel_conv=-1"], "pixel_conv must be an integer >= 0"),
    (["--importance-threshold", "11"], "importance_threshold 11.0 is outside the 0-10 score scale"),
    (["--preset", "ace-0.6b-512"], "is a latent-space model"),
    (["--mode", "editnet"], "--mode editnet needs a preset with an EditNet branch"),
    (["--init", "no-such.safetensors"], "--init 'no-such.safetensors' does not exist or is not a file"),
])
def test_bad_flags_stop_before_anything_is_written(flags, message, tmp_path):
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(tmp_path), "--out", str(out)] + flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_missing_data_stops_before_the_run_folder_is_made(tmp_path):
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(tmp_path / "no-such-data"), "--out", str(out)], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--data '{tmp_path / 'no-such-data'}' does not exist (expected Parquet files" in proc.stderr
    assert not out.exists()


def test_a_bad_flag_under_two_ranks_is_printed_once():
    """Every rank refuses the same flag; torchrun stops the others when the first leaves, so ranks other than 0
    wait for rank 0 to print the line (a fresh user once saw no line at all)."""
    proc = run_trainer(["--data", "x", "--model-override", "self_condition=maybe"], nproc=2, check=False)
    assert proc.returncode != 0 and proc.stderr.count("omniace-train: error") == 1, proc.stderr[-3000:]
    assert "'maybe' is not true or false (the type of self_condition" in proc.stderr


def test_a_model_override_trains_records_and_exports_the_changed_model(corpus, tmp_path):
    """--model-override changes preset fields; the checkpoint's recorded config and the export carry them, so the
    weights load as trained, and a resume that drops the override is refused naming the changed field."""
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(out), "--preset", "ace-edit", "--steps", "2", "--decoder", "pil",
            "--token-budget", "300", "--no-activation-checkpointing"]
    # with self-conditioning: step 1 (seed 0's draws: 0 no, 1 yes, 2 yes) runs the estimate's extra forward, as
    # does step 2 of the resume below
    run_trainer(args + ["--model-override", "pixel_conv=3, depth=2,pixel_sigma_data=0.25,qk_norm=false,"
                                            "self_condition=true"])
    model = load_model(out / "model.safetensors")
    assert model.cfg == get_config("ace-edit", pixel_conv=3, depth=2, pixel_sigma_data=0.25, qk_norm=False,
                                   self_condition=True)
    assert model.pixel_head.conv2d.out_channels == 3 and len(model.blocks) == 2
    proc = run_trainer(args + ["--steps", "3"], check=False)
    assert proc.returncode == 1 and "model_config.pixel_conv: checkpoint 3, this run 0 (cannot change" in proc.stderr
    assert "allow-config-change" not in proc.stderr, proc.stderr  # no flag can allow it
    # the same model spelled otherwise resumes
    run_trainer(args + ["--steps", "3", "--model-override", "qk_norm=0,pixel_sigma_data=.25,depth=2,pixel_conv=3,"
                                                            "self_condition=True"])
    assert load_model(out / "model.safetensors").cfg == model.cfg


def test_init_from_a_base_without_self_condition_starts_at_the_base(corpus, tmp_path):
    """--init from a model without the inputs an override adds (source_concat, self_condition): they start at
    zero. One step at a negligible learning rate exports the base's weights with zeros in the new places."""
    torch.manual_seed(0)
    base = build_model(get_config("ace-edit", depth=1))
    base_sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(base_sd, tmp_path / "base.safetensors")
    out = tmp_path / "run"
    proc = run_trainer(["--data", str(corpus), "--out", str(out), "--preset", "ace-edit", "--steps", "1", "--lr",
                        "1e-12", "--warmup", "0", "--decoder", "pil", "--token-budget", "300",
                        "--no-activation-checkpointing", "--init", str(tmp_path / "base.safetensors"),
                        "--model-override", "depth=1,source_concat=true,self_condition=true"])
    assert (f"init: weights from {tmp_path / 'base.safetensors'}; the inputs it lacks (source_concat, "
            f"self_condition) start at zero: pixel_head.fc1.weight's new columns, source_embedder.weight, "
            f"self_cond_embedder.weight") in proc.stdout, proc.stdout
    got = load_file(out / "model.safetensors")
    assert set(got) == set(base_sd) | {"source_embedder.weight", "self_cond_embedder.weight"}
    fc1 = got.pop("pixel_head.fc1.weight")
    base_fc1 = base_sd["pixel_head.fc1.weight"]
    assert fc1[:, -9:-6].abs().max() < 1e-6  # the estimate's columns, before source and noisy RGB
    assert (torch.cat([fc1[:, :-9], fc1[:, -6:]], 1) - base_fc1).abs().max() < 1e-6
    for k, v in got.items():
        assert (v - base_sd.get(k, torch.zeros_like(v))).abs().max() < 1e-6, k
    # that export back into a run without the new inputs: refused, naming the fields to match
    proc = run_trainer(["--data", str(corpus), "--out", str(tmp_path / "back"), "--preset", "ace-edit", "--steps", "1",
                        "--decoder", "pil", "--init", str(out / "model.safetensors"), "--model-override", "depth=1"],
                       check=False)
    assert proc.returncode == 1 and "2 unexpected: ['self_cond_embedder.weight', 'source_embedder.weight']" \
        in proc.stderr, proc.stderr[-3000:]
    assert "records a model with source_concat True (this run: False), self_condition True (this run: False):" \
        in proc.stderr


def test_repeated_list_flags_add_up_and_ignored_logit_flags_warn(tmp_path):
    from omniace.train.trainer import build_parser

    ns = build_parser().parse_args(["--data", str(tmp_path), "--model-override", "pixel_conv=4",
                                    "--model-override", "depth=2,text_len=32", "--task-weight", "object_swap=8",
                                    "--task-weight", "inpainting=4", "--allow-config-change", "lr",
                                    "--allow-config-change", "seed"])
    assert ns.model_override == ["pixel_conv=4", "depth=2", "text_len=32"]
    assert ns.task_weight == ["object_swap=8", "inpainting=4"] and ns.allow_config_change == ["lr", "seed"]
    assert build_parser().parse_args(["--data", "x"]).model_override == []  # the default is not mutated
    # a negative float in exponent form is a flag's value (plain argparse reads "-1e-1" as an unknown flag)
    ns = build_parser().parse_args(["--data", "x", "--logit-mean", "-1e-1", "--uniform-mix", "0.5"])
    assert (ns.logit_mean, ns.uniform_mix) == (-0.1, 0.5)
    warn = "no effect: this run draws timesteps uniformly"
    assert any(warn in w for w in TrainConfig(data=[str(tmp_path)], logit_std=3.0).warnings())
    # only the flags given are named
    assert any(w.startswith("--uniform-mix 0.5 has no effect")
               for w in TrainConfig(data=[str(tmp_path)], uniform_mix=0.5).warnings())
    assert any(warn in w for w in TrainConfig(data=[str(tmp_path)], timestep_sampling="uniform",
                                             logit_mean=-1.0).warnings())
    for quiet in (TrainConfig(data=[str(tmp_path)], timestep_sampling="logit_normal", logit_mean=-1.0),
                  TrainConfig(data=[str(tmp_path)], preset="sd3-tiny-editnet", logit_std=2.0),  # flow: logit-normal
                  TrainConfig(data=[str(tmp_path)])):
        assert not any(warn in w for w in quiet.warnings())


def test_model_overrides_parse_as_their_fields_types():
    from omniace.engine.config import parse_overrides

    assert parse_overrides("ace-edit", ["pixel_conv=16", " pixel_sigma_data = 0.5", "qk_norm=0", "text_encoder=bytes",
                                        "mlp_ratio=2"]) == \
        {"pixel_conv": 16, "pixel_sigma_data": 0.5, "qk_norm": False, "text_encoder": "bytes", "mlp_ratio": 2.0}
    for entry, message in (("pixel_conv", "expected FIELD=VALUE"), ("=3", "expected FIELD=VALUE"),
                           ("bogus=1", "has no field 'bogus'"), ("qk_norm=yes", "'yes' is not true or false"),
                           ("depth=2.5", "'2.5' is not an integer"), ("rope_axes=1", "cannot be set from the command line")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_overrides("ace-edit", [entry])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        parse_overrides("nope", [])


def test_a_pass_without_a_usable_record_stops_naming_what_was_skipped(corpus, tmp_path):
    out = tmp_path / "none"
    proc = run_trainer(["--data", str(corpus), "--out", str(out), "--steps", "3", "--decoder", "pil",
                        "--token-budget", "1"], check=False)  # every pair is over the budget
    assert proc.returncode == 1 and "a whole pass over the data" in proc.stderr and "over_budget" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_fresh_start_drops_the_logs_of_a_run_killed_before_its_first_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")  # a killed run's record
    (out / "skipped.jsonl").write_text(json.dumps({"step": 5, "id": "x"}) + "\n")
    run_trainer(["--data", str(corpus), "--out", str(out), "--steps", "2", "--log-every", "1", "--decoder", "pil",
                 "--token-budget", "300"])
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [1, 2]
    assert all(r["id"] != "x" for r in jsonl(out / "skipped.jsonl"))


@pytest.mark.parametrize("stderr_too", [False, True])
def test_a_run_outlives_the_reader_of_its_stdout(corpus, tmp_path, stderr_too):
    """``omniace-train ... | head -1``: once the pipe's reader exits, the next print met BrokenPipeError and the
    run died; now it trains to the end, with every record in metrics.jsonl and one line on stderr. With
    ``2>&1 | head -1`` that line itself met the closed pipe (fresh-user finding): it goes to /dev/null too."""
    out = tmp_path / "run"
    proc = subprocess.Popen(trainer_cmd(1) + ["--data", str(corpus), "--out", str(out), "--steps", "4",
                                              "--log-every", "1", "--decoder", "pil", "--token-budget", "300",
                                              "--warmup", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
                            text=True, env=ENV)
    first = proc.stdout.readline()
    while stderr_too and not first.startswith("training"):  # warnings on stderr come first
        first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes, as `head -1` would
    stderr = proc.communicate(timeout=600)[1] or ""
    assert first.startswith("training ace-tiny") and proc.returncode == 0, stderr[-2000:]
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4] and (out / "model.safetensors").exists()
    assert stderr.count("stdout was closed by its reader; training goes on") == (0 if stderr_too else 1)


def test_all_finite_matches_an_element_wise_check_and_skips_empty_shards():
    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        tensors = [torch.randn(int(n), generator=g) for n in torch.randint(0, 7, (5,), generator=g)]
        if trial % 3 == 1:
            t = next(t for t in tensors if t.numel()) if any(t.numel() for t in tensors) else None
            if t is not None:
                t[torch.randint(0, t.numel(), (1,), generator=g)] = [float("nan"), float("inf"), -float("inf")][(trial // 3) % 3]
        reference = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert all_finite(tensors) == reference
    assert all_finite([]) and all_finite([torch.empty(0)])  # an empty shard has no inf-norm: skipped, not a crash
    assert not all_finite([torch.empty(0), torch.tensor([1.0, float("nan")])])
    assert all_finite([torch.tensor([3e38, -3e38])])  # huge but finite: no overflow in a max-abs norm


def test_self_conditioning_steps_and_the_prediction_the_loss_takes():
    """Half the steps, drawn from (seed, step) alone (every rank and a resumed run draw the same); on those the
    loss reads the model fed its own first estimate, and no gradient flows through that estimate."""
    from omniace.train.objective import predict, self_condition_step

    picks = [self_condition_step(0, s) for s in range(2000)]
    assert picks == [self_condition_step(0, s) for s in range(2000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks != [self_condition_step(1, s) for s in range(2000)]
    torch.manual_seed(0)
    model = build_model(get_config("ace-tiny", prediction="x0", self_condition=True))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch, _ = _batch(4)
    x = torch.randn(batch.target_index.numel(), batch.target_tokens().shape[1])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        first = model(batch, x, t)
        assert torch.equal(predict(model, batch, x, t, False), first)
        assert torch.equal(predict(model, batch, x, t, True), model(batch, x, t, x0_prev=first))
    grads = []
    for run in (lambda: predict(model, batch, x, t, True), lambda: model(batch, x, t, x0_prev=first)):
        model.zero_grad()
        run().pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])  # as with a constant estimate: none through the first forward


def test_a_checkpoint_written_before_a_model_field_existed_resumes():
    """A model config recorded before a field was added (no ``self_condition``) compares equal to today's at
    the field's default, which computes what that version did; a real difference and an unknown field still show."""
    from omniace.engine.config import config_to_dict, recorded_config
    from omniace.train.resume_check import compare, signature

    now = config_to_dict(get_config("ace-edit"))
    older = {k: v for k, v in now.items() if k != "self_condition"}
    assert recorded_config(older) == now
    assert compare(signature({}, 2, recorded_config(older)), signature({}, 2, now), [], "ckpt") == []
    assert recorded_config({**older, "depth": 3})["depth"] == 3
    future = {**now, "a_field_from_a_later_version": 1}
    assert recorded_config(future) == future  # not a config this version can build: compared as recorded
    # the same comparison, field by field, as --init's and the ONNX folder check's messages give it
    from omniace.engine.config import config_differences

    cfg = get_config("ace-edit")
    assert config_differences(older, cfg) == []
    assert config_differences({**older, "depth": 3}, cfg, "this run") == ["depth 3 (this run: 4)"]
    assert config_differences(future, cfg) == ["a_field_from_a_later_version 1 (this model: absent)"]
    no_depth = {k: v for k, v in future.items() if k != "depth"}  # not buildable: read as recorded
    assert config_differences(no_depth, cfg)[0] == "depth absent (this model: 4)"
