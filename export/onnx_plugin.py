"""The ``plugin`` ONNX flavour: the three omniace ops as nodes of the custom domain ``omniace``.

Export: the ``onnx_plugin`` backend (active only inside ``export_onnx(flavour="plugin")``) routes each op
through a ``torch.library`` custom op of the ``omniace_onnx`` namespace (its eager body is the dense
implementation, so the traced graph computes the right values), and a ``custom_translation_table`` turns each
into one node whose attributes carry the op contract:

  omniace.Rope3D(q [L,H,D], k [L,Hk,D], pos [L,3] int32; axes_dims: ints, theta: float) -> (q_out, k_out)
  omniace.SegmentAttention(q [Lq,H,D], k [Lk,H,D], v [Lk,H,D], cu_seqlens_q [S+1] int32,
                           cu_seqlens_k [S+1] int32; scale: float) -> out [Lq,H,D]
  omniace.EditNetInject(h [L,C], ctrl [L,C], shift [S,C], scale [S,C], gate [S,C], cu_seqlens [S+1] int32;
                        eps: float) -> (h_out [L,C], y [L,C])

Contracts as in ``kernels/ops.py``; a TensorRT plugin (``export/tensorrt.py``) runs each node with the project's
kernels (it derives the kernels' ``max_seqlen`` launch bounds itself: they are not graph values). On the CPU,
:func:`reference_ops` binds the nodes to the reference ops for onnx's ``ReferenceEvaluator``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from omniace.kernels import dense, reference
from omniace.kernels.ops import register_backend

DOMAIN = "omniace"
DOMAIN_VERSION = 1
_NS = "omniace_onnx"


@torch.library.custom_op(f"{_NS}::rope3d", mutates_args=())
def rope3d_node(q: Tensor, k: Tensor, pos: Tensor, axes_dims: list[int], theta: float) -> tuple[Tensor, Tensor]:
    return dense.rope3d(q, k, pos, tuple(axes_dims), theta)


@rope3d_node.register_fake
def _(q, k, pos, axes_dims, theta):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op(f"{_NS}::segment_attention", mutates_args=())
def segment_attention_node(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           scale: float) -> Tensor:
    return dense.segment_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, 0, 0, scale)


@segment_attention_node.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{_NS}::editnet_inject", mutates_args=())
def editnet_inject_node(h: Tensor, ctrl: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, cu_seqlens: Tensor,
                        eps: float) -> tuple[Tensor, Tensor]:
    return dense.editnet_inject(h, ctrl, shift, scale, gate, cu_seqlens, eps)


@editnet_inject_node.register_fake
def _(h, ctrl, shift, scale, gate, cu_seqlens, eps):
    return torch.empty_like(h), torch.empty_like(h)


register_backend("rope3d", "onnx_plugin",
                 lambda q, k, pos, axes, theta: rope3d_node(q, k, pos, list(axes), theta), priority=-2)
register_backend("segment_attention", "onnx_plugin",
                 lambda q, k, v, cu_q, cu_k, max_q, max_k, scale: segment_attention_node(q, k, v, cu_q, cu_k, scale),
                 priority=-2)
register_backend("editnet_inject", "onnx_plugin",
                 lambda h, ctrl, shift, scale, gate, cu, eps: editnet_inject_node(h, ctrl, shift, scale, gate, cu, eps),
                 priority=-2)


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schemas() -> None:
    """Register the three node schemas with onnx (idempotent), so ``onnx.checker`` validates the nodes
    and onnxscript can build them."""
    from onnx import defs
    from onnx.defs import OpSchema

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    types = [("T", _FLOATS, "q/k/v, h/ctrl and the modulation rows"), ("I", ["tensor(int32)"], "positions, offsets")]
    schemas = [
        OpSchema("Rope3D", DOMAIN, DOMAIN_VERSION, "3D RoPE of q and k over (frame, row, col) positions",
                 inputs=[P("q", "T"), P("k", "T"), P("pos", "I")], outputs=[P("q_out", "T"), P("k_out", "T")],
                 type_constraints=types, attributes=[A("axes_dims", OpSchema.AttrType.INTS),
                                                     A("theta", OpSchema.AttrType.FLOAT)]),
        OpSchema("SegmentAttention", DOMAIN, DOMAIN_VERSION, "block-diagonal (varlen) attention by cu_seqlens",
                 inputs=[P("q", "T"), P("k", "T"), P("v", "T"), P("cu_seqlens_q", "I"), P("cu_seqlens_k", "I")],
                 outputs=[P("out", "T")], type_constraints=types, attributes=[A("scale", OpSchema.AttrType.FLOAT)]),
        OpSchema("EditNetInject", DOMAIN, DOMAIN_VERSION, "gated residual fused with LayerNorm + adaLN modulation",
                 inputs=[P("h", "T"), P("ctrl", "T"), P("shift", "T"), P("scale", "T"), P("gate", "T"),
                         P("cu_seqlens", "I")], outputs=[P("h_out", "T"), P("y", "T")],
                 type_constraints=types, attributes=[A("eps", OpSchema.AttrType.FLOAT)]),
    ]
    for schema in schemas:
        if not defs.has(schema.name, DOMAIN_VERSION, DOMAIN):
            defs.register_schema(schema)


def translation_table() -> dict:
    """``torch.onnx.export``'s ``custom_translation_table``: each custom op -> one ``omniace`` node."""
    import onnxscript

    register_schemas()
    op = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def rope3d(q, k, pos, axes_dims: list[int], theta: float):
        return op.Rope3D(q, k, pos, axes_dims=axes_dims, theta=theta, _outputs=2)

    def segment_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float):
        return op.SegmentAttention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale)

    def editnet_inject(h, ctrl, shift, scale, gate, cu_seqlens, eps: float):
        return op.EditNetInject(h, ctrl, shift, scale, gate, cu_seqlens, eps=eps, _outputs=2)

    ops = torch.ops.omniace_onnx
    return {ops.rope3d.default: rope3d, ops.segment_attention.default: segment_attention,
            ops.editnet_inject.default: editnet_inject}


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def reference_ops() -> list[type]:
    """``OpRun`` classes binding the ``omniace`` nodes to ``kernels/reference.py`` for onnx's
    ``ReferenceEvaluator(model, new_ops=reference_ops())``: the plugin graph run on the CPU."""
    from onnx.reference.op_run import OpRun

    class Rope3D(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, pos, axes_dims=None, theta=None):
            qo, ko = reference.rope3d(_t(q), _t(k), _t(pos), tuple(int(a) for a in axes_dims), float(theta))
            return qo.numpy(), ko.numpy()

    class SegmentAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None):
            out = reference.segment_attention(_t(q), _t(k), _t(v), _t(cu_seqlens_q), _t(cu_seqlens_k), 0, 0,
                                              float(scale))
            return (out.numpy(),)

    class EditNetInject(OpRun):
        op_domain = DOMAIN

        def _run(self, h, ctrl, shift, scale, gate, cu_seqlens, eps=None):
            h_out, y = reference.editnet_inject(_t(h), _t(ctrl), _t(shift), _t(scale), _t(gate), _t(cu_seqlens),
                                                float(eps))
            return h_out.numpy(), y.numpy()

    return [Rope3D, SegmentAttention, EditNetInject]
