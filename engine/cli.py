"""The ``omniace`` console script: ``demo``, ``edit``, ``info``, ``convert``, ``export``, ``serve``, ``bench``.

A user error (a bad argument, an unreadable file, a refused output path, a non-finite latent) prints one
line ``omniace: error: ...`` on stderr and exits with status 2, with no traceback; ``--debug`` shows it.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
import time
from pathlib import Path
from typing import Callable

import torch

from .config import ACEConfig, PRESETS, get_config
from .imageio import decode_image
from .lcu import MAX_INDICATORS
from .model import build_model, count_parameters
from .resize import RESIZE_MODES, pixel_budget
from .sampler import check_finite, check_int

# what a user can cause: bad values and files (ValueError, OSError), a missing extra (ImportError),
# a model that overflowed (FloatingPointError). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``, exit 2; ``--help`` shows the usage) and negative
    values (``--guidance -inf``, ``--size -64x64``) read as values, so their own checks can name them."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _arg(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type=``: ``check``'s ValueError becomes argparse's one-line usage error (exit 2)."""
    def convert(text: str) -> object:
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = check.__name__
    return convert


def _int(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
    return check_int(value, name, minimum)


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (``x`` or ``X``) in positive integer pixels."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{name} {text!r} is not WIDTHxHEIGHT in positive integer pixels, e.g. 512x384")
    return int(parts[0]), int(parts[1])


def _resolution(text: str) -> tuple[int, int]:
    """A side (square) or ``WIDTHxHEIGHT``."""
    if text.strip().isdigit() and int(text) > 0:
        return int(text), int(text)
    if "x" not in text.lower():
        raise ValueError(f"resolution {text!r} is neither a side nor WIDTHxHEIGHT in positive integer pixels, "
                         f"e.g. 512 or 512x384")
    return parse_size(text, "resolution")


def _float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a finite number, got {text!r}") from None
    return check_finite(value, name)


def _positive(text: str, name: str) -> float:
    value = _float(text, name)
    if value <= 0:
        raise ValueError(f"{name} must be a positive number, got {text!r}")
    return value


STEPS = _arg(lambda t: _int(t, "steps", 1))
SEED = _arg(lambda t: _int(t, "seed", 0))
PER_TASK = _arg(lambda t: _int(t, "per-task", 1))
IMAGES = _arg(lambda t: _int(t, "images", 0))
GUIDANCE = _arg(lambda t: _float(t, "guidance"))
SIZE = _arg(parse_size)
RESOLUTION = _arg(_resolution)
PORT = _arg(lambda t: check_int(_int(t, "port", 1), "port", 1, 65535))


def cmd_demo(args: argparse.Namespace) -> None:
    from omniace.train.eval import run

    from .pipeline import EditPipeline

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; expected a folder for the demo's table and grid")
    pipe = EditPipeline.pretrained(args.weights)
    pipe.sampler(args.steps)  # refuses a bad --steps before --out is made
    try:  # before the edits: a folder that cannot be made would otherwise fail only after all of them
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {args.out!r}: cannot make the folder ({err.strerror}); expected a folder for the "
                         f"demo's table and grid") from None
    print(f"omniace demo: {count_parameters(pipe.model):,}-parameter {type(pipe.cfg).__name__[:-6]} model trained "
          f"on the synthetic OmniEdit-style corpus, editing held-out scenes ({args.per_task} per task, "
          f"{args.steps} DDIM steps at the {pipe.timestep_spacing!r} spacing, guidance {args.guidance}) on "
          f"{torch.get_num_threads()} CPU thread(s)")
    t0 = time.perf_counter()
    run(pipe, out, per_task=args.per_task, steps=args.steps, guidance=args.guidance, seed=args.seed,
        grid_per_task=min(2, args.per_task), name="demo")
    print(f"done in {time.perf_counter() - t0:.1f}s; 'copy' columns score the unedited source as the output")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export_config(path: Path, preset: str | None):
    """The config of a trainer export, from its ``omniace_config`` metadata (no tensor is read) or ``preset``."""
    import json

    from .config import config_from_dict
    from .model import config_metadata

    if path.is_file() and path.stat().st_size == 0:  # no --preset can help an empty file
        raise ValueError(f"--weights {str(path)!r} is an empty file, not a checkpoint")
    meta, why = config_metadata(path)
    if meta is None:
        if preset is None:
            raise ValueError(f"--weights {str(path)!r} {why}; pass --preset to name its config")
        return get_config(preset)
    try:
        return config_from_dict(json.loads(meta))
    except (ValueError, TypeError) as err:
        raise ValueError(f"--weights {str(path)!r}: its omniace_config metadata does not describe a model "
                         f"({err})") from None


