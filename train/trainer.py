"""The torchrun trainer: FSDP2, importance-weighted diffusion loss, EMA, atomic DCP checkpoints, exact resume.

Launch (any ``--nproc_per_node``; plain ``python -m`` runs one process)::

    torchrun --nproc_per_node 2 -m omniace.train.trainer --data corpus/ --out runs/tiny --steps 2000

Every rank builds the same model from the seed, shards it (``fully_shard`` per block, bf16 parameters
with fp32 gradient reduction on a GPU, fp32 on the CPU), reads its own disjoint records, and takes the
loss on its target tokens only, weighted per sample by lambda. The noise of step s on rank r comes from
a generator seeded by (seed, s, r), and the data position is saved with every checkpoint, so a resumed
run reproduces the loss curve of an uninterrupted one bit for bit. A non-finite loss or gradient stops
the run before the weights change, with the last good checkpoint intact.

One run per output folder: rank 0 locks ``--out`` (``run.lock``: host, pid, since) before any rank writes
there, and under torchrun every worker dies with its launcher. SIGTERM (a scheduler's pre-emption)
checkpoints at the next step boundary and exits 0; the same command resumes. A resumed run first
compares the checkpoint's configuration with its own (``--allow-config-change`` names accepted changes).
An error prints one line, ``omniace-train: error: ...`` (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from omniace.engine.codec import PixelCodec
from omniace.engine.config import (ACEConfig, config_differences, config_to_dict, get_config, parse_overrides,
                                   recorded_config)
from omniace.engine.model import build_model, config_metadata, forward_flops, save_weights
from omniace.engine.pipeline import tiny_text_encoder
from omniace.engine.text import indicator_table
from omniace.engine.weights import load_into, load_state_dict_file

from .checkpoint import EXPORT_DTYPES, CheckpointManager
from .cache import cache_codec, cache_text, cached_text_encoder
from .data import DataConfig, EditLoader, size_caps
from .importance import ImportanceConfig
from .lifecycle import StopSignal, die_with_parent, launched_by_torchrun
from .objective import (TIMESTEP_SAMPLINGS, Objective, edit_region_weight, predict, sample_weights,
                        self_condition_step, target_sample_index, weighted_loss)
from .parallelize import TRAIN_MODES, apply_fsdp, enable_activation_checkpointing, set_trainable
from .resume_check import ConfigMismatchError, allowable, compare, resolve_paths, signature
from .runlock import RunLock, RunLockedError
from .runlog import RunLog, Window
from .synthetic import TASKS


def _opt(default, help: str):
    """A TrainConfig field whose ``help`` is its ``--flag``'s help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, in one multi-tensor op: a tensor's max-abs norm is NaN or
    inf exactly when one of its elements is. Empty tensors (a rank's FSDP shard can be empty) are skipped."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


@dataclass
class TrainConfig:
    data: list[str] = _opt([], "OmniEdit Parquet files or folders of them, or latent cache folders written by "
                               "python -m omniace.train.cache, which latent-space presets train from (required)")
    out: str = _opt("runs/train", "output folder: checkpoints/, metrics.jsonl, skipped.jsonl, model.safetensors; "
                                  "one run at a time (run.lock)")
    preset: str = _opt("ace-tiny", "model preset (omniace.engine.config)")
    model_override: list[str] = _opt([], "preset fields to change, FIELD=VALUE[,FIELD=VALUE...] (e.g. "
                                         "pixel_conv=16): recorded in every checkpoint and in the export, which "
                                         "then loads as trained; repeatable")
    init: str | None = _opt(None, "weights to start from: a .safetensors export, or a torch.save .pt/.pth (the base "
                                  "model for --mode editnet)")
    mode: str = _opt("full", f"what trains: {' | '.join(TRAIN_MODES)} (editnet: the control branch only, the "
                             f"base frozen)")
    steps: int = _opt(1000, "length of the schedule (optimizer updates)")
    stop_at: int | None = _opt(None, "end this run (with a checkpoint) at this step: time-limited jobs")
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "the cosine decays to lr * min_lr_ratio")
    warmup: int = _opt(100, "linear warm-up updates (a warning if longer than --steps)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.999, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this")
    ema_decay: float = _opt(0.999, "EMA decay of the exported weights (warmed up with the step)")
    token_budget: int = _opt(2048, "image tokens per rank per step")
    importance: str = _opt("binary", "importance weight: binary | soft | none")
    importance_column: str = _opt("o_score", "the score column the importance weight reads")
    importance_threshold: float = _opt(9.0, "binary importance: lambda = 1 at or above this score, else 0")
    edit_weight: float = _opt(0.0, "extra loss weight on the target's elements that differ from the source image "
                                   "(1 + this there, 1 elsewhere). The weight depends on the target, so where the "
                                   "model is unsure it leans toward changing pixels (docs/default_model.md)")
    task_weight: list[str] = _opt([], "loss weight per task, TASK=W[,TASK=W...] (others 1): the task follows from "
                                      "the instruction, so unlike --edit-weight it leaves the best prediction "
                                      "unbiased; local edits change few pixels and carry little of an unweighted "
                                      "loss; repeatable")
    timestep_sampling: str = _opt("auto", "how each sample's noise level is drawn: auto (uniform t for DDPM presets "
                                          "as in ACE, logit-normal for flow as in SD3) | uniform | logit_normal "
                                          "(t = 1000 sigmoid(z), z ~ N(--logit-mean, --logit-std); SD3 sec. 3.1)")
    logit_mean: float = _opt(0.0, "logit_normal: the mean of z; below 0 trains more on low and middle noise "
                                  "(-1.1 centres DDPM t near 250)")
    logit_std: float = _opt(1.0, "logit_normal: the standard deviation of z (> 0)")
    uniform_mix: float = _opt(0.0, "logit_normal: this fraction of the draws is uniform instead, which keeps "
                                   "the pure-noise end (where sampling starts) trained; in [0, 1]")
    drop_prompt: float = _opt(0.1, "probability of an empty instruction (trains classifier-free guidance)")
    decoder: str = _opt("auto", "image decoder: auto (DALI if installed, else PIL) | dali | pil")
    seed: int = _opt(0, "seeds the weights, the data order and the noise")
    precision: str = _opt("auto", "auto (bf16 parameters on a GPU, fp32 on the CPU) | bf16 | fp32")
    activation_checkpointing: bool = _opt(True, "recompute each block's activations in the backward pass")
    ckpt_every: int = _opt(200, "checkpoint every this many steps (and at the end)")
    keep: int = _opt(2, "checkpoints kept")
    log_every: int = _opt(10, "a metrics record every this many steps")
    export_dtype: str = _opt("fp32", "dtype of the final safetensors: fp32 | fp16 | bf16 (fp16 halves a shipped "
                                     "default)")
    allow_config_change: list[str] = _opt([], "on resume, accept these fields differing from the checkpoint's "
                                              "(comma list, e.g. data,seed; repeatable); other differences stop the "
                                              "run")

    def task_weights(self) -> dict[str, float]:
        """``task_weight`` as ``{task: weight}``; ValueError naming an entry that is not TASK=W with W a finite
        number >= 0."""
        out = {}
        for entry in self.task_weight:
            task, sep, value = entry.partition("=")
            try:
                w = float(value) if sep and task.strip() else float("nan")
            except ValueError:
                w = float("nan")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"task_weight entry {entry!r}: expected TASK=W with W a finite number >= 0")
            if task.strip() in out:  # the last would silently win
                raise ValueError(f"task_weight entry {entry!r}: task {task.strip()!r} is already weighted "
                                 f"{out[task.strip()]:g}; give each task once")
            out[task.strip()] = w
        return out

    def model_config(self):
        """The preset with ``model_override`` applied (ACEConfig or SD3Config); ValueError naming a bad entry."""
        return get_config(self.preset, **parse_overrides(self.preset, self.model_override))

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
        # a non-finite or out-of-range hyper-parameter would train NaN weights (or nothing) without a word
        for name, ok, what in (("lr", lambda v: v > 0, " > 0"), ("grad_clip", lambda v: v > 0, " > 0"),
                               ("weight_decay", lambda v: v >= 0, " >= 0"),
                               ("beta1", lambda v: 0 <= v < 1, " in [0, 1)"),
                               ("beta2", lambda v: 0 <= v < 1, " in [0, 1)"),
                               ("ema_decay", lambda v: 0 <= v <= 1, " in [0, 1]"),
                               ("edit_weight", lambda v: v >= 0, " >= 0"),
                               ("logit_mean", lambda v: True, ""), ("logit_std", lambda v: v > 0, " > 0"),
                               ("uniform_mix", lambda v: 0 <= v <= 1, " in [0, 1]"),
                               ("importance_threshold", lambda v: True, "")):
            v = getattr(self, name)
            if not (math.isfinite(v) and ok(v)):
                raise ValueError(f"{name} must be a finite number{what}, got {v}")
        self.task_weights()  # ValueError naming a bad entry
        if not 0 <= self.drop_prompt < 1:
            raise ValueError(f"drop_prompt must be in [0, 1), got {self.drop_prompt}")
        if self.token_budget < 1 or self.keep < 1 or self.seed < 0:
            raise ValueError(f"token_budget ({self.token_budget}) and keep ({self.keep}) must be >= 1, seed "
                             f"({self.seed}) >= 0")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling {self.timestep_sampling!r}; expected one of {TIMESTEP_SAMPLINGS}")
        if self.decoder not in ("auto", "dali", "pil"):
            raise ValueError(f"decoder {self.decoder!r}; expected auto, dali or pil")
        if self.importance not in ("binary", "soft", "none"):
            raise ValueError(f"importance {self.importance!r}; expected binary, soft or none")
        if self.importance == "binary" and not 0 <= self.importance_threshold <= 10:  # OmniEdit scores are 0-10
            raise ValueError(f"importance_threshold {self.importance_threshold} is outside the 0-10 score scale: "
                             f"binary importance would keep no pair (or every pair)")
        model_cfg = self.model_config()  # ValueError naming the presets, or a bad override
        try:
            check_data_codec(self.preset, model_cfg, self.data)
        except ValueError as err:
            if not self.model_override:
                raise
            raise ValueError(f"{err} (with --model-override {','.join(self.model_override)})") from None
        if self.init is not None and not Path(self.init).is_file():
            raise ValueError(f"--init {self.init!r} does not exist or is not a file (expected a .safetensors export "
                             f"or a torch.save .pt/.pth)")
        if self.mode == "editnet" and not getattr(model_cfg, "editnet", False):
            raise ValueError(f"--mode editnet needs a preset with an EditNet branch; {self.preset!r} has none")
        ok = allowable(f.name for f in fields(self))
        bad = [n for n in self.allow_config_change if n not in ok]
        if bad:
            raise ValueError(f"allow_config_change {bad}: expected names among {ok} (preset, mode and the world "
                             f"size cannot change on resume)")

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant."""
        out = []
        # a corpus's task column may hold any name, so an unknown one is not refused: a typo would weight nothing
        unknown = [t for t in self.task_weights() if t not in TASKS]
        if unknown:
            out.append(f"--task-weight names task(s) {unknown} that are none of the known {TASKS}: they weight "
                       f"only rows whose task column says exactly that")
        if self.warmup > self.steps:
            out.append(f"--warmup {self.warmup} is longer than --steps {self.steps}: the learning rate never "
                       f"reaches --lr (it ends at {lr_at(self, self.steps - 1) / self.lr:.0%} of it) and never decays")
        sampling = self.timestep_sampling
        if sampling == "auto":
            sampling = "logit_normal" if self.model_config().prediction == "flow" else "uniform"
        defaults = field_defaults()
        ignored = [f"--{name.replace('_', '-')} {getattr(self, name):g}"
                   for name in ("logit_mean", "logit_std", "uniform_mix") if getattr(self, name) != defaults[name]]
        if sampling == "uniform" and ignored:
            out.append(f"{' / '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect: this run draws "
                       f"timesteps uniformly (--timestep-sampling {self.timestep_sampling}); pass "
                       f"--timestep-sampling logit_normal to use {'it' if len(ignored) == 1 else 'them'}")
        return out


def field_defaults() -> dict:
    """TrainConfig's plain defaults by field name (fields with a default factory or none are left out)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def check_data_codec(preset: str, model_cfg, data: list[str]) -> None:
    """The model must read the latents the data gives: a latent cache's VAE (factor and channels), or the
    pixel codec (factor 4, 48 channels) for Parquet data. Raises ValueError naming both sides."""
    codec = cache_codec(data) if data else None
    if codec is not None:
        if (codec["factor"], codec["latent_channels"]) != (model_cfg.codec_factor, model_cfg.in_channels):
            raise ValueError(f"preset {preset!r} takes {model_cfg.in_channels}-channel latents at factor "
                             f"{model_cfg.codec_factor}; the latent cache {data} holds {codec['latent_channels']}-"
                             f"channel latents at factor {codec['factor']} ({codec['kind']} {codec.get('path', '')})")
        text = cache_text(data)
        if text is not None:
            ace = isinstance(model_cfg, ACEConfig)
            want = ("ace", model_cfg.y_channels, None) if ace else \
                ("sd3", model_cfg.joint_attention_dim, model_cfg.pooled_projection_dim)
            if (text["family"], text["dim"], text["pooled_dim"]) != want:
                raise ValueError(f"preset {preset!r} takes {want[0]}-family instructions of width {want[1]} (pooled "
                                 f"{want[2]}); the latent cache {data} holds text states of {text['encoder']}: "
                                 f"{text['family']} family, width {text['dim']} (pooled {text['pooled_dim']})")
            # byte- and word-level states share a width; a model trained on the other's would be run
            # (tiny_text_encoder) with an encoder it never saw
            kind, _, arg = text["encoder"].partition(":")
            cached = getattr(get_config(arg), "text_encoder", "bytes") if kind == "tiny" else None
            if ace and cached is not None and cached != model_cfg.text_encoder:
                raise ValueError(f"preset {preset!r} reads instructions with its {model_cfg.text_encoder!r} text "
                                 f"encoder; the latent cache {data} holds text states of {text['encoder']} "
                                 f"({cached!r}): cache them with --text-encoder tiny:{preset}")
        return
    pixel = PixelCodec(4)
    if (model_cfg.codec_factor, model_cfg.in_channels) != (pixel.factor, pixel.latent_channels):
        raise ValueError(f"preset {preset!r} is a latent-space model (codec factor {model_cfg.codec_factor}, "
                         f"{model_cfg.in_channels} channels): Parquet data is encoded with the pixel codec, which "
                         f"only the pixel-space presets (ace-tiny, ace-small, ace-edit, sd3-tiny*, sd3-small*) read; encode "
                         f"the data with its VAE first (python -m omniace.train.cache --vae ...) and train on the "
                         f"cache")


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


