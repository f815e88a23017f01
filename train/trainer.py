"""The torchrun trainer: FSDP2, importance-weighted diffusion loss, EMA, atomic DCP checkpoints, exact resume.

Launch (any ``--nproc_per_node``; plain ``python -m`` runs one process)::

    torchrun --nproc_per_node 2 -m omniace.train.trainer --data corpus/ --out runs/tiny --steps 2000

Every rank builds the same model from the seed, shards it (``fully_shard`` per block, bf16 parameters
with fp32 gradient reduction on a GPU, fp32 on the CPU), reads its own disjoint records, and takes the
loss on its target tokens only, weighted per sample by lambda. The noise of step s on rank r comes from
a generator seeded by (seed, s, r), and the data position is saved with every checkpoint, so a resumed
run reproduces the loss curve of an uninterrupted one bit for bit. A non-finite loss or gradient stops
the run before the weights change, with the last good checkpoint intact.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from omniace.engine.config import ACEConfig, config_to_dict, get_config
from omniace.engine.model import build_model, forward_flops, save_weights
from omniace.engine.pipeline import tiny_text_encoder
from omniace.engine.text import indicator_table
from omniace.engine.weights import load_into, load_state_dict_file

from .checkpoint import EXPORT_DTYPES, CheckpointManager
from .data import DataConfig, EditLoader
from .importance import ImportanceConfig
from .objective import Objective, target_sample_index, weighted_loss
from .parallelize import TRAIN_MODES, apply_fsdp, enable_activation_checkpointing, set_trainable


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # OmniEdit Parquet files or folders
    out: str = "runs/train"  # checkpoints/, metrics.jsonl, model.safetensors
    preset: str = "ace-tiny"
    init: str | None = None  # safetensors to start from (the base model for --mode editnet)
    mode: str = "full"  # full | editnet (only the control branch trains, the base is frozen)
    steps: int = 1000  # length of the schedule
    stop_at: int | None = None  # end this run (with a checkpoint) at this step: time-limited jobs
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    token_budget: int = 2048  # image tokens per rank per step
    importance: str = "binary"  # binary | soft | none
    importance_column: str = "o_score"
    importance_threshold: float = 9.0
    drop_prompt: float = 0.1
    decoder: str = "auto"
    seed: int = 0
    precision: str = "auto"  # auto (bf16 params on a GPU, fp32 on the CPU) | bf16 | fp32
    activation_checkpointing: bool = True
    ckpt_every: int = 200
    keep: int = 2
    log_every: int = 10
    export_dtype: str = "fp32"  # the final safetensors: fp32 | fp16 | bf16 (fp16 halves a shipped default)

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode {self.mode!r}; expected one of {TRAIN_MODES}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype {self.export_dtype!r}; expected one of {sorted(EXPORT_DTYPES)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r}; expected auto, bf16 or fp32")
        for name in ("steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup {self.warmup} must be >= 0 and min_lr_ratio {self.min_lr_ratio} in [0, 1]")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` updates, then cosine to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# dense bf16 tensor-core peaks (TFLOP/s) for MFU; an unknown GPU reports no MFU rather than a guess
_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _init_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python -m`: a one-process group, so one code path serves all
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def widen_patch_embedding(sd: dict[str, Tensor], model) -> dict[str, Tensor]:
    """A base checkpoint for channel-concat fine-tuning: the patch embedding gains zero weights for the
    source channels, so training starts from exactly the base model (InstructPix2Pix's initialisation)."""
    key = "pos_embed.proj.weight"
    want = model.state_dict()[key].shape
    w = sd[key]
    if w.shape == want:
        return sd
    if w.shape[0] != want[0] or w.shape[1] * 2 != want[1]:
        raise ValueError(f"{key}: checkpoint {tuple(w.shape)} cannot be widened to {tuple(want)}")
    return {**sd, key: torch.cat([w, torch.zeros_like(w)], dim=1)}


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.rank, self.world, self.device = _init_distributed()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        model_cfg = get_config(cfg.preset)
        self.model_cfg = model_cfg
        self.is_ace = isinstance(model_cfg, ACEConfig)
        self.text = tiny_text_encoder(model_cfg)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(model_cfg)
        self._initial_weights(model)
        self.trainable = set_trainable(model, cfg.mode)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.to(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world,))
        apply_fsdp(model, mesh, torch.bfloat16 if bf16 else torch.float32)
        self.model = model
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.trainable]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        # EMA of the trainable weights, sharded like them (fp32 shards)
        self.ema = {n: p.detach().clone() for n, p in zip(self.trainable, self.params)}
        self.objective = Objective(model_cfg.prediction)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.keep)
        data_cfg = DataConfig(
            list(cfg.data), token_budget=cfg.token_budget, patch_size=model_cfg.patch_size,
            codec_factor=model_cfg.codec_factor, seed=cfg.seed, decoder=cfg.decoder,
            importance=ImportanceConfig(cfg.importance_column, cfg.importance_threshold, cfg.importance),
            family="ace" if self.is_ace else "sd3", drop_prompt=cfg.drop_prompt,
            condition=self.is_ace or model_cfg.editnet or model_cfg.concat_condition)
        self.loader = EditLoader(data_cfg, self.text.encode, self.rank, self.world, log=self.log)
        self.step = 0
        self.peak = peak_flops(self.device)

    def _initial_weights(self, model) -> None:
        if self.is_ace:  # ACE's indicator table holds the text encoder's states of {image}, {image1}, ...
            with torch.no_grad():
                model.text_position_embeddings.pos.copy_(indicator_table(self.text))
        if self.cfg.init is None:
            return
        sd = load_state_dict_file(self.cfg.init)
        if getattr(model.cfg, "concat_condition", False):
            sd = widen_patch_embedding(sd, model)
        has_control = any(k.startswith("editnet.") for k in sd)
        control_keys = tuple(k for k in model.state_dict() if k.startswith("editnet."))
        load_into(model, sd, allow_missing=() if has_control else control_keys)
        if getattr(model, "editnet", None) is not None and not has_control:
            model.editnet.init_from_base(model.transformer_blocks)  # OmniEdit: the branch starts as a copy
            self.log(f"init: base weights from {self.cfg.init}; EditNet blocks copied from the base")

    # --- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema}

    def save(self) -> Path:
        meta = {"config": asdict(self.cfg), "model_config": config_to_dict(self.model_cfg)}
        path = self.ckpt.save(self.step, self._state(), self.loader.state_dict(), meta)
        self.log(f"checkpoint: {path}")
        return path

    def resume(self) -> bool:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = self.ckpt.latest()
        if path is None:
            return False
        state = self._state()
        meta, loader_state = self.ckpt.load(path, state)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.loader.load_state_dict(loader_state)
        self.step = meta["step"]
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def export(self, path: Path) -> None:
        """The EMA weights (frozen parameters as they are) as one self-describing safetensors file."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = {n: t.full_tensor().cpu() if hasattr(t, "full_tensor") else t.cpu() for n, t in self.ema.items()}
        if self.rank == 0:
            full.update(ema)
            save_weights(full, self.model_cfg, path, EXPORT_DTYPES[self.cfg.export_dtype],
                         {"step": str(self.step), "ema_decay": str(self.cfg.ema_decay)})
            self.log(f"exported EMA weights to {path}")
        dist.barrier()

    # --- one step ----------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.cfg.seed * 1_000_003 + self.step) * 1009 + self.rank)
        return g

    def _stop(self, what: str, value: float, ids: list[str]) -> None:
        last = self.ckpt.latest()
        raise FloatingPointError(
            f"step {self.step + 1}: the {what} is {value} (rank {self.rank}, samples {ids[:6]}); stopped before "
            f"updating the weights. Last good checkpoint: {last or 'none yet'} (intact). Lower --lr or check "
            f"those records, then rerun to resume from it.")

    def train_step(self, batch) -> dict:
        cfg = self.cfg
        packed = batch.packed.to(self.device)
        n = packed.num_samples
        sample_of = target_sample_index(packed)
        noised = self.objective.noise(packed.target_tokens(), sample_of, n, self._generator())
        pred = self.model(packed, noised.x_t, noised.t)
        per_sample = self.objective.per_sample(pred, noised.target, sample_of, n)
        weights = batch.weights.to(self.device)
        counts = torch.tensor([float(n)], device=self.device)
        dist.all_reduce(counts)
        loss = weighted_loss(per_sample, weights, counts[0], self.world)
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            self._stop("loss", loss.item(), batch.ids)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            self._stop("gradient norm", norm, batch.ids)
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # warm-up EMA (the decay grows with the step, as in diffusers' EMAModel)
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in self.params], 1 - decay)
        self.step += 1
        return {"loss": loss.detach() / self.world, "per_sample": per_sample.detach(), "tasks": batch.tasks,
                "tokens": packed.tokens.shape[0], "flops": 3 * forward_flops(self.model, packed),
                "grad_norm": norm, "lr": lr}

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        if self.resume():
            self._truncate_metrics()
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        if self.step >= end:
            self.log(f"nothing to do: at step {self.step}, the run ends at {end}")
        self.log(f"training {cfg.preset} ({cfg.mode}) on {self.world} rank(s), {self.device.type}: "
                 f"{sum(p.numel() for p in self.params):,} trainable parameters; steps {self.step} -> {end}")
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, disable=self.rank != 0 or not sys.stderr.isatty(),
                   dynamic_ncols=True)
        window = _Window()
        it = iter(self.loader)
        t0 = time.perf_counter()
        while self.step < end:
            out = self.train_step(next(it))
            window.add(out)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                record = window.reduce(self.step, time.perf_counter() - t0, self.world, self.peak)
                self._emit(record, bar)
                window, t0 = _Window(), time.perf_counter()
            if self.step % cfg.ckpt_every == 0 or self.step == end:
                self.save()
        bar.close()
        if self.step >= cfg.steps:
            self.export(self.out / "model.safetensors")
        stats = [None] * self.world
        dist.all_gather_object(stats, self.loader.stats)
        if self.rank == 0:
            total = {k: sum(s.get(k, 0) for s in stats) for k in stats[0]}
            self.log(f"data: {total}")

    def _emit(self, record: dict, bar) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tasks = " ".join(f"{k}={v:.4f}" for k, v in sorted(record["loss_per_task"].items()))
        mfu = f" | MFU {record['mfu'] * 100:.1f}%" if record["mfu"] is not None else ""
        line = (f"step {record['step']} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{record['samples_per_s']:.1f} samples/s | {record['tokens_per_s']:,.0f} tokens/s{mfu} | {tasks}")
        bar.write(line) if not bar.disable else print(line, flush=True)

    def _truncate_metrics(self) -> None:
        """Drop log records past the resumed step (written by the interrupted run after its checkpoint)."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Window:
    """Step outputs between two log lines, reduced over ranks when logged."""

    def __init__(self):
        self.loss = 0.0
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.flops = 0
        self.task_sum: dict[str, float] = defaultdict(float)
        self.task_n: dict[str, int] = defaultdict(int)
        self.last: dict = {}

    def add(self, out: dict) -> None:
        self.loss += float(out["loss"])
        self.steps += 1
        self.samples += len(out["tasks"])
        self.tokens += out["tokens"]
        self.flops += out["flops"]
        for task, value in zip(out["tasks"], out["per_sample"].tolist()):
            self.task_sum[task] += value
            self.task_n[task] += 1
        self.last = out

    def reduce(self, step: int, seconds: float, world: int, peak: float | None) -> dict:
        gathered = [None] * world
        mine = (self.loss, self.samples, self.tokens, self.flops, dict(self.task_sum), dict(self.task_n))
        dist.all_gather_object(gathered, mine)
        task_sum: dict[str, float] = defaultdict(float)
        task_n: dict[str, int] = defaultdict(int)
        for _, _, _, _, ts, tn in gathered:
            for k, v in ts.items():
                task_sum[k] += v
                task_n[k] += tn[k]
        loss = sum(g[0] for g in gathered) / self.steps
        samples, tokens, flops = (sum(g[i] for g in gathered) for i in (1, 2, 3))
        return {"step": step, "loss": loss, "lr": self.last["lr"], "grad_norm": self.last["grad_norm"],
                "loss_per_task": {k: task_sum[k] / task_n[k] for k in sorted(task_sum)},
                "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (peak * world) if peak else None}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="omniace-train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if f.name == "data":
            ap.add_argument(flag, nargs="+", required=True, help="Parquet files or folders")
        elif isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif f.name in ("init", "stop_at"):
            ap.add_argument(flag, type=str if f.name == "init" else int, default=None)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    return TrainConfig(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