def _load_pipeline(args: argparse.Namespace, dtype: torch.dtype):
    """The pipeline ``--weights`` names when it cannot be checked before loading: a pipeline folder
    (``EditPipeline.from_pretrained``) or a latent-space model with ``--text-encoder`` and ``--vae``."""
    from .codec import AutoencoderKLCodec
    from .model import load_model
    from .pipeline import EditPipeline
    from .text import T5TextEncoder

    if Path(args.weights).is_dir():  # a diffusers SD3/SD3.5 pipeline folder or an ACE folder
        return EditPipeline.from_pretrained(args.weights, device=args.device, dtype=dtype, preset=args.preset)
    model = load_model(args.weights, args.preset)
    # a preset's own pixel budget (ace-0.6b-512 shares the 1024 px model's config)
    max_pixels = pixel_budget(args.preset)[0] if args.preset else None
    return EditPipeline(model, T5TextEncoder(args.text_encoder, device=args.device, dtype=dtype),
                        AutoencoderKLCodec(args.vae, device=args.device, dtype=dtype), device=args.device, dtype=dtype,
                        max_pixels=max_pixels)


def cmd_edit(args: argparse.Namespace) -> None:
    from .pipeline import Turn, check_device, check_mask_alpha, check_output_path

    # every check a user can fail comes before the model is loaded
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.exists():
        raise ValueError(f"--weights {args.weights!r} is not a file or a folder; expected a trainer export "
                         f"(.safetensors) or a pipeline folder")
    if weights is not None and weights.is_dir() and (args.text_encoder or args.vae):
        raise ValueError(f"--weights {args.weights!r} is a pipeline folder: it holds its own text encoder and VAE; "
                         f"drop --text-encoder and --vae")
    if weights is not None and (args.text_encoder is None) != (args.vae is None):
        raise ValueError(f"--weights {args.weights!r}: --text-encoder and --vae go together (a latent-space model); "
                         f"give neither for a trainer export of a pixel-space preset")
    if weights is None and (args.text_encoder or args.vae):
        raise ValueError("--text-encoder and --vae go with --weights (the model they encode for)")
    untrained = weights is None and args.family == "sd3"  # no trained SD3 default ships
    if untrained and not args.allow_untrained:
        raise ValueError("--family sd3 without --weights is an untrained tiny EditNet: its output is noise; pass "
                         "--weights (a trainer export or a pipeline folder), or --allow-untrained to sample it "
                         "anyway (shapes and timing)")
    if args.size and args.image:
        raise ValueError(f"--size {args.size[0]}x{args.size[1]} is for text-to-image; an edit keeps the size "
                         f"of its first --image")
    if not args.image and not args.size:
        raise ValueError("text-to-image (no --image) needs --size WIDTHxHEIGHT")
    check_device(args.device)
    dtype = DTYPES[args.dtype]
    out, missing = check_output_path(args.out, inputs=args.image + args.mask, force=args.force)
    images = [decode_image(p, f"--image {p}") for p in args.image]
    for p in args.mask:
        check_mask_alpha(p, f"--mask {p}")
    masks = [decode_image(p, f"--mask {p}").convert("L") for p in args.mask]
    turn = Turn(args.instruction, images, masks + [None] * (len(images) - len(masks)), args.resize)
    try:
        result = _edit(args, weights, untrained, dtype, turn, images, masks)
    except ValueError as err:  # the pipeline counts images and masks from 0: name the files given
        raise ValueError(_name_files(str(err), args)) from None
    try:
        if missing is not None:
            missing.mkdir(parents=True, exist_ok=True)
            print(f"created folder {missing}")
        result.save(out)
    except OSError as err:
        raise OSError(f"--out {str(out)!r}: cannot write it ({err.strerror or err})") from None
    print(f"wrote {out}")