# the inputs a fine-tune may add to an ACE base: (config flag, the weight that embeds the input)
NEW_INPUTS = (("source_concat", "source_embedder.weight"), ("self_condition", "self_cond_embedder.weight"))


def add_new_inputs(sd: dict[str, Tensor], model) -> dict[str, Tensor]:
    """A base checkpoint for an ACE model that adds inputs the base lacks (``cfg.source_concat``,
    ``cfg.self_condition``): their embedders and the per-pixel head's three self-conditioning columns start at zero,
    so training starts from exactly the base model, as :func:`widen_patch_embedding` does for channel concat.
    A checkpoint that already holds them, or any other mismatch, is returned unchanged (``load_into`` then names it)."""
    own, out = model.state_dict(), dict(sd)
    cfg = model.cfg
    for flag, key in NEW_INPUTS:
        if getattr(cfg, flag, False) and key not in sd:
            out[key] = torch.zeros_like(own[key])
    key = "pixel_head.fc1.weight"
    if getattr(cfg, "self_condition", False) and "self_cond_embedder.weight" not in sd and key in sd:
        w, want = sd[key], own[key].shape
        if w.shape[0] == want[0] and w.shape[1] + 3 == want[1]:
            # the head's inputs end [..., x0_prev RGB, source RGB, noisy RGB] (PixelHead.forward)
            out[key] = torch.cat([w[:, :-6], w.new_zeros(w.shape[0], 3), w[:, -6:]], dim=1)
    return out


