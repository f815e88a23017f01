"""Whole-denoiser step benchmark: one forward (inference) or forward + backward (training) of a preset.

Providers: ``omniace`` (``backend="auto"``: the CUDA/Triton kernels on a GPU, per-segment SDPA attention
on the CPU), ``reference`` (every op
on its PyTorch reference), and each of those under ``torch.compile``. Reported: step time, image tokens
per second and model FLOP utilisation (``model.flops`` matmul FLOPs, x3 for training, over the matmul
throughput measured in the same run).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omniace.engine import build_model, get_config
from omniace.engine.config import ACEConfig
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack
from omniace.engine.model import forward_flops
from omniace.kernels import use_backend

from .hardware import Hardware
from .timing import measure

# preset -> (resolution in pixels, condition images, samples per batch)
GPU_CASES = {"ace-0.6b-512": (512, 2, 2), "sd3-medium-editnet": (1024, 1, 1)}
CPU_CASES = {"ace-tiny": (64, 2, 2), "sd3-tiny-editnet": (64, 1, 1)}


@dataclass
class StepRow:
    preset: str
    mode: str  # "inference" or "training"
    provider: str
    dtype: str
    image_tokens: int
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    tokens_per_s: float | None = None
    tflop_s: float | None = None
    mfu: float | None = None
    speedup_over: dict[str, float] = field(default_factory=dict)


def _batch(cfg, resolution: int, conds: int, samples: int, device: torch.device):
    side = resolution // cfg.codec_factor
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ace = isinstance(cfg, ACEConfig)
    y = cfg.y_channels if ace else cfg.joint_attention_dim
    text = cfg.text_len if ace else 154
    out = []
    for _ in range(samples):
        units = [ConditionUnit("", [ImageInput(r(cfg.in_channels, side, side))], text=r(text, y),
                               pooled=None if ace else r(cfg.pooled_projection_dim)) for _ in range(conds)]
        if ace:  # the current instruction; its unit holds no image (the target is added by pack)
            units.append(ConditionUnit("", [], text=r(text, y)))
        out.append(LCUSample(units, ImageInput(r(cfg.in_channels, side, side))))
    batch = pack(out, cfg.patch_size, codec_factor=cfg.codec_factor, with_mask=ace, device=device)
    return batch


@dataclass
class DenoiserCase:
    """A preset's model and packed batch on the device, ready to step."""

    preset: str
    model: torch.nn.Module
    batch: object  # PackedLCU
    x: torch.Tensor
    t: torch.Tensor
    tokens: int
    flops: float  # matmul FLOPs of one forward


def cases(small: bool) -> dict[str, tuple[int, int, int]]:
    """preset -> (resolution in pixels, condition images, samples per batch)."""
    return CPU_CASES if small else GPU_CASES


def setup_case(preset: str, small: bool, dtype: torch.dtype, device: torch.device) -> DenoiserCase:
    res, conds, samples = cases(small)[preset]
    cfg = get_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype)
    batch = _batch(cfg, res, conds, samples, device)
    return DenoiserCase(preset, model, batch, batch.target_tokens().to(dtype), torch.full((samples,), 500.0, device=device),
                        int(batch.tokens.shape[0]), forward_flops(model, batch))


def step_fn(case: DenoiserCase, mode: str, provider: str) -> Callable[[], None]:
    """One inference forward or training step (forward + backward) of ``provider``: ``omniace`` or
    ``reference``, with ``+compile`` for torch.compile. Shared by the CLI and the pytest-benchmark suite."""
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    backend = "reference" if provider.startswith("reference") else "auto"
    torch._dynamo.reset()  # a compiled graph bakes in the backend it was traced under
    fn = torch.compile(case.model) if provider.endswith("+compile") else case.model
    case.model.train(mode == "training")

    def step():
        with use_backend(backend):
            if mode == "inference":
                with torch.no_grad():
                    fn(case.batch, case.x, case.t)
            else:
                fn(case.batch, case.x, case.t).float().square().mean().backward()

    return step


def providers(compile_: bool) -> list[str]:
    out = ["reference", "omniace"]  # on the CPU omniace's auto differs too: per-segment SDPA attention
    return out + [p + "+compile" for p in out] if compile_ else out


def run_denoiser(small: bool, dtype: torch.dtype, hw: Hardware, device: torch.device, compile_: bool,
                 warmup: int, rep: int, log: Callable[[str], None] = print) -> list[StepRow]:
    rows: list[StepRow] = []
    for preset in cases(small):
        case = setup_case(preset, small, dtype, device)
        log(f"  {preset}: {case.tokens} image tokens, {case.flops / 1e9:,.0f} GFLOP per forward")
        for mode in ("inference", "training"):
            group = []
            for prov in providers(compile_):
                row = StepRow(preset, mode, prov, str(dtype), case.tokens)
                try:
                    timing = measure(step_fn(case, mode, prov), device, warmup, rep, flush_l2=False)
                except Exception as exc:  # report and go on with the other providers
                    row.status = f"error: {exc}"[:200]
                    rows.append(row)
                    continue
                case.model.zero_grad(set_to_none=True)
                work = case.flops * (3 if mode == "training" else 1)
                row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
                row.tokens_per_s = case.tokens / (timing.median_ms * 1e-3)
                row.tflop_s = work / (timing.median_ms * 1e-3) / 1e12
                row.mfu = row.tflop_s / hw.matmul_tflop_s
                group.append(row)
                rows.append(row)
            for r in group:
                r.speedup_over = {o.provider: o.median_ms / r.median_ms for o in group if o is not r}
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
