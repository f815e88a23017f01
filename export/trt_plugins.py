"""The plugin flavour's three ops as TensorRT plugins run by the project's Triton kernels (written, not yet run).

Choice: TensorRT's Python plugin API (``tensorrt.plugin``, "quickly deployable plugins") with an
ahead-of-time implementation (``@trt.plugin.aot_impl``) whose PTX comes from the same Triton kernels that
back training (``kernels/triton_{rope,attention,inject}.py``), rather than the CUDA kernels of ``csrc/``
behind a C++ IPluginV3. Why: the PTX is embedded in the serialized engine (no plugin library to build, ship
and load; the engine runs without Python), the shape and type functions are plain Python (tested here), and
the kernels compile for sm_90 with no GPU, so the compilation is checked in CI (``tests/test_tensorrt.py``).

What the AOT interface imposes, and how it is met without touching ``kernels/``:
- TensorRT launches ``kernel(inputs..., extra int32 args..., outputs...)``; our kernels interleave inputs,
  outputs, strides and float scalars. Each op has a small ``@triton.jit`` adapter here in that order, which
  calls the project kernel (Triton inlines it); strides of TensorRT's contiguous tensors (attention's in
  units of the launcher's ``row_align``) and the float attributes (theta via ``inv_freq``, scale, eps) are
  compile-time constants, token and segment counts are the int32 extra args, read from the input shapes at
  run time. Pointers are compiled as 16-byte aligned, as the JIT compiles the launchers' (TensorRT's
  tensors are 256-byte aligned), so the plugin kernels are the launchers' code.
- An AOT plugin has no workspace, so the kernels' side outputs are declared plugin outputs: attention's
  log-sum-exp ``[Lq, H]`` fp32, the injection's per-row mean and 1/std ``[L]`` fp32 (unused downstream),
  and rope's inverse frequencies ``[P]`` fp32 are an input. :func:`adapt_plugin_graph` adds these to the
  exported ONNX nodes (and ``max_segments``, the segment bound the injection kernel is compiled for), so
  the ONNX contract of ``export/onnx.py`` stays as it is.
- Triton >= 3.3 appends two scratch pointers to every kernel's parameters, which TensorRT does not pass;
  they are never read when the kernel needs no scratch, which the compile check (:func:`main`) requires.
- The attention grid cannot use the batch's longest segment (a host int unknown to TensorRT): it covers
  ``cdiv(Lq, BLOCK_M)`` query blocks per segment and blocks past a segment's end return at once, and it
  always takes the general (multi-key-tile) path, correct for any key length.
"""
# No ``from __future__ import annotations``: tensorrt.plugin reads the registered functions' type hints.
import math
from dataclasses import dataclass
from typing import Any, List, Tuple

import numpy as np
import numpy.typing as npt
import torch
import triton
import triton.language as tl

from omniace.kernels.triton_attention import _attn_fwd_kernel
from omniace.kernels.triton_inject import _inject_fwd_kernel
from omniace.kernels.triton_rope import _rope3d_kernel

NAMESPACE = "omniace"
OPS = ("Rope3D", "SegmentAttention", "EditNetInject")  # ONNX op types in domain ``omniace`` = plugin names
# per plugin: input kinds, extra int32 kernel args, output kinds; "T" is the op's float type (fp32/fp16/bf16)
PLUGIN_IO = {
    "Rope3D": (("T", "T", "INT32", "FP32"), 1, ("T", "T")),  # q, k, pos, inv_freq -> q_out, k_out; L
    "SegmentAttention": (("T", "T", "T", "INT32", "INT32"), 0, ("T", "FP32")),  # q, k, v, cu_q, cu_k -> out, lse
    "EditNetInject": (("T",) * 5 + ("INT32",), 1, ("T", "T", "FP32", "FP32")),  # -> h_out, y, mean, rstd; S
}
ADDED_INPUTS = {"Rope3D": ("inv_freq",)}  # what adapt_plugin_graph adds to export/onnx.py's nodes
SIDE_OUTPUTS = {"SegmentAttention": ("lse",), "EditNetInject": ("mean", "rstd")}
FLOAT_COMBOS = ("FP32", "FP16", "BF16")
FLOAT_TYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def io_types(op: str) -> str:
    """The plugin's type combinations for ``AutoTuneCombination``: every float I/O in one type, in each of
    fp32, fp16, bf16 (``|`` marks dependent positions, so a fixed position repeats its type)."""
    ins, _, outs = PLUGIN_IO[op]
    return ",".join("|".join(FLOAT_COMBOS if k == "T" else [k] * len(FLOAT_COMBOS)) for k in ins + outs)