def init_mismatch_hint(path: str | os.PathLike, cfg) -> str:
    """For a failed ``--init`` load: the fields in which the model ``path`` records (its ``omniace_config``) differs
    from this run's ``cfg``, and what to pass instead; empty when the file records no config."""
    raw, _ = config_metadata(path)
    try:
        record = json.loads(raw) if raw is not None else None
    except ValueError:
        record = None
    diff = config_differences(record, cfg, "this run") if isinstance(record, dict) else []
    if not diff:
        return ""
    return (f" records a model with {', '.join(diff)}: pick the preset it was trained from and --model-override "
            f"the rest to match (only source_concat and self_condition may be added). The load failed")


def say(line: str, bar=None) -> None:
    """Print a progress line (through ``bar``'s ``write`` while a tqdm bar is shown). When stdout's reader has gone
    (``omniace-train ... | head``), training goes on: stdout is pointed at /dev/null, as ``nohup`` would, and
    ``metrics.jsonl`` still gets every record; one line on stderr says so (unless stderr went to the same pipe,
    ``2>&1 | head``: then it follows stdout to /dev/null)."""
    try:
        bar.write(line) if bar is not None else print(line, flush=True)
    except BrokenPipeError:
        _to_devnull(sys.stdout)
        try:
            print("omniace-train: stdout was closed by its reader; training goes on (progress: metrics.jsonl in "
                  "--out)", file=sys.stderr, flush=True)
        except BrokenPipeError:  # `2>&1 | head`: stderr was the same pipe
            _to_devnull(sys.stderr)


