"""The exported denoiser's graph inputs: names, dtypes and symbolic dims, for both families.

The ONNX graph (``export/onnx.py``) and every engine built from it (``export/tensorrt.py``) take the packed
batch as the engine uses it, flattened into tensors: the noisy target tokens, the timesteps, the condition
tokens and text, and the per-batch index metadata (cu_seqlens, gathers, positions, indicator ids) that
``engine`` computes once per batch. Dims are symbolic names, or sums of them, over this vocabulary:

  B       samples (each CFG branch of a request is a sample)
  F       image frames (targets and condition images)
  L_img   image tokens of every frame        L_tgt   target tokens (the denoised rows)
  L_txt   text tokens of every unit          L_ft    text rows the frames attend to (ACE, frame by frame)
  L_cond  condition-image tokens (SD3 EditNet)

``evaluate_dims`` turns a spec's dims into ints for concrete dim values (optimisation profiles, checks).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BASE_DIMS = ("B", "F", "L_img", "L_tgt", "L_txt", "L_ft", "L_cond")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: ``dtype`` is ``"float"`` (fp32 at every export precision: the graph casts), ``"int32"``
    or ``"int64"``;
    ``dims`` are ints, base dim names, or sums such as ``"B+1"`` and ``"L_tgt+L_txt"``."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]


def _f(name: str, *dims: str | int) -> InputSpec:
    return InputSpec(name, "float", dims)


def _i32(name: str, *dims: str | int) -> InputSpec:
    return InputSpec(name, "int32", dims)


def _i64(name: str, *dims: str | int) -> InputSpec:
    return InputSpec(name, "int64", dims)


def ace_inputs(cfg) -> list[InputSpec]:
    """Graph inputs of the ACE denoiser (``engine/ace.py``), in call order."""
    p2 = cfg.patch_size**2
    skip = [_i64("source_index", "L_tgt")] if getattr(cfg, "source_skip", False) else []
    if getattr(cfg, "pixel_smooth", 0) or getattr(cfg, "pixel_conv", 0):
        skip.append(_i64("target_neighbors", "L_tgt", 9))
    if getattr(cfg, "self_condition", False):  # the previous x0 estimate (zeros at a request's first step)
        skip.append(_f("x0_prev", "L_tgt", cfg.in_channels * p2))
    return [
        _f("x", "L_tgt", cfg.in_channels * p2), _f("t", "B"),
        _f("tokens", "L_img", (cfg.in_channels + 1) * p2), _f("text", "L_txt", cfg.y_channels),
        _i64("target_index", "L_tgt"), _i32("pos", "L_img", 3), _i64("indicator", "L_img"),
        _i64("sample_of_token", "L_img"), _i64("frame_text_index", "L_ft"), _i64("frame_text_indicator", "L_ft"),
        _i32("cu_seqlens_sample", "B+1"), _i32("cu_seqlens_frame", "F+1"), _i32("cu_seqlens_frame_txt", "F+1"),
        *skip,
    ]


def sd3_inputs(cfg) -> list[InputSpec]:
    """Graph inputs of the SD3 denoiser (``engine/sd3.py``), with EditNet's when ``cfg.editnet``."""
    p2 = cfg.patch_size**2
    specs = [
        _f("x", "L_tgt", cfg.in_channels * p2), _f("t", "B"),
        _f("text", "L_txt", cfg.joint_attention_dim), _f("pooled", "B", cfg.pooled_projection_dim),
        _i64("pos_index", "L_tgt"),
        _i64("sample_of_img", "L_tgt"), _i32("cu_seqlens_img", "B+1"),
        _i64("sample_of_txt", "L_txt"), _i32("cu_seqlens_txt", "B+1"),
        _i64("joint_perm", "L_tgt+L_txt"), _i64("joint_inv", "L_tgt+L_txt"), _i32("cu_seqlens_joint", "B+1"),
    ]
    if cfg.concat_condition or (cfg.editnet and cfg.control == "controlnet"):
        specs += [_f("tokens", "L_img", cfg.in_channels * p2), _i64("aligned_rows", "L_tgt")]
    elif cfg.editnet:
        specs += [
            _f("tokens", "L_img", cfg.in_channels * p2), _i64("cond_rows", "L_cond"), _i64("cond_pos_index", "L_cond"),
            _i64("sample_of_ctrl", "L_cond+L_tgt"), _i32("cu_seqlens_ctrl", "B+1"),
            _i64("ctrl_perm", "L_cond+L_tgt"), _i64("ctrl_inv", "L_cond+L_tgt"),
            _i64("ctrl_joint_perm", "L_cond+L_tgt+L_txt"), _i64("ctrl_joint_inv", "L_cond+L_tgt+L_txt"),
            _i32("cu_seqlens_ctrl_joint", "B+1"),
        ]
    if cfg.editnet:
        specs.append(_f("control_scale", "B"))
    return specs


def input_specs(cfg) -> list[InputSpec]:
    """The graph inputs of ``cfg``'s denoiser (an ``ACEConfig`` or ``SD3Config``)."""
    return ace_inputs(cfg) if cfg.family == "ace" else sd3_inputs(cfg)


_TERM = re.compile(r"^\s*([A-Za-z_]+|\d+)\s*$")


def evaluate_dim(dim: str | int, values: dict[str, int]) -> int:
    """The size of one dim for base dim ``values``; raises ValueError for an unknown name."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in dim.split("+"):
        m = _TERM.match(term)
        if m is None:
            raise ValueError(f"dim {dim!r}: cannot read term {term!r}")
        name = m.group(1)
        if name.isdigit():
            total += int(name)
        elif name in values:
            total += int(values[name])
        else:
            raise ValueError(f"dim {dim!r} needs {name!r}; given {sorted(values)}")
    return total


def evaluate_dims(spec: InputSpec, values: dict[str, int]) -> tuple[int, ...]:
    """The concrete shape of ``spec`` for base dim ``values`` (e.g. ``{"B": 2, "L_tgt": 512, ...}``)."""
    return tuple(evaluate_dim(d, values) for d in spec.dims)