# --- shape and type functions (pure Python: TensorRT calls them through register_plugins) ---------------------
@dataclass(frozen=True)
class Desc:
    """A tensor descriptor: ``shape`` holds ints where known and TensorRT's symbolic dims otherwise (only the
    ints are checked); ``dtype`` is ``"float32" | "float16" | "bfloat16" | "int32"``."""

    shape: tuple
    dtype: str


def _need(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {message}")


def _known(d: Any) -> int | None:
    return d if isinstance(d, int) else None


def _float_desc(op: str, name: str, d: Desc, rank: int) -> None:
    _need(d.dtype in FLOAT_TYPES, op, f"{name} must be one of {FLOAT_TYPES}, got {d.dtype}")
    _need(len(d.shape) == rank, op, f"{name} must have rank {rank}, got shape {d.shape}")


def _cu_desc(op: str, name: str, d: Desc) -> None:
    _need(d.dtype == "int32" and len(d.shape) == 1, op, f"{name} must be int32 [S+1], got {d.dtype} {d.shape}")


def rope3d_outputs(q: Desc, k: Desc, pos: Desc, inv_freq: Desc, axes_dims: tuple[int, ...],
                   theta: float) -> tuple[Desc, Desc]:
    """``(q_out, k_out)`` for q ``[L, H, D]``, k ``[L, Hk, D]``, pos int32 ``[L, 3]``, inv_freq fp32 ``[P]``
    (``P = sum(axes_dims) / 2``). Raises ValueError naming the input that breaks the contract."""
    op = "Rope3D"
    _float_desc(op, "q", q, 3)
    _float_desc(op, "k", k, 3)
    _need(q.dtype == k.dtype, op, f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    axes = tuple(int(a) for a in axes_dims)
    _need(len(axes) == 3 and all(a >= 0 and a % 2 == 0 for a in axes), op,
          f"axes_dims must be three non-negative even ints, got {axes}")
    _need(math.isfinite(theta) and theta > 0, op, f"theta must be a positive number, got {theta}")
    D = _known(q.shape[2])
    _need(D is not None and _known(k.shape[2]) == D, op,
          f"q and k need the same static head dim, got {q.shape[2]} and {k.shape[2]}")
    _need(sum(axes) <= D, op, f"sum(axes_dims)={sum(axes)} exceeds the head dim {D}")
    _need(_known(q.shape[1]) is not None and _known(k.shape[1]) is not None, op, "head counts must be static")
    _need(pos.dtype == "int32" and len(pos.shape) == 2 and _known(pos.shape[1]) == 3, op,
          f"pos must be int32 [L, 3], got {pos.dtype} {pos.shape}")
    _need(inv_freq.dtype == "float32" and inv_freq.shape == (sum(axes) // 2,), op,
          f"inv_freq must be float32 [{sum(axes) // 2}], got {inv_freq.dtype} {inv_freq.shape}")
    return Desc(q.shape, q.dtype), Desc(k.shape, k.dtype)


def segment_attention_outputs(q: Desc, k: Desc, v: Desc, cu_q: Desc, cu_k: Desc, scale: float) -> tuple[Desc, Desc]:
    """``(out [Lq, H, D] in q's dtype, lse [Lq, H] fp32)`` for q ``[Lq, H, D]``, k and v ``[Lk, H, D]``."""
    op = "SegmentAttention"
    for name, d in (("q", q), ("k", k), ("v", v)):
        _float_desc(op, name, d, 3)
    _need(q.dtype == k.dtype == v.dtype, op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _need(all(_known(d) is not None for d in q.shape[1:]), op, f"q's heads and head dim must be static, got {q.shape}")
    _need(k.shape[1:] == q.shape[1:] and v.shape[1:] == q.shape[1:], op,
          f"k and v must be [Lk, H, D] with q's H and D; q {q.shape}, k {k.shape}, v {v.shape}")
    _cu_desc(op, "cu_seqlens_q", cu_q)
    _cu_desc(op, "cu_seqlens_k", cu_k)
    _need(math.isfinite(scale) and scale > 0, op, f"scale must be a positive number, got {scale}")
    return Desc(q.shape, q.dtype), Desc(q.shape[:2], "float32")


def editnet_inject_outputs(h: Desc, ctrl: Desc, shift: Desc, scale: Desc, gate: Desc, cu: Desc, eps: float,
                           max_segments: int) -> tuple[Desc, Desc, Desc, Desc]:
    """``(h_out, y, mean, rstd)``: h_out and y like h ``[L, C]``; mean and rstd ``[L]`` fp32 (the kernel's
    saved statistics). shift, scale, gate are ``[S, C]``; ``S <= max_segments``."""
    op = "EditNetInject"
    _float_desc(op, "h", h, 2)
    _need(_known(h.shape[1]) is not None, op, f"h's channel dim must be static, got {h.shape}")
    _need(ctrl.shape == h.shape and ctrl.dtype == h.dtype, op,
          f"ctrl must match h {h.dtype} {h.shape}, got {ctrl.dtype} {ctrl.shape}")
    for name, d in (("shift", shift), ("scale", scale), ("gate", gate)):
        _float_desc(op, name, d, 2)
        _need(d.dtype == h.dtype and d.shape[1] == h.shape[1], op,
              f"{name} must be [S, {h.shape[1]}] {h.dtype}, got {d.dtype} {d.shape}")
    _cu_desc(op, "cu_seqlens", cu)
    _need(math.isfinite(eps) and eps > 0, op, f"eps must be a positive number, got {eps}")
    _need(isinstance(max_segments, int) and max_segments >= 1, op,
          f"max_segments must be an int >= 1, got {max_segments!r}")
    stats = Desc(h.shape[:1], "float32")
    return Desc(h.shape, h.dtype), Desc(h.shape, h.dtype), stats, stats


# --- launch geometry: grid and extra int32 args; works on ints and on TensorRT's symbolic dims --------------
def _cdiv(a, b: int):
    return -(-a // b)


def rope3d_launch(L, H: int, HK: int, meta: dict, cdiv=_cdiv) -> tuple[tuple, tuple]:
    """``(grid, extra_args)`` of the rope adapter for ``L`` tokens (an int, or a TensorRT shape expression
    with ``cdiv=trt.plugin.cdiv``)."""
    return (cdiv(L, meta["BLOCK_L"]), _cdiv(H + HK, meta["HEADS_PER_PROG"]), 1), (L,)


def segment_attention_launch(Lq, cu_len, H: int, meta: dict, cdiv=_cdiv) -> tuple[tuple, tuple]:
    """``(grid, extra_args)``: ``cdiv(Lq, BLOCK_M)`` query blocks (a bound on every segment) x segments x heads."""
    return (cdiv(Lq, meta["BLOCK_M"]), cu_len - 1, H), ()


def editnet_inject_launch(L, cu_len, meta: dict) -> tuple[tuple, tuple]:
    """``(grid, extra_args)``: one program per row; the segment count is the extra arg."""
    return (L, 1, 1), (cu_len - 1,)


# --- the adapters: TensorRT's argument order (inputs, extra int32 args, outputs) around the project kernels ----
@triton.jit
def trt_rope3d(q, k, pos, inv_freq, L, qo, ko, H: tl.constexpr, HK: tl.constexpr, SIGN: tl.constexpr,
               P0: tl.constexpr, P1: tl.constexpr, P: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
               BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, HAS_REST: tl.constexpr,
               HEADS_PER_PROG: tl.constexpr):
    # q/k row and head strides in units of ALIGN, as the launcher passes them; pos's row stride in elements
    _rope3d_kernel(q, k, qo, ko, pos, inv_freq, L, H, HK, H * D // ALIGN, D // ALIGN, HK * D // ALIGN, D // ALIGN,
                   3, SIGN, P0, P1, P, D, ALIGN, BLOCK_L, BLOCK_P, BLOCK_R, HAS_REST, HEADS_PER_PROG)


@triton.jit
def trt_segment_attention(Q, K, V, cu_q, cu_k, O, LSE, H: tl.constexpr, QK_SCALE: tl.constexpr,
                          D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                          PREC: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          Q_BLOCKS: tl.constexpr, ONE_KV: tl.constexpr):
    # row/head strides in units of ALIGN, as the launcher passes them (ALIGN divides both: row_align);
    # the lse row stride is in elements
    _attn_fwd_kernel(Q, K, V, O, LSE, cu_q, cu_k, QK_SCALE, H * D // ALIGN, D // ALIGN, H * D // ALIGN,
                     D // ALIGN, H * D // ALIGN, D // ALIGN, H * D // ALIGN, D // ALIGN, H,
                     D, D0, D1, HAS_D1, PREC, ALIGN, BLOCK_M, BLOCK_N, Q_BLOCKS, ONE_KV)


@triton.jit
def trt_editnet_inject(h, ctrl, shift, scale, gate, cu, S, h_out, y, mean, rstd, C: tl.constexpr,
                       EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    _inject_fwd_kernel(h, ctrl, shift, scale, gate, cu, h_out, y, mean, rstd, C, S, EPS, C, C, BLOCK_C, BLOCK_S)


@dataclass
class PluginKernel:
    """One compiled adapter: what ``aot_impl`` returns to TensorRT, plus its compile-time parameters."""

    op: str
    name: str
    ptx: str
    num_warps: int
    shared: int  # bytes of shared memory per block
    scratch: int  # global + profile scratch bytes; must be 0 (TensorRT passes no scratch pointers)
    meta: dict  # constexprs


def _compile(op: str, fn, pointers: dict[str, str], ints: tuple[str, ...], meta: dict, arch: int) -> PluginKernel:
    """Lower adapter ``fn`` for ``arch`` (``triton_aot``'s way): the named pointers and int32 args, every
    other argument a constexpr from ``meta`` (which also holds ``num_warps`` / ``num_stages``).

    Pointers carry the JIT's 16-byte alignment specialisation, as at every launcher call (torch
    allocations), so the kernels keep their vector loads and ``cp.async``: TensorRT requires 256-byte
    aligned I/O addresses and allocates its internal tensors itself. The int32 args are left unspecialised
    (the JIT would specialise them on their run-time values, unknown here).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    consts = {k: v for k, v in meta.items() if k not in options}
    sig = {a: pointers[a] if a in pointers else "i32" if a in ints else "constexpr" for a in fn.arg_names}
    aligned = make_backend(target).parse_attr("D")  # the JIT's spelling of "divisible by 16"
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()},
                    {(fn.arg_names.index(a),): aligned for a in pointers})
    compiled = triton.compile(src, target=target, options=options)
    md = compiled.metadata
    scratch = int(getattr(md, "global_scratch_size", 0) or 0) + int(getattr(md, "profile_scratch_size", 0) or 0)
    return PluginKernel(op, md.name, compiled.asm["ptx"], options["num_warps"], int(md.shared), scratch, consts)


def rope3d_meta(H: int, HK: int, D: int, axes_dims: tuple[int, int, int], dtype: str = "float32") -> dict:
    from omniace.kernels import triton_attention as ta
    from omniace.kernels.triton_rope import rope_meta

    align = ta.row_align(TORCH_DTYPE[dtype], (H * D, D, HK * D, D))  # contiguous q, k, as TensorRT passes them
    return dict(H=H, HK=HK, **rope_meta(tuple(axes_dims), D, H, HK, inverse=False, align=align))


def segment_attention_meta(dtype: str, H: int, D: int, scale: float) -> dict:
    from omniace.kernels import triton_attention as ta

    # general path: the key length is a run-time shape; max_k above SHORT_KEYS selects the multi-tile config
    dt = TORCH_DTYPE[dtype]
    cfg = ta.forward_config(D, 4096, ta.SHORT_KEYS + 1, 1, H, dt, interpret=False)
    align = ta.row_align(dt, (H * D, D) * 4)  # q, k, v, out: contiguous [L, H, D], as TensorRT passes them
    return dict(H=H, QK_SCALE=float(scale) * ta.LOG2E, **ta.forward_meta(dt, D, cfg, one_kv=False, align=align))


def editnet_inject_meta(C: int, eps: float, max_segments: int) -> dict:
    from omniace.kernels.triton_inject import forward_meta

    return dict(C=C, EPS=float(eps), **forward_meta(C, max_segments))


def compile_rope3d(dtype: str, H: int, HK: int, D: int, axes_dims: tuple[int, int, int],
                   arch: int = 90) -> PluginKernel:
    T = TRITON_PTR[dtype]
    return _compile("Rope3D", trt_rope3d, dict(q=T, k=T, pos="*i32", inv_freq="*fp32", qo=T, ko=T), ("L",),
                    rope3d_meta(H, HK, D, axes_dims, dtype), arch)


def compile_segment_attention(dtype: str, H: int, D: int, scale: float, arch: int = 90) -> PluginKernel:
    T = TRITON_PTR[dtype]
    return _compile("SegmentAttention", trt_segment_attention,
                    dict(Q=T, K=T, V=T, cu_q="*i32", cu_k="*i32", O=T, LSE="*fp32"), (),
                    segment_attention_meta(dtype, H, D, scale), arch)


def compile_editnet_inject(dtype: str, C: int, eps: float, max_segments: int, arch: int = 90) -> PluginKernel:
    T = TRITON_PTR[dtype]
    ptrs = dict(h=T, ctrl=T, shift=T, scale=T, gate=T, cu="*i32", h_out=T, y=T, mean="*fp32", rstd="*fp32")
    return _compile("EditNetInject", trt_editnet_inject, ptrs, ("S",), editnet_inject_meta(C, eps, max_segments),
                    arch)


# --- the ONNX side: what the plugins need beyond export/onnx.py's node contract ------------------------------
def adapt_plugin_graph(model, max_segments: int):
    """Prepare a plugin-flavour ONNX model (``onnx.ModelProto``, changed in place and returned) for TensorRT.

    Per ``omniace`` node: ``plugin_namespace="omniace"`` (how TensorRT's ONNX parser finds the plugin);
    Rope3D gets its fp32 inverse frequencies as a 4th input (an initializer formed from axes_dims and theta
    exactly as the kernels' ``rope3d_inv_freq``); SegmentAttention and EditNetInject get the kernels' side
    outputs (:data:`SIDE_OUTPUTS`, unused by the graph); EditNetInject gets ``max_segments`` (the kernel's
    segment bound: the largest sample count of any optimisation profile). A node already adapted is left
    as it is. Raises ValueError for a node whose inputs or outputs do not have the expected count.
    """
    from onnx import helper, numpy_helper

    from omniace.kernels.reference import rope3d_inv_freq

    expected = {op: (len(ins) - len(ADDED_INPUTS.get(op, ())), len(outs) - len(SIDE_OUTPUTS.get(op, ())))
                for op, (ins, _, outs) in PLUGIN_IO.items()}
    graph = model.graph
    existing = {t.name for t in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.domain != NAMESPACE:
            continue
        if node.op_type not in expected:
            raise ValueError(f"node {node.name or i}: unknown {NAMESPACE} op {node.op_type!r}; expected one of {OPS}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "plugin_namespace" in attrs:
            continue
        n_in, n_out = expected[node.op_type]
        if (len(node.input), len(node.output)) != (n_in, n_out):
            raise ValueError(f"node {node.name or i} ({node.op_type}): {len(node.input)} inputs and {len(node.output)} "
                             f"outputs; expected {n_in} and {n_out}")
        node.attribute.append(helper.make_attribute("plugin_namespace", NAMESPACE))
        base = node.name or f"{node.op_type}_{i}"
        if node.op_type == "Rope3D":
            axes, theta = tuple(int(a) for a in attrs["axes_dims"]), float(attrs["theta"])
            name = f"omniace_inv_freq_{'_'.join(map(str, axes))}_{theta!r}"  # repr: one name per exact theta
            if name not in existing:
                graph.initializer.append(numpy_helper.from_array(
                    rope3d_inv_freq(axes, theta, torch.device("cpu")).numpy(), name))
                existing.add(name)
            node.input.append(name)
        for side in SIDE_OUTPUTS.get(node.op_type, ()):
            node.output.append(f"{base}/{side}")
        if node.op_type == "EditNetInject":
            node.attribute.append(helper.make_attribute("max_segments", int(max_segments)))
    return model


# --- TensorRT registration (needs tensorrt; not run yet) --------------------------------------------------------
_REGISTERED = False


def _trt_types(trt) -> dict:
    return {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16, "int32": trt.int32}


def _as_desc(t, trt) -> Desc:
    names = {v: k for k, v in _trt_types(trt).items()}
    # a "fake" shape expression (outside shape calculations) cannot say whether it is constant
    shape = tuple(d.constant_value() if not d.is_fake and d.is_constant else d for d in t.shape_expr)
    return Desc(shape, names.get(t.dtype, str(t.dtype)))


def _to_trt(d: Desc, like, trt, trtp):
    out = like.like()
    out.dtype = _trt_types(trt)[d.dtype]
    out.shape_expr = trtp.ShapeExprs.from_tuple(d.shape)
    return out


def register_plugins(arch: int | None = None) -> None:
    """Register ``omniace::Rope3D``, ``omniace::SegmentAttention`` and ``omniace::EditNetInject`` with
    ``tensorrt.plugin`` (shape functions, type/format combinations, AOT Triton implementations for compute
    capability ``arch``, default: the current GPU's). Idempotent. Raises ImportError naming the ``trt``
    extra without TensorRT. Written to TensorRT's documented API; it has not run (no TensorRT here)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .tensorrt import require_tensorrt

    trt = require_tensorrt()
    trtp = require_tensorrt("tensorrt.plugin")
    if not hasattr(trtp, "aot_impl"):
        raise ImportError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; the plugin flavour needs a "
                          f"TensorRT 10 release with AOT Python plugins: pip install -U 'omniace[trt]'")
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor

    def launch(kernel: PluginKernel, grid: tuple, extra: tuple):
        if kernel.scratch:
            raise RuntimeError(f"{kernel.op}: the kernel needs {kernel.scratch} B of Triton scratch, which a "
                               f"TensorRT AOT plugin cannot pass")
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x = kernel.num_warps * 32
        params.shared_mem = kernel.shared
        args = trtp.SymIntExprs(len(extra))
        for i, e in enumerate(extra):
            args[i] = trtp.SymInt32(e)
        return kernel.name, kernel.ptx, params, args

    def tune(op: str) -> list:
        return [trtp.AutoTuneCombination(io_types(op), "LINEAR")]

    def to_trt(descs, like) -> tuple:
        return tuple(_to_trt(d, like, trt, trtp) for d in descs)

    def static(d) -> int:
        return d.constant_value()

    Desc_ = trtp.TensorDesc
    rope, attn, inject = (f"{NAMESPACE}::{op}" for op in OPS)

    @trtp.register(rope)
    def _rope_desc(q: Desc_, k: Desc_, pos: Desc_, inv_freq: Desc_, axes_dims: npt.NDArray[np.int32],
                   theta: float) -> Tuple[Desc_, Desc_]:
        descs = rope3d_outputs(*(_as_desc(t, trt) for t in (q, k, pos, inv_freq)), tuple(axes_dims.tolist()), theta)
        return to_trt(descs, q)

    @trtp.autotune(rope)
    def _rope_tune(q: Desc_, k: Desc_, pos: Desc_, inv_freq: Desc_, outputs: Tuple[Desc_, Desc_]) -> List[Any]:
        return tune("Rope3D")

    @trtp.aot_impl(rope)
    def _rope_aot(q: Desc_, k: Desc_, pos: Desc_, inv_freq: Desc_, axes_dims: npt.NDArray[np.int32], theta: float,
                  outputs: Tuple[Desc_, Desc_], tactic: int):
        H, HK, D = static(q.shape_expr[1]), static(k.shape_expr[1]), static(q.shape_expr[2])
        kern = compile_rope3d(_as_desc(q, trt).dtype, H, HK, D, tuple(axes_dims.tolist()), arch)
        return launch(kern, *rope3d_launch(q.shape_expr[0], H, HK, kern.meta, trtp.cdiv))

    @trtp.register(attn)
    def _attn_desc(q: Desc_, k: Desc_, v: Desc_, cu_q: Desc_, cu_k: Desc_, scale: float) -> Tuple[Desc_, Desc_]:
        return to_trt(segment_attention_outputs(*(_as_desc(t, trt) for t in (q, k, v, cu_q, cu_k)), scale), q)

    @trtp.autotune(attn)
    def _attn_tune(q: Desc_, k: Desc_, v: Desc_, cu_q: Desc_, cu_k: Desc_, outputs: Tuple[Desc_, Desc_]) -> List[Any]:
        return tune("SegmentAttention")

    @trtp.aot_impl(attn)
    def _attn_aot(q: Desc_, k: Desc_, v: Desc_, cu_q: Desc_, cu_k: Desc_, scale: float, outputs: Tuple[Desc_, Desc_],
                  tactic: int):
        H, D = static(q.shape_expr[1]), static(q.shape_expr[2])
        kern = compile_segment_attention(_as_desc(q, trt).dtype, H, D, scale, arch)
        return launch(kern, *segment_attention_launch(q.shape_expr[0], cu_q.shape_expr[0], H, kern.meta, trtp.cdiv))

    @trtp.register(inject)
    def _inject_desc(h: Desc_, ctrl: Desc_, shift: Desc_, scale: Desc_, gate: Desc_, cu: Desc_, eps: float,
                     max_segments: int) -> Tuple[Desc_, Desc_, Desc_, Desc_]:
        descs = editnet_inject_outputs(*(_as_desc(t, trt) for t in (h, ctrl, shift, scale, gate, cu)), eps,
                                       max_segments)
        return to_trt(descs, h)

    @trtp.autotune(inject)
    def _inject_tune(h: Desc_, ctrl: Desc_, shift: Desc_, scale: Desc_, gate: Desc_, cu: Desc_,
                     outputs: Tuple[Desc_, Desc_, Desc_, Desc_]) -> List[Any]:
        return tune("EditNetInject")

    @trtp.aot_impl(inject)
    def _inject_aot(h: Desc_, ctrl: Desc_, shift: Desc_, scale: Desc_, gate: Desc_, cu: Desc_, eps: float,
                    max_segments: int, outputs: Tuple[Desc_, Desc_, Desc_, Desc_], tactic: int):
        kern = compile_editnet_inject(_as_desc(h, trt).dtype, static(h.shape_expr[1]), eps, max_segments, arch)
        return launch(kern, *editnet_inject_launch(h.shape_expr[0], cu.shape_expr[0], kern.meta))

    _REGISTERED = True


# --- the compile check (``python -m omniace.export.trt_plugins``; needs TRITON_INTERPRET unset) ----------------
def plugin_kernels(cfg, dtype: str, max_segments: int, arch: int = 90) -> list[PluginKernel]:
    """Compile every plugin kernel an engine of ``cfg`` (an ACE or SD3 config) uses, for ``arch``."""
    if cfg.family == "ace":
        H, D = cfg.num_heads, cfg.head_dim
        return [compile_rope3d(dtype, H, H, D, cfg.axes, arch), compile_segment_attention(dtype, H, D, D**-0.5, arch)]
    H, D = cfg.num_attention_heads, cfg.attention_head_dim
    kernels = [compile_segment_attention(dtype, H, D, D**-0.5, arch)]
    if cfg.editnet:
        kernels.append(compile_editnet_inject(dtype, cfg.hidden_size, 1e-6, max_segments, arch))
    return kernels


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from omniace.engine.config import get_config
    from omniace.kernels.triton_aot import LIMITS

    ap = argparse.ArgumentParser(description="Compile the TensorRT plugin kernels (Triton AOT, no GPU needed).")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS),
                    help="compute capability x 10 (90 = Hopper)")
    ap.add_argument("--presets", default="ace-0.6b-512,sd3-medium-editnet", help="comma-separated model presets")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--max-segments", type=int, default=64)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    limit = LIMITS[args.arch].smem_per_block
    params = {op: len(ins) + extra + len(outs) for op, (ins, extra, outs) in PLUGIN_IO.items()}
    failures = 0
    for preset in args.presets.split(","):
        for dtype in args.dtypes.split(","):
            for k in plugin_kernels(get_config(preset), dtype, args.max_segments, args.arch):
                entry = k.ptx[k.ptx.index(".entry"):]
                n_params = entry[:entry.index(")")].count(".param")
                # Triton appends two scratch pointers; TensorRT passes only its own arguments
                ok = k.shared <= limit and k.scratch == 0 and n_params == params[k.op] + 2
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {preset:20} {k.op:17} {dtype:9} shared {k.shared:6d} B  "
                      f"scratch {k.scratch} B  params {n_params}  warps {k.num_warps}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