def _to_devnull(stream) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=say):
        self.cfg = cfg
        self.rank, self.world, self.device = _init_distributed()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.out = Path(cfg.out)
        self.lock = RunLock(self.out, log=self.log)
        self.stop = StopSignal()
        try:
            self._lock_out()
            self.stop.install()
            self._build()
        except BaseException:
            self.close()
            raise

    def _lock_out(self) -> None:
        """Rank 0 locks ``--out`` before any rank writes there (ranks on other hosts share the folder, so one
        lock serves the run); every rank gets its outcome, so a refusal is raised alike on all of them."""
        outcome: list = [None]
        if self.rank == 0:
            try:
                self.lock.acquire()
            except Exception as err:  # noqa: BLE001 - sent to every rank, raised there
                outcome[0] = err
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise outcome[0]
        if self.lock.previous is not None:
            self.log(f"lock: took over {self.lock.path} from a run that is gone ({self.lock.previous.describe()})")
        if not self.lock.flock:
            self.log(f"warning: no flock on the file system of {self.out}: the lock relies on its holder record "
                     f"and heartbeat only")

    def _build(self) -> None:
        cfg = self.cfg
        model_cfg = cfg.model_config()
        self.model_cfg = model_cfg
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.keep)
        self.runlog = RunLog(self.out, enabled=self.rank == 0)
        self.resume_from = self.ckpt.latest()
        self.changed: list[str] = []  # configuration fields this resume accepts as changed
        if self.resume_from is not None:  # before any heavy work: a mismatch stops here with its message
            meta = self.ckpt.read_meta(self.resume_from)
            # a field added after the checkpoint was written counts as its default, which computes what the
            # older version did (e.g. uniform_mix 0 draws exactly the same timesteps)
            recorded = {**field_defaults(), **meta["config"]}
            self.changed = compare(signature(recorded, meta["world_size"], recorded_config(meta["model_config"])),
                                   signature(asdict(cfg), self.world, config_to_dict(model_cfg)),
                                   cfg.allow_config_change, self.resume_from)
        self.is_ace = isinstance(model_cfg, ACEConfig)
        # a cache's text states when it holds them (the shared ones serve ACE's indicator table), else the
        # byte-level encoder the tiny presets train with
        self.text = cached_text_encoder(cfg.data) if cache_text(cfg.data) else tiny_text_encoder(model_cfg)
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
        # foreach: one multi-tensor update instead of a loop over ~100 small tensors (4% of a step of ace-edit)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay, foreach=True)
        # EMA of the trainable weights, sharded like them (fp32 shards)
        self.ema = {n: p.detach().clone() for n, p in zip(self.trainable, self.params)}
        self.objective = Objective(model_cfg.prediction, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std,
                                   cfg.uniform_mix)
        self.task_weights = cfg.task_weights()
        data_cfg = DataConfig(
            list(cfg.data), token_budget=cfg.token_budget, patch_size=model_cfg.patch_size,
            codec_factor=model_cfg.codec_factor, seed=cfg.seed, decoder=cfg.decoder,
            importance=ImportanceConfig(cfg.importance_column, cfg.importance_threshold, cfg.importance),
            family="ace" if self.is_ace else "sd3", drop_prompt=cfg.drop_prompt,
            condition=self.is_ace or model_cfg.editnet or model_cfg.concat_condition, **size_caps(model_cfg))
        self.step = 0
        self._skipped: list[dict] = []  # this rank's skipped records since they were last written
        self.loader = EditLoader(data_cfg, self.text.encode, self.rank, self.world, log=self.log,
                                 on_skip=self._on_skip)
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
        added = ""
        if self.is_ace:
            base, sd = sd, add_new_inputs(sd, model)
            grown = [k if k not in base else f"{k}'s new columns" for k in sd
                     if k not in base or sd[k].shape != base[k].shape]
            options = [flag for flag, key in NEW_INPUTS if key not in base and key in sd]
            if grown:
                added = f"; the inputs it lacks ({', '.join(options)}) start at zero: {', '.join(grown)}"
        has_control = any(k.startswith("editnet.") for k in sd)
        control_keys = tuple(k for k in model.state_dict() if k.startswith("editnet."))
        try:
            load_into(model, sd, allow_missing=() if has_control else control_keys)
        except ValueError as err:
            raise ValueError(f"--init {self.cfg.init}{init_mismatch_hint(self.cfg.init, model.cfg)}: {err}") from None
        if getattr(model, "editnet", None) is not None and not has_control:
            model.editnet.init_from_base(model.transformer_blocks)  # OmniEdit: the branch starts as a copy
            self.log(f"init: base weights from {self.cfg.init}; EditNet blocks copied from the base")
        else:
            self.log(f"init: weights from {self.cfg.init}{added}")

    # --- skipped records ---------------------------------------------------------------------------
    def _on_skip(self, record: dict) -> None:
        # read while fetching the batch of the coming step: a resume to step s keeps those with step <= s
        self._skipped.append({"step": self.step + 1, "rank": self.rank, **record})

    def _flush_skipped(self) -> None:
        """Collective: rank 0 appends every rank's skipped records to skipped.jsonl, ordered by (step, rank),
        so the file does not depend on where a run was interrupted."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, self._skipped)
        self._skipped = []
        self.runlog.skipped(sorted((r for g in gathered for r in g), key=lambda r: (r["step"], r["rank"])))

    # --- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema}

    def save(self, window: Window) -> Path:
        """Collective: a checkpoint of this step, with each rank's data position and open log window."""
        self._flush_skipped()  # records up to this step are on disk before the checkpoint that covers them
        meta = {"config": resolve_paths(asdict(self.cfg)), "model_config": config_to_dict(self.model_cfg)}
        own = {"loader": self.loader.state_dict(), "log_window": window.state_dict()}
        path = self.ckpt.save(self.step, self._state(), own, meta)
        self.log(f"checkpoint: {path}")
        return path

    def resume(self) -> Window:
        """Load ``resume_from`` (checked in ``__init__``); returns the log window that was open at its step."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = self.resume_from
        state = self._state()
        meta, own = self.ckpt.load(path, state)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if "data" in self.changed:  # positions in the old shards mean nothing in the new ones
            self.log("resume: --data differs from the checkpoint's (allowed): the new data starts at its beginning")
        else:
            self.loader.load_state_dict(own["loader"])
            # what the loader reported while it was built (bad shards) is in skipped.jsonl already
            self._skipped = []
        self.step = meta["step"]
        self.runlog.truncate(self.step)
        changed = f" (allowed changes: {', '.join(self.changed)})" if self.changed else ""
        self.log(f"resumed from {path} at step {self.step}{changed}")
        return Window(own.get("log_window"))

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
        """Collective (every rank saw the same verdict): raise one error naming each rank's bad value."""
        self._flush_skipped()
        seen: list = [None] * self.world
        dist.all_gather_object(seen, (value, ids[:6]))
        where = "; ".join(f"rank {r}: {v} (samples {i})" for r, (v, i) in enumerate(seen) if not math.isfinite(v))
        last = self.ckpt.latest()
        raise FloatingPointError(
            f"step {self.step + 1}: the {what} is not finite ({where}); stopped before updating the weights. "
            f"Last good checkpoint: {last or 'none yet'} (intact). Lower --lr or check those records, then rerun "
            f"to resume from it.")

    def _check_weights(self, lr: float) -> None:
        """Collective: a finite loss and gradient can still overflow the update (a huge --lr); such weights
        must never reach a checkpoint or the export, so the run stops here, before anything is saved."""
        with torch.no_grad():
            local = [t.to_local() if hasattr(t, "to_local") else t for t in [*self.params, *self.ema.values()]]
            ok = torch.tensor([float(all_finite(local))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            self._flush_skipped()
            raise FloatingPointError(
                f"step {self.step + 1}: the weights are not finite after the update (lr {lr:.3g}); nothing of this "
                f"step was saved. Last good checkpoint: {self.ckpt.latest() or 'none yet'} (intact). Lower --lr, "
                f"then rerun to resume from it.")

    def train_step(self, batch) -> dict:
        """One update; ``out["stop"]``: some rank received SIGTERM (all ranks get the same value)."""
        cfg = self.cfg
        packed = batch.packed.to(self.device)
        n = packed.num_samples
        sample_of = target_sample_index(packed)
        noised = self.objective.noise(packed.target_tokens(), sample_of, n, self._generator())
        self_cond = getattr(self.model_cfg, "self_condition", False) and self_condition_step(cfg.seed, self.step)
        pred = predict(self.model, packed, noised.x_t, noised.t, self_cond)
        passes = 4 if self_cond else 3  # forward + backward FLOPs, and the estimate's forward
        per_sample = self.objective.per_sample(pred, noised.target, sample_of, n,
                                               edit_region_weight(packed, cfg.edit_weight))
        weights = sample_weights(batch.weights.to(self.device), batch.tasks, self.task_weights)
        counts = torch.tensor([float(n)], device=self.device)
        dist.all_reduce(counts)
        loss = weighted_loss(per_sample, weights, counts[0], self.world)
        # one reduction (MIN) carries both verdicts: the loss is finite everywhere, no rank was told to stop
        go_on = torch.ones(1, device=self.device) * (self.stop.received is None)
        flags = torch.cat([torch.isfinite(loss.detach()).float().reshape(1), go_on])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        finite, go_on = flags.tolist()
        if not finite:
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
        self._check_weights(lr)
        self.step += 1
        return {"loss": loss.detach() / self.world, "per_sample": per_sample.detach(), "tasks": batch.tasks,
                "tokens": packed.tokens.shape[0], "flops": passes * forward_flops(self.model, packed),
                "grad_norm": norm, "lr": lr, "stop": not go_on}

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``--steps`` or ``--stop-at``: returns "done"; or "signal" after a SIGTERM, with a
        checkpoint at the step boundary where the ranks agreed to stop."""
        cfg = self.cfg
        if self.resume_from is not None:
            window = self.resume()
        else:  # a fresh start: records of a run killed before its first checkpoint are not this run's
            window = Window()
            self.runlog.truncate(0)
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        for warning in cfg.warnings():
            self.log(f"warning: {warning}")
        if self.step >= end:
            self.log(f"nothing to do: at step {self.step}, the run ends at {end}")
        self.log(f"training {cfg.preset} ({cfg.mode}) on {self.world} rank(s), {self.device.type}: "
                 f"{sum(p.numel() for p in self.params):,} trainable parameters; steps {self.step} -> {end}; "
                 f"{self.loader.source}")
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, disable=self.rank != 0 or not sys.stderr.isatty(),
                   dynamic_ncols=True)
        it = iter(self.loader)
        stopping = False
        while self.step < end and not stopping:
            out = self.train_step(next(it))
            stopping = out["stop"]
            window.add(out)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                self._flush_skipped()
                self._emit(window.reduce(self.step, self.world, self.peak, end, self.loader.stats), bar)
                window = Window()
            if self.step % cfg.ckpt_every == 0 or self.step == end or stopping:
                path = self.save(window)
        bar.close()
        if stopping and self.step < end:  # (at the end, the run finishes as it would have anyway)
            got: list = [None] * self.world
            dist.all_gather_object(got, self.stop.name if self.stop.received else None)
            ranks = [r for r, name in enumerate(got) if name]
            self.log(f"stopped by {got[ranks[0]]} at step {self.step} (received by rank{'s' * (len(ranks) > 1)} "
                     f"{', '.join(map(str, ranks))}): checkpoint {path}; rerun the same command to resume")
            return "signal"
        if self.step >= cfg.steps:
            self.export(self.out / "model.safetensors")
        stats = [None] * self.world
        dist.all_gather_object(stats, self.loader.stats)
        if self.rank == 0:
            total = {k: sum(s.get(k, 0) for s in stats) for k in stats[0]}
            self.log(f"data: {total}")
        return "done"

    def _emit(self, record: dict, bar) -> None:
        self.runlog.metrics(record)
        if self.rank != 0:
            return
        tasks = " ".join(f"{k}={v:.4f}" for k, v in sorted(record["loss_per_task"].items()))
        mfu = f" | MFU {record['mfu'] * 100:.1f}%" if record["mfu"] is not None else ""
        # records and zero_weight (filtered by design) are counts; every other kind is a record in skipped.jsonl
        bad = ", ".join(f"{k} {v}" for k, v in record["data"].items() if k not in ("records", "zero_weight") and v)
        skipped = f" | skipped: {bad} (skipped.jsonl)" if bad else ""
        eta = timedelta(seconds=round(record["eta_s"]))
        line = (f"step {record['step']} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{record['s_per_step']:.2f} s/step | ETA {eta} | {record['samples_per_s']:.1f} samples/s | "
                f"{record['tokens_per_s']:,.0f} tokens/s{mfu} | {tasks}{skipped}")
        say(line, None if bar.disable else bar)

    def close(self) -> None:
        self.stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.lock.release()


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))  # known before (and after) the process group


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        # argparse reads "-1e-3" or "-inf" after a flag as another flag ("expected one argument"), taking only
        # plain negative numbers such as -1.1: a float flag's next word is its value unless it is a flag (then
        # a word that does not parse is named by the float check, as "--flag=-x" would be)
        args = list(sys.argv[1:] if args is None else args)
        floats = {o for a in self._actions if a.type is float for o in a.option_strings}
        for i in range(len(args) - 1, 0, -1):
            word = args[i]
            if args[i - 1] in floats and word.startswith("-") and (
                    _is_float(word) or not (word.startswith("--") or word in self._option_string_actions)):
                args[i - 1:i + 1] = [f"{args[i - 1]}={args[i]}"]
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """One line, as every other user error (argparse would print the whole usage block first)."""
        if _env_rank() != 0:  # every torchrun rank parses the same argv: rank 0 says it once
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    """``omniace-train``'s flags: one per TrainConfig field (its help and default), and ``--debug``."""
    ap = _Parser(prog="omniace-train", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = f.default_factory() if f.default is MISSING else f.default
        help = f.metadata["help"]
        if f.name == "data":
            ap.add_argument(flag, nargs="+", required=True, default=argparse.SUPPRESS, help=help)
        elif f.name == "allow_config_change":
            ap.add_argument(flag, type=_names, default=value, metavar="FIELD[,FIELD...]", action="extend",
                            help=help)
        elif f.name == "model_override":
            ap.add_argument(flag, type=_names, default=value, metavar="FIELD=VALUE[,FIELD=VALUE...]", action="extend",
                            help=help)
        elif f.name == "task_weight":
            ap.add_argument(flag, type=_names, default=value, metavar="TASK=W[,TASK=W...]", action="extend",
                            help=help)
        elif isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help)
        elif f.name in ("init", "stop_at"):
            ap.add_argument(flag, type=str if f.name == "init" else int, default=None, help=help)
        else:
            ap.add_argument(flag, type=type(value), default=value, help=help)
    ap.add_argument("--debug", action="store_true", help="on an error, show the full traceback (of every rank)")
    return ap


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("debug")
    return TrainConfig(**ns)


# seconds a rank other than 0 waits before leaving on a shared error: rank 0 prints it (it hits the same check)
SHARED_ERROR_GRACE_S = 5.0

# errors every rank raises alike (a broadcast or reduced verdict, or the same files read): rank 0 prints them
_SAME_ON_EVERY_RANK = (RunLockedError, ConfigMismatchError, FloatingPointError)


def _print_error(err: BaseException, shared: bool) -> None:
    rank = _env_rank()
    if rank == 0:
        print(f"omniace-train: error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    elif not shared:  # possibly this rank's own failure: one line, so the cause is not lost
        print(f"omniace-train: error on rank {rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    else:  # torchrun kills the other ranks when one exits: let rank 0 print the shared line first
        time.sleep(SHARED_ERROR_GRACE_S)


def main(argv: list[str] | None = None) -> None:
    """The ``omniace-train`` entry point: exit 0 when done or stopped by SIGTERM (resumable), 1 on an error
    (one line on stderr; ``--debug`` re-raises), 2 on bad arguments, 130 on Ctrl-C."""
    ns = vars(build_parser().parse_args(argv))
    debug = ns.pop("debug")
    if launched_by_torchrun():  # torchrun puts each worker in its own session: end with the launcher
        die_with_parent()
    try:
        cfg = TrainConfig(**ns)
        missing = [d for d in cfg.data if not Path(d).exists()]
        if missing:  # a usage error, before the run folder and its lock are made (a config may name data to come)
            raise ValueError(f"--data {missing[0]!r} does not exist (expected Parquet files, folders of them, or a "
                             f"latent cache folder)")
    except ValueError as err:
        if debug:
            raise
        _print_error(err, shared=True)  # the same argv on every rank
        sys.exit(2)
    from torch.distributed.checkpoint.api import CheckpointException

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
        # every rank leaves together: a rank tearing down gloo while another still uses it can abort
        # ("terminate called without an active exception", seen at the end of some resumed runs)
        dist.barrier()
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        if debug:
            raise
        if isinstance(err, CheckpointException):  # one rank's cause, not DCP's per-rank traceback dump
            cause = next(iter(err.failures.values()))[0]
            err = type(cause)(f"a checkpoint could not be written or read ({type(cause).__name__}: {cause}); the "
                              f"previous complete checkpoint is intact") if isinstance(cause, OSError) else cause
        # an error while the run is set up comes from inputs every rank shares (flags, data, checkpoint)
        _print_error(err, shared=trainer is None or isinstance(err, _SAME_ON_EVERY_RANK))
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C; torchrun forwards it to every rank
        if debug:
            raise
        if _env_rank() == 0:
            print("omniace-train: interrupted (the last checkpoint is intact; rerun to resume)", file=sys.stderr)
        sys.exit(130)
    finally:
        if trainer is not None:
            trainer.close()


def cli() -> None:
    """``omniace-train`` and ``python -m omniace.train.trainer``: :func:`main`, then leave with its exit status
    without the interpreter's finalization. There, gloo's C++ worker threads of the (already destroyed) process
    group can still be torn down and abort the process ("terminate called without an active exception",
    SIGABRT): seen once at the end of a finished 12,000-step run, after its export, and at the exit of a rank
    stopped by SIGTERM. Everything the run writes is closed by then (checkpoints and the export are complete files,
    the logs are appended and closed per record, the lock released)."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
