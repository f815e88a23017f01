"""The ``omniace`` console script: ``demo``, ``edit``, ``info``, ``convert``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .config import ACEConfig, PRESETS, get_config
from .model import build_model, count_parameters


def demo_scene(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small procedural scene (background, a red circle, a green square) for the demo."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (width, height), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, height * 2 // 3, width, height], fill=(90, 160, 90))
    x = int(torch.randint(8, width // 2, (1,), generator=g))
    d.ellipse([x, 12, x + 24, 36], fill=(220, 40, 40))
    d.rectangle([width - 32, 24, width - 12, 44], fill=(40, 180, 60))
    return img


def cmd_demo(args: argparse.Namespace) -> None:
    from .pipeline import EditPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("omniace demo: the embedded tiny ACE model is UNTRAINED until the trainer issue ships weights;")
    print("its edits are noise-like. This run exercises the whole pipeline (LCU packing, text encoder,")
    print("codec, model, DDIM + CFG sampler) end to end.")
    pipe = EditPipeline.tiny("ace", seed=0)
    src = demo_scene()
    src.save(out / "source.png")
    t0 = time.perf_counter()
    result = pipe.edit(src, "{image} make the red circle blue", steps=args.steps, seed=args.seed)[0]
    dt = time.perf_counter() - t0
    grid = Image.new("RGB", (src.width * 2 + 4, src.height), (255, 255, 255))
    grid.paste(src, (0, 0))
    grid.paste(result, (src.width + 4, 0))
    grid.save(out / "demo_grid.png")
    print(f"model ace-tiny: {count_parameters(pipe.model):,} parameters; {args.steps} steps with CFG "
          f"in {dt:.2f}s on {torch.get_num_threads()} CPU threads ({dt / args.steps * 1000:.0f} ms/step)")
    print(f"wrote {out / 'source.png'} and {out / 'demo_grid.png'} (source | output)")


def cmd_edit(args: argparse.Namespace) -> None:
    from .codec import AutoencoderKLCodec
    from .model import load_model
    from .pipeline import EditPipeline
    from .text import T5TextEncoder

    if args.weights:
        model = load_model(args.weights)
        if args.text_encoder is None or args.vae is None:
            raise SystemExit("--weights needs --text-encoder and --vae folders")
        pipe = EditPipeline(model, T5TextEncoder(args.text_encoder), AutoencoderKLCodec(args.vae))
    else:
        pipe = EditPipeline.tiny("ace" if args.family == "ace" else "sd3")
    images = [Image.open(p).convert("RGB") for p in args.image]
    masks = [Image.open(p) for p in args.mask] if args.mask else None
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    out = pipe.edit(images or None, args.instruction, masks=masks, steps=args.steps, guidance=args.guidance,
                    seed=args.seed, size=size)[0]
    out.save(args.out)
    print(f"wrote {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    cfg = get_config(args.preset)
    with torch.device("meta"):
        model = build_model(cfg)
    f = cfg.codec_factor * cfg.patch_size
    w, h = (int(v) for v in args.resolution.split("x")) if "x" in args.resolution else (int(args.resolution),) * 2
    n_img = (h // f) * (w // f)
    if isinstance(cfg, ACEConfig):
        frames = [[n_img] * (1 + args.images)]
        texts = [[cfg.text_len] * (1 + args.images)]
        flops = model.flops(frames, texts)
        tokens = n_img * (1 + args.images)
    else:
        flops = model.flops([n_img], [333], [n_img] * min(args.images, 1))
        tokens = n_img * (1 + min(args.images, 1))
    print(f"preset {args.preset}: {count_parameters(model):,} parameters")
    print(f"  {w}x{h} with {args.images} condition image(s): {tokens} image tokens")
    print(f"  forward FLOPs per denoising step (one CFG branch): {flops / 1e9:,.2f} GFLOP")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench CLI owns its own arguments
        from omniace.bench.cli import main as bench_main

        raise SystemExit(bench_main(argv[1:]))
    ap = argparse.ArgumentParser(prog="omniace", description="instruction-based image editing engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="op and denoiser benchmarks (omniace bench --help)")
    p = sub.add_parser("demo", help="run the edit pipeline on the embedded tiny default")
    p.add_argument("--out", default="out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("edit", help="edit an image following an instruction")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--mask", action="append", default=[])
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", default="edited.png")
    p.add_argument("--family", choices=["ace", "sd3"], default="ace")
    p.add_argument("--weights")
    p.add_argument("--text-encoder")
    p.add_argument("--vae")
    p.add_argument("--size", help="WIDTHxHEIGHT for text-to-image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_edit)
    p = sub.add_parser("info", help="parameters and FLOPs per denoising step of a preset")
    p.add_argument("--preset", default="ace-0.6b-512", choices=sorted(PRESETS))
    p.add_argument("--resolution", default="512", help="side or WIDTHxHEIGHT in pixels")
    p.add_argument("--images", type=int, default=1, help="condition images")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("convert", help="convert a checkpoint to safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--family", choices=["ace", "sd3", "none"], default="ace")
    p.set_defaults(fn=lambda a: __import__("omniace.engine.weights", fromlist=["main"]).main(
        [a.src, a.dst, "--family", a.family]))
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