def _edit(args: argparse.Namespace, weights: Path | None, untrained: bool, dtype: torch.dtype, turn,
          images: list, masks: list):
    """The memory check (from the sizes, before loading anything big), the pipeline, the edit."""
    from .memory import GIB, available_memory, check_memory
    from .pipeline import DEFAULT_WEIGHTS, EditPipeline
    limit = int(args.max_memory * GIB) if args.max_memory is not None else available_memory(args.device)
    where = f"free on {args.device}" if args.max_memory is None else "allowed by --max-memory"
    if weights is not None and (weights.is_dir() or args.text_encoder):
        pipe = _load_pipeline(args, dtype)  # its config is known once loaded; the weights are then resident
        check_memory(pipe.memory_estimate(turn, args.size, args.guidance, device=args.device), limit, where)
    else:
        cfg = get_config("sd3-tiny-editnet") if untrained else _export_config(weights or DEFAULT_WEIGHTS, args.preset)
        if cfg.codec_factor != 4:
            raise ValueError(f"--weights {args.weights!r} is a latent-space {cfg.family} model (codec factor "
                             f"{cfg.codec_factor}); give --text-encoder and --vae with it, or a pipeline folder")
        estimate = EditPipeline.dry(cfg, dtype).memory_estimate(turn, args.size, args.guidance,
                                                                weights_resident=False, device=args.device)
        check_memory(estimate, limit, where)
        if untrained:
            warnings.warn("sampling an untrained tiny SD3 EditNet (--allow-untrained): the output is noise")
            pipe = EditPipeline.tiny("sd3", device=args.device, dtype=dtype)
        else:
            pipe = EditPipeline.pretrained(weights, device=args.device, dtype=dtype, preset=args.preset)
    # guidance None: the pipeline's default (1.0 for the embedded default, validated; ACE's 4.5 otherwise)
    return pipe.edit(images or None, args.instruction, masks=masks, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, size=args.size, truncate=args.truncate, resize=args.resize)[0]


def _name_files(message: str, args: argparse.Namespace) -> str:
    """``mask 0 (for image 0) ...`` / ``image 1: ...`` as ``--mask m.png (for --image a.png) ...``."""
    message = re.sub(r"^mask (\d+) \(for image \d+\)",
                     lambda m: f"--mask {args.mask[int(m[1])]} (for --image {args.image[int(m[1])]})", message)
    return re.sub(r"^image (\d+):", lambda m: f"--image {args.image[int(m[1])]}:", message)


def cmd_info(args: argparse.Namespace) -> None:
    cfg = get_config(args.preset)
    with torch.device("meta"):
        model = build_model(cfg)
    f = cfg.codec_factor * cfg.patch_size
    w, h = args.resolution
    if isinstance(cfg, ACEConfig) and args.images > MAX_INDICATORS - 1:
        raise ValueError(f"--images {args.images}: an ACE request takes at most {MAX_INDICATORS - 1} condition images")
    if w % f or h % f:
        raise ValueError(f"--resolution {w}x{h} is not a multiple of {f} pixels (patch x codec factor of "
                         f"{args.preset})")
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


def cmd_serve(args: argparse.Namespace) -> None:
    if args.ray:
        from omniace.export.ray_serve import RayServeConfig, run

        if args.max_replicas is not None and args.max_replicas < args.replicas:
            raise ValueError(f"--max-replicas {args.max_replicas} is below --replicas {args.replicas}")

        run(RayServeConfig(args.weights, args.device, args.cpus_per_replica, args.replicas,
                           max(args.replicas, args.max_replicas or args.replicas), backend=args.backend, artifact=args.artifact,
                           token_budget=args.token_budget, max_queue=args.max_queue), args.host, args.port,
            address=args.ray_address)
        return
    from omniace.export.http_app import serve
    from omniace.export.runtime import EditServer

    server = EditServer.pretrained(args.weights, device=args.device, backend=args.backend,
                                   token_budget=args.token_budget, max_queue=args.max_queue, artifact=args.artifact)
    serve(server, args.host, args.port)


def cmd_convert(args: argparse.Namespace) -> None:
    from .pipeline import check_output_path
    from .weights import convert

    dst, missing = check_output_path(args.dst, inputs=[args.src], force=args.force, suffixes=(".safetensors",),
                                     what="destination")
    n = convert(args.src, dst, args.family, args.preset)  # creates a missing folder only when it writes
    if missing is not None:
        print(f"created folder {missing}")
    print(f"wrote {n} tensors to {dst}")


