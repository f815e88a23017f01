"""ONNX export of the denoiser of either family (ACE; SD3 with or without EditNet), on the packed batch.

The graph's inputs are the packed batch as the engine uses it (``export/spec.py``): noisy target tokens ``x``,
timesteps ``t``, condition tokens and text, the per-batch index metadata (cu_seqlens, gathers, positions,
indicator ids) that the engine computes once per batch, and for the models that take them the source gather,
the target grid's neighbours and the previous x0 estimate (``x0_prev``, self-conditioning); every token,
segment and sample count is dynamic.
Float inputs are fp32 whatever the export precision (the graph casts them, as the eager forward does); the
output ``out [L_tgt, C*p*p]`` is in the export precision. Weights go to external data next to the graph.

Flavours:
  ``portable``  standard ONNX operators only: RoPE as multiply-add with angles from the positions, segment
                attention as one attention with a block-diagonal mask built from cu_seqlens inside the graph
                (O(L^2) memory over the batch), the injection as add + LayerNorm + modulation. Runs in any
                ONNX runtime (``export/onnxruntime.py``).
  ``plugin``    the three ops as ``omniace`` custom-domain nodes (``export/onnx_plugin.py``) carrying the op
                contracts as attributes, for TensorRT to run with the project's kernels.

The export traces ``forward_plan`` with ``torch.export`` (dynamic shapes) through ``torch.onnx.export``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
import os
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor, nn

from omniace import require
from omniace.engine.ace import ACEPlan, check_previous_estimate
from omniace.engine.config import ACEConfig, SD3Config, config_to_dict
from omniace.engine.layers import Interleave
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, PackedLCU, pack
from omniace.engine.sd3 import SD3Plan, Segments, cached_plan
from omniace.kernels import use_backend

from .spec import InputSpec, input_specs

FLAVOURS = ("portable", "plugin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPSET = 18
GRAPH_FILE = "denoiser.onnx"
META_FILE = "denoiser.json"


def _plan(model_cfg: ACEConfig | SD3Config, batch: PackedLCU) -> ACEPlan | PackedLCU | SD3Plan:
    return batch if isinstance(model_cfg, ACEConfig) else cached_plan(batch, model_cfg)


def graph_inputs(model_cfg: ACEConfig | SD3Config, batch: PackedLCU, x: Tensor, t: Tensor,
                 control_scale: float | Tensor = 1.0, x0_prev: Tensor | None = None) -> dict[str, Tensor]:
    """The graph's inputs for one forward, in graph order: ``{name: tensor}`` (float ones fp32).

    ``batch`` is a packed batch of ``model_cfg``'s family; ``x [L_tgt, C*p*p]``; ``t [B]``;
    ``control_scale`` (SD3 EditNet only) a float or ``[B]``; ``x0_prev`` (``ACEConfig.self_condition`` only) the
    previous x0 estimate shaped like ``x``, None for zeros. The per-batch metadata is computed once per batch
    and cached on it."""
    check_previous_estimate(model_cfg, x, x0_prev)  # as the eager forward refuses it
    plan = _plan(model_cfg, batch)
    out: dict[str, Tensor] = {}
    for spec in input_specs(model_cfg):
        if spec.name == "x":
            value = x
        elif spec.name == "t":
            value = t
        elif spec.name == "x0_prev":
            value = torch.zeros_like(x) if x0_prev is None else x0_prev
        elif spec.name == "control_scale":
            value = torch.as_tensor(control_scale, dtype=torch.float32, device=x.device).reshape(-1)
            value = value.expand(batch.num_samples)
        else:
            value = _plan_tensor(plan, spec.name)
        out[spec.name] = value.float().contiguous() if spec.dtype == "float" else value.to(_INT[spec.dtype])
    return out


_INT = {"int32": torch.int32, "int64": torch.int64}
# graph input name -> (plan attribute, field of it) for the SD3 plan's nested segment and layout objects
_SD3_NESTED = {
    "sample_of_img": ("img", "seg"), "cu_seqlens_img": ("img", "cu"),
    "sample_of_txt": ("txt", "seg"), "cu_seqlens_txt": ("txt", "cu"),
    "joint_perm": ("joint", "perm"), "joint_inv": ("joint", "inv"), "cu_seqlens_joint": ("joint", "cu_seqlens"),
    "sample_of_ctrl": ("ctrl", "seg"), "cu_seqlens_ctrl": ("ctrl", "cu"),
    "ctrl_perm": ("ctrl_layout", "perm"), "ctrl_inv": ("ctrl_layout", "inv"),
    "ctrl_joint_perm": ("ctrl_joint", "perm"), "ctrl_joint_inv": ("ctrl_joint", "inv"),
    "cu_seqlens_ctrl_joint": ("ctrl_joint", "cu_seqlens"),
}


def _plan_tensor(plan, name: str) -> Tensor:
    if name in _SD3_NESTED and isinstance(plan, SD3Plan):
        owner, attr = _SD3_NESTED[name]
        return getattr(getattr(plan, owner), attr)
    return getattr(plan, name)


def plan_from_inputs(model_cfg: ACEConfig | SD3Config, inputs: dict[str, Tensor]) -> ACEPlan | SD3Plan:
    """The inverse of :func:`graph_inputs` inside the graph: a plan over the graph's input tensors, with
    stream sizes taken from tensor shapes (symbolic while exporting) and no launch bounds (the exported ops
    do not use them)."""
    if isinstance(model_cfg, ACEConfig):
        return ACEPlan(**{f.name: inputs[f.name] for f in fields(ACEPlan) if f.name in inputs})
    g = inputs
    img = Segments(g["cu_seqlens_img"], g["sample_of_img"], 0)
    txt = Segments(g["cu_seqlens_txt"], g["sample_of_txt"], 0)
    n_img, n_txt = g["x"].shape[0], g["text"].shape[0]
    plan = SD3Plan(g["text"], g["pooled"], g["pos_index"], img, txt,
                   Interleave(g["joint_perm"], g["joint_inv"], g["cu_seqlens_joint"], 0, [n_img, n_txt]),
                   tokens=g.get("tokens"), aligned_rows=g.get("aligned_rows"))
    if "cond_rows" in g:
        n_cond = g["cond_rows"].shape[0]
        plan.cond_rows, plan.cond_pos_index = g["cond_rows"], g["cond_pos_index"]
        plan.ctrl = Segments(g["cu_seqlens_ctrl"], g["sample_of_ctrl"], 0)
        plan.ctrl_layout = Interleave(g["ctrl_perm"], g["ctrl_inv"], g["cu_seqlens_ctrl"], 0, [n_cond, n_img])
        plan.ctrl_joint = Interleave(g["ctrl_joint_perm"], g["ctrl_joint_inv"], g["cu_seqlens_ctrl_joint"], 0,
                                     [n_cond + n_img, n_txt])
    return plan


class DenoiserGraph(nn.Module):
    """The exported module: ``forward(*inputs)`` in :func:`~omniace.export.spec.input_specs` order ->
    ``out [L_tgt, C*p*p]``; it rebuilds the plan from its inputs and runs the model's ``forward_plan``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = [s.name for s in input_specs(model.cfg)]

    def forward(self, *args: Tensor) -> Tensor:
        inputs = dict(zip(self.names, args))
        plan = plan_from_inputs(self.model.cfg, inputs)
        if isinstance(self.model.cfg, ACEConfig):
            return self.model.forward_plan(plan, inputs["x"], inputs["t"], x0_prev=inputs.get("x0_prev"))
        return self.model.forward_plan(plan, inputs["x"], inputs["t"], inputs.get("control_scale", 1.0))


