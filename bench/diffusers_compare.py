"""``omniace bench diffusers``: omniace's SD3 forward against diffusers' ``SD3Transformer2DModel``.

Same weights (diffusers' model, loaded into omniace with ``sd3_from_diffusers``), same inputs, same run,
timed interleaved so a busy machine slows every provider alike. Two cases:
- ``one-image``: one latent; omniace packs it (no padding) and diffusers runs it as a batch of one.
- ``mixed-aspect``: latents of different aspect ratios. diffusers batches only equal shapes, so its
  ``diffusers-padded`` provider zero-pads every latent to the largest height and width (more tokens,
  and the padding changes the real tokens' attention); ``diffusers-loop`` runs them one at a time
  (exact, no batching). omniace packs them into one ragged batch.
Each omniace output is checked against diffusers on the unpadded latent (``max_rel_err``) before timing.
The table gives the median, the p20-p80 spread, the minimum (the least disturbed run) and the median
process CPU time (all threads): on a shared machine wall times move with other people's load, while
the CPU time a forward burns barely does.
Times include omniace's packing, which a caller pays. Default: CPU, fp32, ``backend="auto"``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .timing import measure_interleaved

DEFAULT_OUT = Path("bench_results")


@dataclass(frozen=True)
class CompareConfig:
    """A small SD3 (diffusers config keys) and the latent shapes ``(h, w)`` of each case."""

    num_layers: int = 4
    num_attention_heads: int = 6
    attention_head_dim: int = 64
    text_len: int = 77
    one_image: tuple[tuple[int, int], ...] = ((64, 64),)
    mixed_aspect: tuple[tuple[int, int], ...] = ((64, 64), (48, 80), (32, 112))

    def diffusers_config(self) -> dict:
        side = max(max(hw) for hw in self.one_image + self.mixed_aspect)
        return dict(sample_size=side, patch_size=2, in_channels=16, out_channels=16, num_layers=self.num_layers,
                    attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
                    joint_attention_dim=256, caption_projection_dim=self.num_attention_heads * self.attention_head_dim,
                    pooled_projection_dim=128, pos_embed_max_size=side // 2)


SMALL = CompareConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_len=7, one_image=((16, 16),),
                      mixed_aspect=((16, 16), (8, 24), (12, 20)))


@dataclass
class CompareRow:
    case: str
    provider: str  # "omniace", "diffusers", "diffusers-padded" or "diffusers-loop"
    images: int
    tokens: int  # image tokens the provider computes (padding included)
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    cpu_ms: float  # median process CPU time, all threads
    max_rel_err: float | None = None  # omniace vs diffusers on the unpadded latents
    speedup_over: dict[str, float] = field(default_factory=dict)  # other provider -> its time / this time


def _models(cfg: CompareConfig, dtype: torch.dtype):
    import diffusers

    from omniace.engine.interop import sd3_from_diffusers

    ref = diffusers.SD3Transformer2DModel(**cfg.diffusers_config()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # diffusers zero-initialises its output layer; random weights test something
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.2))
    ours = sd3_from_diffusers(dict(ref.config), ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def omniace_forward(model, latents: list[Tensor], ctx: Tensor, pooled: Tensor, t: Tensor) -> list[Tensor]:
    """omniace's SD3 on latents of any shapes ``[C, h, w]``, packed into one batch; outputs per latent."""
    from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack

    cfg = model.cfg
    samples = [LCUSample([ConditionUnit("", [], text=ctx[i], pooled=pooled[i])], ImageInput(x))
               for i, x in enumerate(latents)]
    batch = pack(samples, cfg.patch_size, codec_factor=cfg.codec_factor, with_mask=False, device=latents[0].device)
    return batch.targets_from_tokens(model(batch, batch.target_tokens(), t))