def cmd_export(args: argparse.Namespace) -> None:
    from omniace.export.onnx import export_onnx

    from .model import load_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder for denoiser.onnx and its weights")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} is not empty; pass --force to replace its export")
    if args.tensorrt:  # the missing extra is what most machines lack: say so before the export's work
        from omniace.export.tensorrt import require_tensorrt

        require_tensorrt()
    if args.preset:
        from .model import config_metadata

        if config_metadata(args.weights)[0] is not None:
            raise ValueError(f"--preset {args.preset}: {args.weights} describes its own model (omniace_config "
                             f"metadata); --preset is for files without it")
    model = load_model(args.weights, args.preset)
    t0 = time.perf_counter()
    path = export_onnx(model, out, args.flavour, args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {path} ({args.flavour}, {args.dtype}; {size:.1f} MiB with external data) "
          f"in {time.perf_counter() - t0:.1f} s; checked with onnx.checker")
    if args.tensorrt:
        from omniace.export.onnx import weights_hash
        from omniace.export.tensorrt import build_engine, select_profiles

        profiles = select_profiles(model.cfg, args.token_budget, args.max_samples)
        engine = build_engine(path, out, args.tensorrt, profiles)
        print(f"wrote {engine} ({len(profiles)} optimisation profiles up to {args.token_budget} image tokens, "
              f"weights {weights_hash(model)[:12]})")


