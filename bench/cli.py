"""``python -m omniace.bench`` / ``omniace bench``: op and denoiser benchmarks -> table, JSON, SVG plots.

On a GPU the default is the full preset shapes in bf16 with every provider; without one it runs CPU-sized
shapes in fp32 with the PyTorch providers (a smoke run: the numbers say nothing about GPU speed).
Results go to ``./bench_results`` (or ``--out``), never into the installed package. Other entry points:
``omniace bench --compare A.json B.json`` (two results files row by row), ``--plot F.json`` (redraw),
``omniace bench diffusers`` (SD3 forward against diffusers on the CPU), ``omniace bench serving``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from omniace.kernels import triton_tuning

from . import report
from .cases import attention_cases, inject_cases, rope_cases
from .denoiser import cases as denoiser_cases
from .denoiser import run_denoiser
from .hardware import describe
from .op_bench import MODES, OPS, run_ops

RESULTS = Path("bench_results")  # relative to the working directory: an installed package may be read-only
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(value: str | None, allowed) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; expected some of {list(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serving"]:  # the serving benchmark owns its arguments
        from .serving import main as serving_main

        return serving_main(argv[1:])
    if argv[:1] == ["diffusers"]:
        from .diffusers_compare import main as diffusers_main

        return diffusers_main(argv[1:])
    ap = argparse.ArgumentParser(prog="omniace bench", description=__doc__.splitlines()[0],
                                 epilog="omniace bench serving --help: the serving benchmark; "
                                        "omniace bench diffusers --help: SD3 against diffusers on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (the default without a GPU)")
    ap.add_argument("--ops", help=f"comma list of {OPS} (default: all)")
    ap.add_argument("--providers", help="comma list, e.g. triton,varlen,flex (default: all available)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,full")
    ap.add_argument("--skip-ops", action="store_true", help="only the denoiser step")
    ap.add_argument("--skip-denoiser", action="store_true", help="only the ops")
    ap.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                    help="include torch.compile providers in the denoiser bench (default: on a GPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default ./{RESULTS})")
    ap.add_argument("--plot", type=Path, metavar="JSON", help="only (re)draw the plots of a results file")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("A.json", "B.json"),
                    help="only compare two results files row by row (A/B above 1: B is faster)")
    args = ap.parse_args(argv)

    if args.compare:
        try:
            a, b = (report.load_results(p) for p in args.compare)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        print(report.compare(a, b, str(args.compare[0]), str(args.compare[1])))
        return 0
    if args.plot:
        for p in report.write_plots(args.plot):
            print(f"wrote {p}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    gpu = device.type == "cuda"
    small = args.small or not gpu
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    rep = args.rep if args.rep is not None else (50 if gpu else 5)
    compile_ = args.compile_ if args.compile_ is not None else gpu
    ops = _csv(args.ops, OPS) or list(OPS)
    modes = _csv(args.modes, MODES)
    providers = _csv(args.providers, None)

    print(f"measuring hardware limits on {device} ...", file=sys.stderr)
    hw = describe(device, small)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    rows = [] if args.skip_ops else run_ops(ops, providers, modes, small, dtype, hw, device, warmup, rep, log)
    steps = [] if args.skip_denoiser else run_denoiser(small, dtype, hw, device, compile_, max(1, warmup // 2),
                                                         max(3, rep // 5), log)
    report.mark_impossible(rows, steps)
    print(report.table(hw, rows, steps))
    shapes = {"rope3d": [asdict(c) for c in rope_cases(small)],
              "segment_attention": [asdict(c) for c in attention_cases(small)],
              "editnet_inject": [asdict(c) for c in inject_cases(small)],
              "denoiser": {k: dict(zip(("resolution", "condition_images", "samples"), v))
                           for k, v in denoiser_cases(small).items()}}
    config = {"shapes": shapes, "small": small, "dtype": str(dtype), "ops": ops, "modes": modes, "providers": providers,
              "warmup": warmup, "rep": rep, "compile": compile_, "argv": argv}
    config["autotuned_tiles"] = triton_tuning.tuned()  # empty unless OMNIACE_AUTOTUNE=1
    path = args.out / f"{report.slug(hw)}.json"
    met = report.write_json(path, hw, rows, steps, config)
    print(f"\nwrote {path}")
    for p in report.write_plots(path):
        print(f"wrote {p}")
    if met:
        print(f"targets met: {sum(t['met'] for t in met)}/{len(met)} (details in the JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