def _rel_err(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _providers(ref, ours, shapes: tuple[tuple[int, int], ...], text_len: int, dtype: torch.dtype,
               g: torch.Generator) -> tuple[dict[str, Callable[[], object]], Callable[[int], Tensor], int]:
    """The timed calls of one case, diffusers' exact output for latent ``i``, and the padded batch's tokens."""
    dc = ref.config
    n = len(shapes)
    latents = [torch.randn(dc.in_channels, h, w, generator=g).to(dtype) for h, w in shapes]
    ctx = torch.randn(n, text_len, dc.joint_attention_dim, generator=g).to(dtype)
    pooled = torch.randn(n, dc.pooled_projection_dim, generator=g).to(dtype)
    t = torch.linspace(100.0, 900.0, n)
    H, W = max(h for h, _ in shapes), max(w for _, w in shapes)
    padded = torch.stack([F.pad(x, (0, W - x.shape[2], 0, H - x.shape[1])) for x in latents])

    def one(i: int) -> Tensor:
        return ref(hidden_states=latents[i][None], encoder_hidden_states=ctx[i:i + 1],
                   pooled_projections=pooled[i:i + 1], timestep=t[i:i + 1]).sample[0]

    fns: dict[str, Callable[[], object]] = {
        "omniace": lambda: omniace_forward(ours, latents, ctx, pooled, t),
        "diffusers-loop" if n > 1 else "diffusers": lambda: [one(i) for i in range(n)],
    }
    if n > 1:
        fns["diffusers-padded"] = lambda: ref(hidden_states=padded, encoder_hidden_states=ctx,
                                              pooled_projections=pooled, timestep=t).sample
    return fns, one, n * H * W // dc.patch_size**2


def run_compare(cfg: CompareConfig, dtype: torch.dtype = torch.float32, warmup: int = 1, rep: int = 5,
                log: Callable[[str], None] = print) -> list[CompareRow]:
    """Time every provider on both cases; raises if omniace disagrees with diffusers beyond 1e-3."""
    ref, ours = _models(cfg, dtype)
    g = torch.Generator().manual_seed(1)
    rows: list[CompareRow] = []
    for case, shapes in (("one-image", cfg.one_image), ("mixed-aspect", cfg.mixed_aspect)):
        n = len(shapes)
        fns, one, padded_tokens = _providers(ref, ours, shapes, cfg.text_len, dtype, g)
        tokens = sum(h * w for h, w in shapes) // ref.config.patch_size**2
        with torch.no_grad():
            err = max(_rel_err(a, one(i)) for i, a in enumerate(fns["omniace"]()))
            if err > 1e-3:
                raise AssertionError(f"{case}: omniace differs from diffusers by {err:.2e} (relative)")
            log(f"  {case}: {n} latent(s) {list(shapes)}, omniace vs diffusers max relative error {err:.1e}")
            timings = measure_interleaved(fns, torch.device("cpu"), warmup, rep)
        group = [CompareRow(case, name, n, padded_tokens if name == "diffusers-padded" else tokens, tm.median_ms,
                            tm.p20_ms, tm.p80_ms, tm.min_ms, tm.cpu_ms, err if name == "omniace" else None) for name, tm in timings.items()]
        for r in group:
            r.speedup_over = {o.provider: o.median_ms / r.median_ms for o in group if o is not r}
        rows += group
    return rows


def table(rows: list[CompareRow]) -> str:
    lines = [f"{'case':13} {'provider':17} {'images':>6} {'tokens':>7} {'median ms':>10} {'p20-p80 ms':>17} "
             f"{'min ms':>8} {'CPU ms':>8}  omniace speedup over it (median, min, CPU time)"]
    for r in rows:
        ours = _omniace(rows, r.case)
        verdict = "" if r is ours else ", ".join(
            f"{getattr(r, k) / getattr(ours, k):.2f}x" for k in ("median_ms", "min_ms", "cpu_ms"))
        lines.append(f"{r.case:13} {r.provider:17} {r.images:6d} {r.tokens:7d} {r.median_ms:10.1f} "
                     f"{r.p20_ms:8.1f}-{r.p80_ms:<8.1f} {r.min_ms:8.1f} {r.cpu_ms:8.1f}  {verdict}")
    return "\n".join(lines)


def _omniace(rows: list[CompareRow], case: str) -> CompareRow:
    return next(r for r in rows if r.case == case and r.provider == "omniace")


def main(argv: list[str] | None = None) -> int:
    from .hardware import describe_host

    ap = argparse.ArgumentParser(prog="omniace bench diffusers", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, help=f"transformer blocks (default {CompareConfig.num_layers})")
    ap.add_argument("--small", action="store_true", help="tiny latents (a smoke run, not a measurement)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if (args.layers is not None and args.layers < 1) or args.rep < 1 or args.warmup < 0:
        raise SystemExit(f"--layers and --rep must be >= 1 and --warmup >= 0, got {args.layers}, {args.rep}, "
                         f"{args.warmup}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("omniace bench diffusers needs diffusers: pip install 'omniace[dev]'") from None
    cfg = SMALL if args.small else CompareConfig()
    cfg = replace(cfg, num_layers=args.layers or cfg.num_layers)
    rows = run_compare(cfg, warmup=args.warmup, rep=args.rep, log=lambda m: print(m, file=sys.stderr))
    print(table(rows))
    host = describe_host(torch.device("cpu"))
    path = args.out / f"diffusers_cpu_{host['date'][:19].replace(':', '').replace('-', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"\nwrote {path}")
    return 0