def build_parser() -> argparse.ArgumentParser:
    from .weights import FAMILIES

    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap = Parser(prog="omniace", description="instruction-based image editing engine")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    sub.add_parser("bench", help="op and denoiser benchmarks (omniace bench --help)")
    p = sub.add_parser("demo", parents=[common],
                       help="edit held-out scenes of every task with the embedded trained default")
    p.add_argument("--out", default="out", help="folder for demo.json and demo_grid.png (default out)")
    p.add_argument("--weights", help="another trainer export (default: the embedded ace-edit)")
    p.add_argument("--per-task", type=PER_TASK, default=4, help="held-out pairs (chains) per task (default 4)")
    # chosen on a validation split (generator seed 20000), not on the held-out one the demo reports
    p.add_argument("--steps", type=STEPS, default=10, help="DDIM steps (default 10)")
    p.add_argument("--guidance", type=GUIDANCE, default=1.0,
                   help="classifier-free guidance scale; 1.0, the default, runs one branch (no CFG)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed of the first request (default 0)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("edit", parents=[common], help="edit an image following an instruction")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--mask", action="append", default=[], help="white = edit; the size or aspect of its --image")
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", default="edited.png",
                   help="image file; its extension picks the format (default edited.png)")
    p.add_argument("--force", action="store_true", help="allow --out to overwrite an input image")
    p.add_argument("--family", choices=["ace", "sd3"], default="ace",
                   help="without --weights: ace is the embedded trained default; sd3 an untrained tiny EditNet "
                        "(needs --allow-untrained)")
    p.add_argument("--weights", help="a trainer export (pixel-space preset, built-in text encoder), a pipeline "
                                     "folder (EditPipeline.from_pretrained), or with --text-encoder and --vae a "
                                     "latent-space model's safetensors")
    p.add_argument("--allow-untrained", action="store_true",
                   help="sample an untrained model (--family sd3 without --weights); its output is noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's (and VAE's, T5's)")
    p.add_argument("--max-memory", type=_arg(lambda t: _positive(t, "max-memory")), default=None,
                   help="GiB a request may use (default: the device's free memory); a request whose estimate "
                        "(weights + activations, omniace.engine.memory) is larger is refused before sampling")
    p.add_argument("--text-encoder")
    p.add_argument("--vae")
    p.add_argument("--size", type=SIZE, help="WIDTHxHEIGHT for text-to-image")
    p.add_argument("--resize", choices=RESIZE_MODES, default="resize",
                   help="how an image off the model grid or over its pixel budget is fitted: resize it (aspect kept to "
                        "within a grid cell), crop its centre (the rest of the input is kept in the output), or take "
                        "it as it is (error: "
                        "a size off the grid is refused, and one on the grid is not scaled to the budget, only "
                        "refused past the model's token limit); the output has the input's size")
    p.add_argument("--steps", type=STEPS, default=20,
                   help="sampler steps (default 20; omniace demo's 10 did as well for the embedded default)")
    p.add_argument("--guidance", type=GUIDANCE, default=None,
                   help="default: the model's (1.0 for the embedded default, 4.5 for ACE checkpoints)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="with --weights: the model config for a file without omniace_config metadata (a converted "
                        "checkpoint)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed (default 0)")
    p.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="refuse an instruction longer than the text encoder keeps (default: cut it, warn)")
    p.set_defaults(fn=cmd_edit)
    p = sub.add_parser("info", parents=[common], help="parameters and FLOPs per denoising step of a preset")
    p.add_argument("--preset", default="ace-0.6b-512", choices=sorted(PRESETS))
    p.add_argument("--resolution", type=RESOLUTION, default="512", help="side or WIDTHxHEIGHT in pixels")
    p.add_argument("--images", type=IMAGES, default=1, help="condition images")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("convert", parents=[common], help="convert a checkpoint to self-describing safetensors "
                                                         "(config in the metadata: omniace edit needs no --preset)")
    p.add_argument("src", help="a checkpoint file, or with --family sd3 a diffusers transformer folder")
    p.add_argument("dst", help="a .safetensors file")
    p.add_argument("--family", choices=FAMILIES, default="ace")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the model config written with the weights (default: the family's preset whose shapes the "
                        "checkpoint fits; an sd3 folder's config.json; none for --family none)")
    p.add_argument("--force", action="store_true", help="allow dst to replace src")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("export", parents=[common], help="export the denoiser to ONNX (extra 'export')")
    p.add_argument("--weights", required=True, help="a self-describing safetensors file (trainer export, convert)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the config of a file without omniace_config metadata")
    p.add_argument("--out", required=True, help="folder for denoiser.onnx, its .data weights and denoiser.json")
    p.add_argument("--flavour", choices=["portable", "plugin"], default="portable",
                   help="portable: standard ONNX ops, any runtime; plugin: omniace custom nodes for TensorRT")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--force", action="store_true", help="replace the export in a non-empty --out")
    p.add_argument("--tensorrt", choices=["fp32", "fp16", "bf16"],
                   help="also build a TensorRT engine of this precision in --out (extra 'trt'; needs a GPU)")
    p.add_argument("--token-budget", type=_arg(lambda t: _int(t, "token-budget", 1)), default=16384,
                   help="--tensorrt: the serving token budget the optimisation profiles cover")
    p.add_argument("--max-samples", type=_arg(lambda t: _int(t, "max-samples", 1)), default=8,
                   help="--tensorrt: samples (CFG branches of requests) per batched forward")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("serve", parents=[common], help="serve edits over HTTP (EditServer; extra 'serve')")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--weights", help="a trainer export (default: the embedded ace-edit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["torch", "torch-compile", "onnxruntime", "tensorrt"], default="torch")
    p.add_argument("--artifact", help="onnxruntime: an `omniace export` folder of these weights (default: export "
                                      "once into ~/.cache/omniace); tensorrt: the engine folder")
    p.add_argument("--token-budget", type=_arg(lambda t: _int(t, "token-budget", 1)), default=16384,
                   help="image tokens per batched forward")
    p.add_argument("--max-queue", type=_arg(lambda t: _int(t, "max-queue", 1)), default=64,
                   help="waiting requests beyond which the server answers 429")
    p.add_argument("--ray", action="store_true", help="scale out on Ray Serve (extra 'ray'): replicas behind one "
                                                      "HTTP endpoint, autoscaled on queue depth")
    p.add_argument("--replicas", type=_arg(lambda t: _int(t, "replicas", 1)), default=1,
                   help="--ray: replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=_arg(lambda t: _int(t, "max-replicas", 1)), default=None,
                   help="--ray: autoscale up to this many replicas on ongoing requests per replica")
    p.add_argument("--cpus-per-replica", type=_arg(lambda t: _float(t, "cpus-per-replica")), default=1.0,
                   help="--ray on the CPU: cores per replica (on a GPU: one GPU per replica)")
    p.add_argument("--ray-address", help="--ray: join this cluster (default: start a local one)")
    p.set_defaults(fn=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench CLI owns its own arguments
        from omniace.bench.cli import main as bench_main

        raise SystemExit(bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if not args.debug:  # a warning (a cut instruction) is one line too
        warnings.formatwarning = lambda message, category, *a, **k: f"omniace: warning: {message}\n"
    try:
        args.fn(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"omniace: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
