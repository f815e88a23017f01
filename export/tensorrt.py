"""TensorRT engines of the exported denoiser: optimisation profiles, engine build, engine cache, and a denoiser.

NOT RUN YET: TensorRT's builder cannot be installed on the machines this was written on, so everything that
calls TensorRT (:func:`build_engine`, :class:`TensorRTDenoiser` on a real engine, the plugin registration of
``trt_plugins``) is written to TensorRT's documented Python API and has never executed. What is tested
(``tests/test_tensorrt.py``): profile selection, the cache key and its refusals, the denoiser's profile
choice and tensor binding against a fake engine, the plugins' shape functions and their kernels'
compilation for sm_90, and the message naming the ``trt`` extra when TensorRT is missing.

- :func:`select_profiles`: optimisation profiles from the serving token budget (pure).
- :func:`build_engine`: ONNX (``portable`` or ``plugin`` flavour) -> serialized engine + JSON sidecar, cached.
- :class:`EngineKey` / :func:`check_engine`: a stale or mismatched engine is refused, naming what differs.
- :class:`TensorRTDenoiser`: EditServer's denoiser interface ``(PackedLCU, x [L_tgt, C*p*p], t [B]) -> out``.

Extra ``trt`` (``pip install 'omniace[trt]'``); TensorRT is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from omniace import require
from omniace.engine.lcu import MAX_INDICATORS

from .spec import BASE_DIMS, InputSpec, evaluate_dims, input_specs

PRECISIONS = ("fp32", "fp16", "bf16")
FLAVOURS = ("portable", "plugin")
SIDECAR_FORMAT = 1
MAX_FRAMES_PER_SAMPLE = MAX_INDICATORS  # ACE: the target and up to nine condition images (engine.lcu's limit)


def require_tensorrt(module: str = "tensorrt") -> ModuleType:
    """Import TensorRT (or ``tensorrt.plugin``); ImportError naming ``pip install 'omniace[trt]'`` if missing."""
    return require(module, "trt", "TensorRT engines (omniace.export.tensorrt)")


# --- optimisation profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """One optimisation profile: ``dims`` holds ``(base dim, min, opt, max)``; ``inputs`` holds
    ``(input name, min shape, opt shape, max shape)`` for every graph input, from ``evaluate_dims``."""

    dims: tuple[tuple[str, int, int, int], ...]
    inputs: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    def bounds(self) -> dict[str, tuple[int, int, int]]:
        return {name: (lo, opt, hi) for name, lo, opt, hi in self.dims}

    def violations(self, values: Mapping[str, int]) -> list[str]:
        """What of ``values`` (base dim -> size) falls outside this profile, e.g. ``["L_img=5000 > 4096"]``."""
        out = []
        for name, lo, _, hi in self.dims:
            if name not in values:
                out.append(f"{name} missing")
            elif values[name] < lo:
                out.append(f"{name}={values[name]} < {lo}")
            elif values[name] > hi:
                out.append(f"{name}={values[name]} > {hi}")
        return out

    def to_json(self) -> dict:
        return {"dims": [list(d) for d in self.dims],
                "inputs": [[n, list(a), list(b), list(c)] for n, a, b, c in self.inputs]}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(tuple((n, lo, opt, hi) for n, lo, opt, hi in d["dims"]),
                   tuple((n, tuple(a), tuple(b), tuple(c)) for n, a, b, c in d["inputs"]))


def used_dims(specs: list[InputSpec]) -> list[str]:
    """The base dims ``specs`` mention, in ``BASE_DIMS`` order."""
    names = {t for s in specs for d in s.dims if isinstance(d, str) for t in re.findall(r"[A-Za-z_]+", d)}
    unknown = names - set(BASE_DIMS)
    if unknown:
        raise ValueError(f"input specs use unknown dims {sorted(unknown)}; expected some of {BASE_DIMS}")
    return [d for d in BASE_DIMS if d in names]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def select_profiles(cfg, token_budget: int, max_samples: int, text_len: int | None = None, *, num_profiles: int = 3,
                    max_frames_per_sample: int | None = None, max_units_per_sample: int = 1,
                    opt_frame_tokens: int = 1024) -> list[Profile]:
    """Optimisation profiles for serving ``cfg`` (an ``ACEConfig`` or ``SD3Config``) under EditServer's budget.

    Args:
        token_budget: image tokens per forward (EditServer's ``token_budget``: every frame of every branch).
        max_samples: samples per forward (each CFG branch of a request is a sample).
        text_len: text tokens per condition unit (default ``cfg.text_len``).
        num_profiles: profiles over the image tokens, each doubling the last: the largest allows the whole
            budget, the smaller ones get kernels tuned for a lightly loaded server.
        max_frames_per_sample: frames (target + condition images) of one sample; default 10 for ACE (lcu's limit), 2 for
            an SD3 model that takes a condition image, else 1.
        max_units_per_sample: condition units per ACE sample (history turns + the current one).
        opt_frame_tokens: image tokens of a typical frame (1024: a 512 x 512 image, codec 8, patch 2): the
            opt point assumes a full budget of typical edits (target + one condition image).

    Per profile with image-token bound ``T``: ``L_img``, ``L_tgt`` <= T; ``L_cond`` <= T - 1 (a target token
    is always there; 0 allowed: generation without a condition image); ``B`` <= min(max_samples, T);
    ``F`` <= min(T, B * frames); ``L_txt`` <= B * units * text_len; ``L_ft`` <= F * text_len; every min is 1
    (``L_cond``: 0). Returns profiles in increasing ``T``. Raises ValueError naming a bad argument.
    """
    T = _positive_int(token_budget, "token_budget")
    n_max = _positive_int(max_samples, "max_samples")
    text = _positive_int(cfg.text_len if text_len is None else text_len, "text_len")
    _positive_int(num_profiles, "num_profiles")
    units = _positive_int(max_units_per_sample, "max_units_per_sample")
    frame_tokens = _positive_int(opt_frame_tokens, "opt_frame_tokens")
    with_cond = cfg.family == "ace" or cfg.concat_condition or cfg.editnet
    default_frames = MAX_FRAMES_PER_SAMPLE if cfg.family == "ace" else 2 if with_cond else 1
    frames = _positive_int(default_frames if max_frames_per_sample is None else max_frames_per_sample,
                           "max_frames_per_sample")
    if cfg.family != "ace":
        units = 1  # the SD3 family takes one condition unit per sample
    opt_frames = min(2, frames) if with_cond else 1
    specs = input_specs(cfg)
    names = used_dims(specs)
    caps = sorted({math.ceil(T / 2 ** (num_profiles - 1 - k)) for k in range(num_profiles)})
    profiles = []
    for cap in caps:
        b_max = min(n_max, cap)
        f_max = min(cap, b_max * frames)
        b_opt = min(b_max, max(1, math.ceil(cap / (frame_tokens * opt_frames))))
        f_opt = min(f_max, b_opt * opt_frames)
        tgt_opt = max(1, cap // opt_frames)
        table = {  # (min, opt, max)
            "B": (1, b_opt, b_max), "F": (1, f_opt, f_max), "L_img": (1, cap, cap), "L_tgt": (1, tgt_opt, cap),
            "L_cond": (0, min(cap - 1, cap - tgt_opt), cap - 1),
            "L_txt": (1, b_opt * units * text, b_max * units * text),
            "L_ft": (1, f_opt * text, f_max * text),
        }
        dims = tuple((n, *table[n]) for n in names)
        point = [{n: v[i] for n, v in table.items()} for i in range(3)]
        inputs = tuple((s.name, *(evaluate_dims(s, p) for p in point)) for s in specs)
        profiles.append(Profile(dims, inputs))
    return profiles


def select_profile(profiles: list[Profile], values: Mapping[str, int]) -> int:
    """Index of the first (smallest) profile that holds base dim ``values``; ValueError saying why none does."""
    for i, p in enumerate(profiles):
        if not p.violations(values):
            return i
    why = "; ".join(f"profile {i}: {', '.join(p.violations(values))}" for i, p in enumerate(profiles))
    raise ValueError(f"the batch {dict(values)} fits no optimisation profile of the engine ({why}); lower the "
                     f"server's token budget or rebuild the engine with larger profiles")


def batch_dims(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Base dim values read off the graph inputs' shapes (plain names, and sums with one unknown: ``F+1``
    gives F), then checked against every input's spec. Raises ValueError naming a missing or inconsistent input."""
    values: dict[str, int] = {}
    for s in specs:
        if s.name not in shapes:
            raise ValueError(f"graph input {s.name!r} is missing; got {sorted(shapes)}")
        shape = tuple(shapes[s.name])
        if len(shape) != len(s.dims):
            raise ValueError(f"graph input {s.name!r} has shape {shape}; expected dims {s.dims}")
    pending = [(d, int(n)) for s in specs for d, n in zip(s.dims, shapes[s.name]) if isinstance(d, str)]
    progress = True
    while progress:  # solve each sum with one unknown name (``F+1`` gives F), until nothing new is learned
        progress = False
        for d, n in pending:
            terms = [t.strip() for t in d.split("+")]
            unknown = [t for t in terms if not t.isdigit() and t not in values]
            if len(unknown) == 1:
                values[unknown[0]] = n - sum(int(t) if t.isdigit() else values[t] for t in terms if t != unknown[0])
                progress = True
    for s in specs:
        want = evaluate_dims(s, values)
        if tuple(shapes[s.name]) != want:
            raise ValueError(f"graph input {s.name!r} has shape {tuple(shapes[s.name])}; expected {want} "
                             f"(dims {s.dims} with {values})")
    return values


# --- the engine cache -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for; any difference makes it unusable (a stale or foreign engine)."""

    weights_sha256: str  # the ONNX graph and its external weights (:func:`onnx_sha256`)
    flavour: str
    precision: str
    profiles: str  # canonical JSON of the profiles
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    @staticmethod
    def profiles_json(profiles: list[Profile]) -> str:
        return json.dumps([p.to_json() for p in profiles], sort_keys=True, separators=(",", ":"))

    def differences(self, found: "EngineKey") -> list[str]:
        """One line per field where ``found`` (the engine's) differs from this (the expected) key; profiles
        are shown as ``dim:min-opt-max`` per profile."""
        out = []
        for f in fields(self):
            want, got = getattr(self, f.name), getattr(found, f.name)
            if want != got:
                if f.name == "profiles":
                    want, got = _describe_profiles(want), _describe_profiles(got)
                out.append(f"{f.name}: engine has {_clip(got)!r}, expected {_clip(want)!r}")
        return out


def _clip(s: str, n: int = 240) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _describe_profiles(js: str) -> str:
    try:
        return " | ".join(" ".join(f"{n}:{lo}-{opt}-{hi}" for n, lo, opt, hi in p["dims"]) for p in json.loads(js))
    except (ValueError, KeyError, TypeError):
        return js


class StaleEngineError(ValueError):
    """An engine that may not be used here: missing sidecar, changed file, or a key that differs."""


def sidecar_path(engine: Path) -> Path:
    return Path(engine).with_suffix(".json")


def engine_path(out_dir: str | os.PathLike, flavour: str, precision: str) -> Path:
    return Path(out_dir) / f"denoiser.{flavour}.{precision}.engine"


def _sha256_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h


def onnx_sha256(onnx_path: str | os.PathLike) -> str:
    """sha256 over the ONNX file and every external-data file it names (sorted), in that order."""
    onnx = require("onnx", "export", "reading an ONNX graph")

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    h = _sha256_file(path)
    for loc in locations:
        if not (path.parent / loc).is_file():
            raise FileNotFoundError(f"{path}: external data {loc!r} is missing beside it")
        h.update(loc.encode())
        _sha256_file(path.parent / loc, h)
    return h.hexdigest()


def write_sidecar(engine: Path, key: EngineKey) -> Path:
    """Record ``key`` and the engine file's sha256 beside ``engine``."""
    side = sidecar_path(engine)
    data = {"format": SIDECAR_FORMAT, "key": asdict(key), "engine_sha256": _sha256_file(Path(engine)).hexdigest(),
            "engine_bytes": Path(engine).stat().st_size}
    side.write_text(json.dumps(data, indent=1, sort_keys=True))
    return side


def read_sidecar(engine: Path) -> tuple[EngineKey, dict]:
    """The key recorded beside ``engine`` and the whole sidecar; StaleEngineError if absent or unreadable."""
    engine = Path(engine)
    side = sidecar_path(engine)
    if not engine.is_file():
        raise StaleEngineError(f"no engine at {engine}")
    if not side.is_file():
        raise StaleEngineError(f"engine {engine} has no sidecar {side.name}: its build inputs are unknown; rebuild it")
    try:
        data = json.loads(side.read_text())
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {SIDECAR_FORMAT}")
        return EngineKey(**data["key"]), data
    except (ValueError, KeyError, TypeError) as err:
        raise StaleEngineError(f"sidecar {side} is unreadable ({err}); rebuild the engine") from None


def check_engine(engine: str | os.PathLike, expected: EngineKey) -> dict:
    """Refuse ``engine`` unless its sidecar's key equals ``expected`` and the file is the one that sidecar
    describes; raises StaleEngineError naming every field that differs. Returns the sidecar."""
    engine = Path(engine)
    found, data = read_sidecar(engine)
    problems = expected.differences(found)
    if not problems:
        digest = _sha256_file(engine).hexdigest()
        if digest != data.get("engine_sha256"):
            problems.append(f"engine file: sha256 {digest[:12]}... differs from its sidecar's "
                            f"{str(data.get('engine_sha256'))[:12]}... (changed after it was built)")
    if problems:
        raise StaleEngineError(f"engine {engine} refused: " + "; ".join(problems))
    return data


def device_identity(device: int | None = None) -> tuple[str, str]:
    """(GPU name, compute capability ``"major.minor"``) of a CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def current_key(onnx_path: str | os.PathLike, flavour: str, precision: str, profiles: list[Profile],
                weights_sha256: str | None = None, device: int | None = None) -> EngineKey:
    """The key an engine built here and now from ``onnx_path`` would have (needs TensorRT and a GPU)."""
    name, cc = device_identity(device)
    return EngineKey(weights_sha256 or onnx_sha256(onnx_path), flavour, precision, EngineKey.profiles_json(profiles),
                     require_tensorrt().__version__, name, cc)


# --- building ---------------------------------------------------------------------------------------------------
def _flavour_of(model) -> str:
    return "plugin" if any(n.domain == "omniace" for n in model.graph.node) else "portable"


def detect_flavour(onnx_path: str | os.PathLike) -> str:
    """``plugin`` if the graph has nodes of the ``omniace`` domain, else ``portable``."""
    onnx = require("onnx", "export", "reading an ONNX graph")

    return _flavour_of(onnx.load(str(onnx_path), load_external_data=False))


def _check_build_args(onnx_path: Path, precision: str, profiles: list[Profile], flavour: str | None):
    """Everything build_engine can refuse before TensorRT is touched; returns the ONNX model (no weights)."""
    onnx = require("onnx", "export", "reading an ONNX graph")

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if flavour is not None and flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}; expected one of {FLAVOURS}")
    if not profiles or not all(isinstance(p, Profile) for p in profiles):
        raise ValueError(f"profiles must be a non-empty list of Profile (see select_profiles), got {profiles!r}")
    names = [{n for n, *_ in p.inputs} for p in profiles]
    if any(n != names[0] for n in names):
        raise ValueError("profiles must cover the same graph inputs")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    detected = _flavour_of(model)
    if flavour not in (None, detected):
        raise ValueError(f"flavour {flavour!r}, but {onnx_path} is a {detected!r} graph "
                         f"({'no' if detected == 'portable' else 'some'} nodes of the omniace domain)")
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    if graph_inputs != names[0]:
        raise ValueError(f"{onnx_path}: graph inputs {sorted(graph_inputs)} differ from the profiles' "
                         f"(missing {sorted(names[0] - graph_inputs)}, extra {sorted(graph_inputs - names[0])}); "
                         f"were the profiles selected for this model's config?")
    return model


def build_engine(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp16",
                 profiles: list[Profile] | None = None, *, flavour: str | None = None,
                 weights_sha256: str | None = None, workspace_bytes: int | None = None, rebuild: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) a serialized TensorRT engine of an exported denoiser. NOT RUN YET (see the module doc).

    ``precision`` ``fp32 | fp16 | bf16`` (BuilderFlag.FP16 / BF16 let TensorRT pick those kernels; plugin
    I/O follows). ``profiles`` from :func:`select_profiles`, for the same model config (their inputs must be
    the graph's). ``flavour`` is read from the graph (a given one must agree with it); the ``plugin`` flavour
    registers the omniace plugins (``trt_plugins``) and adapts the graph for them. An engine in ``out_dir``
    whose sidecar matches the key is reused; a mismatched or changed one is rebuilt (the log says which
    fields differ); ``rebuild=True`` always rebuilds. Returns the engine path; the sidecar lies beside it.
    Raises ValueError/FileNotFoundError for bad arguments before TensorRT is touched, ImportError naming the
    ``trt`` extra without TensorRT, RuntimeError with the parser's or builder's errors.
    """
    onnx_path = Path(onnx_path)
    model = _check_build_args(onnx_path, precision, profiles or [], flavour)
    flavour = _flavour_of(model)
    trt = require_tensorrt()
    out = engine_path(out_dir, flavour, precision)
    key = current_key(onnx_path, flavour, precision, profiles, weights_sha256)
    if out.exists() and not rebuild:
        try:
            check_engine(out, key)
            log(f"tensorrt: reusing {out}")
            return out
        except StaleEngineError as err:
            log(f"tensorrt: rebuilding, {err}")

    if flavour == "plugin":
        from .trt_plugins import adapt_plugin_graph, register_plugins

        major, minor = (int(v) for v in key.compute_capability.split("."))
        register_plugins(10 * major + minor)
        max_b = max(p.bounds().get("B", (1, 1, 1))[2] for p in profiles)
        adapt_plugin_graph(model, max_segments=max_b)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # path: where the parser finds the external weights (beside the original file)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, lo, opt, hi in p.inputs:
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    log(f"tensorrt: building {out.name} ({flavour}, {precision}, {len(profiles)} profile(s)); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".engine.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, out)
    write_sidecar(out, key)
    return out


# --- serving ----------------------------------------------------------------------------------------------------
class TensorRTDenoiser:
    """EditServer's denoiser interface over a TensorRT engine: ``(batch, x [L_tgt, C*p*p], t [B], x0_prev=None)
    -> out`` (``x0_prev``: a self-conditioning model's previous estimate, None for zeros).

    NOT RUN YET on a real engine (see the module doc); the binding logic is tested against a fake engine.
    Each call builds the graph inputs with ``omniace.export.onnx.graph_inputs(model_cfg, batch, x, t, x0_prev=)``,
    reads the base dims off them, selects the smallest profile that holds them (ValueError naming the dims
    that fit none), sets every input's shape and address, allocates the output, and runs
    ``execute_async_v3`` on the current CUDA stream. Returns the output in ``x``'s dtype.
    """

    def __init__(self, engine, model_cfg, profiles: list[Profile], stream: Callable[[], int] | None = None,
                 device: str | torch.device = "cuda"):
        self.engine, self.cfg, self.profiles = engine, model_cfg, profiles
        self.specs = input_specs(model_cfg)
        self.context = engine.create_execution_context()
        self.device = torch.device(device)
        self._stream = stream or (lambda: torch.cuda.current_stream(self.device).cuda_stream)
        self._profile: int | None = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._outputs = [n for n in names if self._is_output(n)]
        missing = {s.name for s in self.specs} - set(names)
        if missing or len(self._outputs) != 1:
            raise ValueError(f"the engine's I/O {names} does not match {model_cfg.family}'s graph: missing inputs "
                             f"{sorted(missing)}, outputs {self._outputs} (expected one)")

    def _is_output(self, name: str) -> bool:
        mode = self.engine.get_tensor_mode(name)
        return getattr(mode, "name", str(mode)).endswith("OUTPUT")

    @classmethod
    def load(cls, engine_file: str | os.PathLike, model_cfg, expected: EngineKey | None = None,
             device: str | torch.device = "cuda") -> "TensorRTDenoiser":
        """Deserialize ``engine_file`` after checking its sidecar (against ``expected`` when given, else against
        this machine's TensorRT version and GPU); raises StaleEngineError naming what differs."""
        trt = require_tensorrt()
        found, _ = read_sidecar(Path(engine_file))
        if expected is None:
            name, cc = device_identity()
            expected = EngineKey(**{**asdict(found), "tensorrt_version": trt.__version__, "gpu_name": name,
                                    "compute_capability": cc})
        check_engine(engine_file, expected)
        if found.flavour == "plugin":  # the plugin creators must be known when the engine is deserialized
            from .trt_plugins import register_plugins

            register_plugins()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(Path(engine_file).read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_file}")
        profiles = [Profile.from_json(p) for p in json.loads(found.profiles)]
        return cls(engine, model_cfg, profiles, device=device)

    def __call__(self, batch, x: Tensor, t: Tensor, x0_prev: Tensor | None = None) -> Tensor:
        from omniace.export.onnx import graph_inputs  # the lead's module: imported when first used

        inputs = graph_inputs(self.cfg, batch, x, t, x0_prev=x0_prev)
        values = batch_dims(self.specs, {k: tuple(v.shape) for k, v in inputs.items()})
        index = select_profile(self.profiles, values)
        stream = self._stream()
        if index != self._profile:
            self.context.set_optimization_profile_async(index, stream)
            self._profile = index
        keep = []  # converted inputs stay referenced until the launch is queued
        for s in self.specs:
            v = inputs[s.name].to(self.device, _torch_dtype(self.engine.get_tensor_dtype(s.name))).contiguous()
            keep.append(v)
            self.context.set_input_shape(s.name, tuple(v.shape))
            self.context.set_tensor_address(s.name, v.data_ptr())
        name = self._outputs[0]
        shape = tuple(self.context.get_tensor_shape(name))
        out = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)
        self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed (profile {index}, dims {values})")
        return out.to(x.dtype)


def _torch_dtype(trt_dtype) -> torch.dtype:
    """A TensorRT DataType (or its name) as a torch dtype."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    if name not in table:
        raise ValueError(f"TensorRT dtype {trt_dtype} has no torch equivalent here; expected one of {sorted(table)}")
    return table[name]


def denoiser_for_model(model, folder: str | os.PathLike, precision: str | None = None,
                       device: str | torch.device = "cuda") -> TensorRTDenoiser:
    """The engine in an ``omniace export`` folder (built there by :func:`build_engine`) for ``model``: the
    folder's export must come from the model's weights and config, and the engine from that export's graph
    (its key's ``weights_sha256`` is the graph's hash), this TensorRT and this GPU. ``precision`` picks among
    several engines. Raises ValueError (StaleEngineError) naming what differs, FileNotFoundError without one."""
    from .onnx import GRAPH_FILE
    from .onnxruntime import check_export

    folder = Path(folder)
    meta = check_export(model, folder)
    engines = sorted(folder.glob(f"denoiser.{meta['flavour']}.{precision or '*'}.engine"))
    if len(engines) != 1:
        raise FileNotFoundError(f"{folder}: {len(engines)} engines match precision {precision or 'any'} "
                                f"({[e.name for e in engines]}); build one with omniace export --tensorrt, or "
                                f"pass the precision")
    found, _ = read_sidecar(engines[0])
    trt = require_tensorrt()
    name, cc = device_identity()
    expected = EngineKey(**{**asdict(found), "weights_sha256": onnx_sha256(folder / GRAPH_FILE),
                            "tensorrt_version": trt.__version__, "gpu_name": name, "compute_capability": cc})
    return TensorRTDenoiser.load(engines[0], model.cfg, expected, device=device)