def example_batch(model_cfg: ACEConfig | SD3Config, seed: int = 0) -> tuple[PackedLCU, Tensor, Tensor]:
    """A small mixed-size packed batch (two samples of different grids and text lengths; condition images
    where the model takes them) to trace with. Every dynamic dim is >= 2, so ``torch.export`` keeps it symbolic
    (it specialises sizes 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    ace = isinstance(model_cfg, ACEConfig)
    p, c = model_cfg.patch_size, model_cfg.in_channels
    width = model_cfg.y_channels if ace else model_cfg.joint_attention_dim
    conditioned = ace or model_cfg.editnet or model_cfg.concat_condition
    samples = []
    for (gh, gw), n_txt, n_cond in (((2, 3), 5, 2 if ace else 1), ((3, 2), 7, 1)):
        h, w = gh * p, gw * p
        images = [ImageInput(torch.randn(c, h, w, generator=g)) for _ in range(n_cond if conditioned else 0)]
        pooled = None if ace else torch.randn(model_cfg.pooled_projection_dim, generator=g)
        unit = ConditionUnit("edit {image}" if images else "generate", images=images,
                             text=torch.randn(n_txt, width, generator=g), pooled=pooled)
        samples.append(LCUSample(units=[unit], target=ImageInput(torch.randn(c, h, w, generator=g))))
    batch = pack(samples, p, with_mask=ace)
    x = torch.randn(batch.target_index.numel(), c * p * p, generator=g)
    t = torch.tensor([250.0, 750.0])
    return batch, x, t


def _dynamic_shapes(specs: list[InputSpec]) -> tuple:
    from torch.export import Dim

    return tuple({i: Dim.DYNAMIC for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the engine cache's weights key."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks (the graph and its external weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, flavour: str = "portable", dtype: str = "fp32",
                opset: int = OPSET, check: bool = True) -> Path:
    """Export ``model``'s denoiser to ``out_dir/denoiser.onnx`` (+ ``.data`` external weights and
    ``denoiser.json``: config, flavour, precision, graph inputs, weights hash). Returns the graph's path.

    Raises ValueError for an unknown ``flavour`` or ``dtype``; ``check`` runs ``onnx.checker`` on the file."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}; expected one of {FLAVOURS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    onnx = require("onnx", "export", "the ONNX export")
    require("onnxscript", "export", "the ONNX export")  # torch.onnx.export(dynamo=True) runs on it

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = weights_hash(model)  # of the weights as given: an fp16 export still names the model it came from
    if next(model.parameters()).dtype != DTYPES[dtype] or next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).to("cpu", DTYPES[dtype])  # the caller's model stays as it is
    model = model.eval()
    specs = input_specs(model.cfg)
    batch, x, t = example_batch(model.cfg)
    args = tuple(graph_inputs(model.cfg, batch, x, t).values())
    table = None
    if flavour == "plugin":
        from . import onnx_plugin

        table = onnx_plugin.translation_table()
    with use_backend("dense" if flavour == "portable" else "onnx_plugin"), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(DenoiserGraph(model).eval(), args, dynamo=True, opset_version=opset,
                                    input_names=[s.name for s in specs], output_names=["out"],
                                    dynamic_shapes=(_dynamic_shapes(specs),), custom_translation_table=table,
                                    verbose=False)
    path = out / GRAPH_FILE
    data = out / (GRAPH_FILE + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=True)  # denoiser.json, written last, marks a complete export
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, specs)
    onnx.save(proto, str(path))  # external tensors keep pointing at the data file
    if check:
        onnx.checker.check_model(str(path), full_check=False)
    meta = {"config": config_to_dict(model.cfg), "flavour": flavour, "dtype": dtype, "opset": opset,
            "inputs": [{"name": s.name, "dtype": s.dtype, "dims": list(s.dims)} for s in specs],
            "weights_sha256": digest, "files_sha256": {f.name: file_sha256(f) for f in (path, data) if f.exists()},
            "torch": torch.__version__, "onnx": onnx.__version__}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own chatter (onnxscript's constant folder reporting nodes it leaves unfolded, the
    registry skipping torchvision ops) is not the user's concern: only its errors reach the log."""
    names = ("onnxscript", "onnx_ir", "torch.onnx")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # torch.export's own deprecation notice about its pytree internals
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _name_dims(proto, specs: list[InputSpec]) -> None:
    """Name each graph input's dynamic dims with the spec's names (``B+1``, ``L_tgt``...) instead of the
    tracer's symbols, so a reader (and a TensorRT profile) sees what each dim is."""
    by_name = {s.name: s for s in specs}
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.dims):
            if isinstance(want, str) and dim.dim_param:
                rename.setdefault(dim.dim_param, want)
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
