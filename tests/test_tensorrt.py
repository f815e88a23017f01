"""The TensorRT layer, everything around TensorRT itself (which cannot be installed here and has not run):
optimisation profiles, the engine cache key and its refusals, the denoiser's binding against a fake engine,
the plugins' shape functions and ONNX adaptation, their kernels' compilation for sm_90, the lazy import."""
import ctypes
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from omniace.engine.config import get_config
from omniace.export import tensorrt as ot
from omniace.export import trt_plugins as tp
from omniace.export.spec import evaluate_dims, input_specs
from omniace.kernels import triton_attention as ta
from omniace.kernels import triton_inject as ti
from omniace.kernels import triton_rope as tr
from omniace.kernels.reference import rope3d_inv_freq, segment_attention
from omniace.kernels.triton_aot import captured

from helpers import cu_seqlens


# --- profiles ---------------------------------------------------------------------------------------------------
def test_profiles_from_the_token_budget_ace():
    cfg = get_config("ace-0.6b-512")
    profiles = ot.select_profiles(cfg, token_budget=4096, max_samples=8)
    assert [p.bounds()["L_img"] for p in profiles] == [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096)]
    big = profiles[-1].bounds()
    assert big["B"] == (1, 2, 8)  # opt: a full budget of 512x512 edits (2 frames x 1024 tokens) per sample
    assert big["F"] == (1, 4, 80)  # 8 samples x (target + 9 condition images)
    assert big["L_tgt"] == (1, 2048, 4096)
    assert big["L_txt"] == (1, 240, 960) and big["L_ft"] == (1, 480, 80 * 120)
    assert "L_cond" not in big  # ACE's graph has no condition-token input
    small = profiles[0].bounds()
    assert small["B"] == (1, 1, 8) and small["F"] == (1, 2, 80)
    shapes = {n: (lo, opt, hi) for n, lo, opt, hi in profiles[-1].inputs}
    assert shapes["x"] == ((1, 16), (2048, 16), (4096, 16))
    assert shapes["tokens"] == ((1, 20), (4096, 20), (4096, 20))
    assert shapes["cu_seqlens_sample"] == ((2,), (3,), (9,))
    assert shapes["pos"][2] == (4096, 3)
    assert {n for n, *_ in profiles[0].inputs} == {s.name for s in input_specs(cfg)}


def test_profiles_sd3_editnet_and_odd_budgets():
    cfg = get_config("sd3-medium-editnet")
    profiles = ot.select_profiles(cfg, token_budget=1000, max_samples=4, text_len=333, num_profiles=2)
    assert [p.bounds()["L_img"][2] for p in profiles] == [500, 1000]
    b = profiles[1].bounds()
    assert b["L_cond"] == (0, 500, 999)  # a generation request has no condition image
    assert "F" not in b and b["B"] == (1, 1, 4) and b["L_txt"] == (1, 333, 4 * 333)
    shapes = {n: (lo, opt, hi) for n, lo, opt, hi in profiles[1].inputs}
    assert shapes["pooled"] == ((1, 2048), (1, 2048), (4, 2048))
    assert shapes["ctrl_joint_perm"][2] == (999 + 1000 + 4 * 333,)
    # a budget smaller than the profile count: duplicate caps collapse, and B never exceeds the tokens
    tiny = ot.select_profiles(get_config("ace-tiny"), token_budget=2, max_samples=8, num_profiles=3)
    assert [p.bounds()["L_img"] for p in tiny] == [(1, 1, 1), (1, 2, 2)]
    assert [p.bounds()["B"][2] for p in tiny] == [1, 2]


@pytest.mark.parametrize("kw, name", [({"token_budget": 0}, "token_budget"), ({"max_samples": True}, "max_samples"),
                                      ({"num_profiles": 0}, "num_profiles"), ({"text_len": -1}, "text_len")])
def test_profiles_refuse_bad_arguments(kw, name):
    args = dict(token_budget=1024, max_samples=4) | kw
    with pytest.raises(ValueError, match=name):
        ot.select_profiles(get_config("ace-tiny"), **args)


def test_select_profile_takes_the_smallest_that_fits_and_names_what_does_not():
    profiles = ot.select_profiles(get_config("ace-tiny"), token_budget=4096, max_samples=8)
    dims = dict(B=2, F=4, L_img=1500, L_tgt=700, L_txt=100, L_ft=200)
    assert ot.select_profile(profiles, dims) == 1
    assert ot.select_profile(profiles, dims | {"L_img": 1024}) == 0
    with pytest.raises(ValueError, match=r"L_img=5000 > 4096"):
        ot.select_profile(profiles, dims | {"L_img": 5000})
    with pytest.raises(ValueError, match=r"B=9 > 8"):
        ot.select_profile(profiles, dims | {"B": 9})


def test_batch_dims_reads_and_checks_the_input_shapes():
    cfg = get_config("ace-tiny")
    specs = input_specs(cfg)
    values = dict(B=2, F=3, L_img=40, L_tgt=16, L_txt=9, L_ft=14)
    shapes = {s.name: evaluate_dims(s, values) for s in specs}
    assert ot.batch_dims(specs, shapes) == values
    with pytest.raises(ValueError, match="cu_seqlens_sample"):
        ot.batch_dims(specs, shapes | {"cu_seqlens_sample": (2,)})
    with pytest.raises(ValueError, match="'pos' is missing"):
        ot.batch_dims(specs, {k: v for k, v in shapes.items() if k != "pos"})


# --- the engine cache -------------------------------------------------------------------------------------------
def _key(**kw) -> ot.EngineKey:
    profiles = ot.select_profiles(get_config("ace-tiny"), token_budget=256, max_samples=2)
    base = dict(weights_sha256="ab" * 32, flavour="plugin", precision="fp16",
                profiles=ot.EngineKey.profiles_json(profiles), tensorrt_version="10.9.0",
                gpu_name="NVIDIA H200", compute_capability="9.0")
    return ot.EngineKey(**(base | kw))


def _fake_engine(tmp_path, key):
    engine = ot.engine_path(tmp_path, key.flavour, key.precision)
    engine.write_bytes(b"not really an engine")
    ot.write_sidecar(engine, key)
    return engine


def test_engine_cache_accepts_its_own_key(tmp_path):
    key = _key()
    engine = _fake_engine(tmp_path, key)
    assert engine.name == "denoiser.plugin.fp16.engine"
    data = ot.check_engine(engine, key)
    assert data["key"]["precision"] == "fp16" and data["engine_bytes"] == len(b"not really an engine")
    profiles = [ot.Profile.from_json(p) for p in json.loads(data["key"]["profiles"])]
    assert profiles == ot.select_profiles(get_config("ace-tiny"), token_budget=256, max_samples=2)


def test_engine_cache_refuses_a_mismatch_naming_every_field(tmp_path):
    engine = _fake_engine(tmp_path, _key())
    expected = _key(precision="bf16", gpu_name="NVIDIA H100 80GB HBM3", tensorrt_version="10.13.0")
    with pytest.raises(ot.StaleEngineError) as err:
        ot.check_engine(engine, expected)
    msg = str(err.value)
    assert "precision: engine has 'fp16', expected 'bf16'" in msg
    assert "gpu_name: engine has 'NVIDIA H200', expected 'NVIDIA H100 80GB HBM3'" in msg
    assert "tensorrt_version" in msg and "weights_sha256" not in msg and "flavour" not in msg
    other = ot.EngineKey.profiles_json(ot.select_profiles(get_config("ace-tiny"), token_budget=512, max_samples=2))
    with pytest.raises(ot.StaleEngineError, match="profiles: engine has 'B:1-1-2 F:1-2-20 L_img:1-64-64") as err:
        ot.check_engine(engine, _key(profiles=other, weights_sha256="cd" * 32))
    assert "expected 'B:1-1-2 F:1-2-20 L_img:1-128-128" in str(err.value) and "weights_sha256" in str(err.value)


def test_engine_cache_refuses_a_changed_file_or_a_missing_sidecar(tmp_path):
    key = _key()
    engine = _fake_engine(tmp_path, key)
    engine.write_bytes(b"rebuilt elsewhere")
    with pytest.raises(ot.StaleEngineError, match="differs from its sidecar"):
        ot.check_engine(engine, key)
    ot.sidecar_path(engine).unlink()
    with pytest.raises(ot.StaleEngineError, match="has no sidecar"):
        ot.check_engine(engine, key)
    ot.sidecar_path(engine).write_text("{not json")
    with pytest.raises(ot.StaleEngineError, match="unreadable"):
        ot.check_engine(engine, key)
    ot.sidecar_path(engine).write_text(json.dumps({"format": 0, "key": {}}))
    with pytest.raises(ot.StaleEngineError, match="format 0"):
        ot.check_engine(engine, key)
    with pytest.raises(ot.StaleEngineError, match="no engine at"):
        ot.check_engine(tmp_path / "absent.engine", key)


def test_weights_hash_covers_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.data",
              size_threshold=0)
    first = ot.onnx_sha256(path)
    assert first == ot.onnx_sha256(path) and len(first) == 64
    data = bytearray((tmp_path / "m.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "m.data").write_bytes(bytes(data))
    assert ot.onnx_sha256(path) != first
    assert ot.detect_flavour(path) == "portable"
    (tmp_path / "m.data").unlink()
    with pytest.raises(FileNotFoundError, match="m.data"):
        ot.onnx_sha256(path)


def _graph_of(specs, path):
    """An ONNX file whose graph inputs are ``specs`` (the graph itself is a stand-in: x passes through)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    types_ = {"float": TensorProto.FLOAT, "int32": TensorProto.INT32, "int64": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(s.name, types_[s.dtype], list(s.dims)) for s in specs]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), str(path))
    return path


# --- the lazy import --------------------------------------------------------------------------------------------
def test_missing_tensorrt_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as where it is absent
    monkeypatch.setattr(tp, "_REGISTERED", False)
    with pytest.raises(ImportError, match=r"pip install 'omniace\[trt\]'"):
        ot.require_tensorrt()
    cfg = get_config("ace-tiny")
    onnx_file = _graph_of(input_specs(cfg), tmp_path / "m.onnx")
    profiles = ot.select_profiles(cfg, token_budget=64, max_samples=2)
    with pytest.raises(ImportError, match=r"omniace\[trt\]"):
        ot.build_engine(onnx_file, tmp_path, "fp16", profiles, flavour="portable")
    # bad arguments are refused before TensorRT is looked for
    with pytest.raises(ValueError, match="precision 'int4'"):
        ot.build_engine(onnx_file, tmp_path, "int4", profiles)
    with pytest.raises(ValueError, match="profiles must be a non-empty list"):
        ot.build_engine(onnx_file, tmp_path, "fp16", [])
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        ot.build_engine(tmp_path / "absent.onnx", tmp_path, "fp16", profiles)
    with pytest.raises(ValueError, match="flavour 'plugin', but .* is a 'portable' graph"):
        ot.build_engine(onnx_file, tmp_path, "fp16", profiles, flavour="plugin")
    sd3 = ot.select_profiles(get_config("sd3-tiny-editnet"), token_budget=64, max_samples=2)
    with pytest.raises(ValueError, match=r"missing \['cond_pos_index', .*extra \['cu_seqlens_frame', "):
        ot.build_engine(onnx_file, tmp_path, "fp16", sd3)  # profiles of another model's graph
    with pytest.raises(ImportError, match=r"omniace\[trt\]"):
        tp.register_plugins(90)


# --- the denoiser against a fake engine -------------------------------------------------------------------------
class _Mode:
    def __init__(self, name):
        self.name = name


class _FakeContext:
    """Records what the denoiser binds; 'runs' by copying x into the output (an identity engine)."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profiles, self.runs = engine, {}, {}, [], 0

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.shapes["x"][0], self.engine.out_channels

    def execute_async_v3(self, stream):
        self.runs += 1
        nbytes = self.shapes["x"][0] * self.engine.out_channels * self.engine.elem
        ctypes.memmove(self.addresses["out"], self.addresses["x"], nbytes)
        return True


class _FakeEngine:
    def __init__(self, specs, float_type="FLOAT", out_channels=0):
        self.specs, self.float_type, self.out_channels = specs, float_type, out_channels
        self.elem = 4 if float_type == "FLOAT" else 2
        self.names = [s.name for s in specs] + ["out"]
        self.num_io_tensors = len(self.names)
        self.context = None

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return _Mode("OUTPUT" if name == "out" else "INPUT")

    def get_tensor_dtype(self, name):
        spec = {s.name: s for s in self.specs}.get(name)
        if spec is None or spec.dtype == "float":
            return _Mode(self.float_type)
        return _Mode(spec.dtype.upper())

    def create_execution_context(self):
        self.context = _FakeContext(self)
        return self.context


def _stub_graph_inputs(monkeypatch):
    """A stand-in for the lead's ``omniace.export.onnx.graph_inputs``: the test's batch is its base dims."""
    def graph_inputs(cfg, batch, x, t, control_scale=1.0, x0_prev=None):
        out = {s.name: torch.zeros(evaluate_dims(s, batch), dtype=torch.float32 if s.dtype == "float" else
                                   getattr(torch, s.dtype)) for s in input_specs(cfg)}
        out["x"], out["t"] = x, t
        if x0_prev is not None:
            out["x0_prev"] = x0_prev
        return out

    monkeypatch.setitem(sys.modules, "omniace.export.onnx", types.SimpleNamespace(graph_inputs=graph_inputs))


@pytest.mark.parametrize("float_type, dtype", [("FLOAT", torch.float32), ("HALF", torch.float16)])
def test_denoiser_selects_the_profile_and_binds_every_input(monkeypatch, float_type, dtype):
    _stub_graph_inputs(monkeypatch)
    cfg = get_config("ace-tiny")
    c = cfg.in_channels * cfg.patch_size**2
    profiles = ot.select_profiles(cfg, token_budget=256, max_samples=4, num_profiles=2)
    engine = _FakeEngine(input_specs(cfg), float_type, out_channels=c)
    den = ot.TensorRTDenoiser(engine, cfg, profiles, stream=lambda: 0, device="cpu")
    small = dict(B=2, F=4, L_img=100, L_tgt=50, L_txt=20, L_ft=40)
    x, t = torch.randn(50, c), torch.tensor([500.0, 500.0])
    out = den(small, x, t)
    ctx = engine.context
    assert ctx.profiles == [0] and ctx.runs == 1
    assert ctx.shapes["x"] == (50, c) and ctx.shapes["cu_seqlens_frame"] == (5,) and ctx.shapes["pos"] == (100, 3)
    assert set(ctx.addresses) == {s.name for s in input_specs(cfg)} | {"out"}
    assert out.dtype == torch.float32 and torch.equal(out, x.to(dtype).float())  # through the engine's dtype
    big = small | {"L_img": 200, "L_tgt": 100}
    den(big, torch.randn(100, c), t)
    den(big, torch.randn(100, c), t)
    assert ctx.profiles == [0, 1] and ctx.runs == 3  # the profile is switched only when it changes
    with pytest.raises(ValueError, match=r"fits no optimisation profile.*L_img=300 > 256"):
        den(small | {"L_img": 300}, torch.randn(50, c), t)


def test_denoiser_binds_a_self_conditioning_models_previous_estimate(monkeypatch):
    _stub_graph_inputs(monkeypatch)
    cfg = get_config("ace-tiny", prediction="x0", self_condition=True)
    c = cfg.in_channels * cfg.patch_size**2
    engine = _FakeEngine(input_specs(cfg), "FLOAT", out_channels=c)
    den = ot.TensorRTDenoiser(engine, cfg, ot.select_profiles(cfg, token_budget=256, max_samples=4, num_profiles=1),
                              stream=lambda: 0, device="cpu")
    x, prev = torch.randn(50, c), torch.randn(50, c)
    den(dict(B=2, F=4, L_img=100, L_tgt=50, L_txt=20, L_ft=40), x, torch.tensor([500.0, 500.0]), x0_prev=prev)
    ctx = engine.context
    assert ctx.shapes["x0_prev"] == (50, c) and "x0_prev" in ctx.addresses


def test_denoiser_refuses_an_engine_of_another_graph():
    cfg = get_config("ace-tiny")
    engine = _FakeEngine(input_specs(get_config("sd3-tiny-editnet")))
    with pytest.raises(ValueError, match="missing inputs"):
        ot.TensorRTDenoiser(engine, cfg, ot.select_profiles(cfg, 64, 2), stream=lambda: 0, device="cpu")


# --- plugins: shape functions, launch geometry, ONNX adaptation, compilation --------------------------------
class _Sym:
    """A stand-in for TensorRT's symbolic dim (an unknown token count)."""


def test_plugin_shape_functions():
    L, S = _Sym(), _Sym()
    q, k = tp.Desc((L, 16, 72), "bfloat16"), tp.Desc((L, 16, 72), "bfloat16")
    pos, inv = tp.Desc((L, 3), "int32"), tp.Desc((36,), "float32")
    assert tp.rope3d_outputs(q, k, pos, inv, (24, 24, 24), 10000.0) == (q, k)
    with pytest.raises(ValueError, match="Rope3D: pos must be int32"):
        tp.rope3d_outputs(q, k, tp.Desc((L, 3), "int64"), inv, (24, 24, 24), 10000.0)
    with pytest.raises(ValueError, match=r"inv_freq must be float32 \[36\]"):
        tp.rope3d_outputs(q, k, pos, tp.Desc((35,), "float32"), (24, 24, 24), 10000.0)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        tp.rope3d_outputs(q, k, pos, tp.Desc((40,), "float32"), (24, 24, 32), 10000.0)

    Lk = _Sym()
    kv = tp.Desc((Lk, 16, 72), "float16")
    cu = tp.Desc((S,), "int32")
    out, lse = tp.segment_attention_outputs(tp.Desc((L, 16, 72), "float16"), kv, kv, cu, cu, 72**-0.5)
    assert out == tp.Desc((L, 16, 72), "float16") and lse == tp.Desc((L, 16), "float32")
    with pytest.raises(ValueError, match="share a dtype"):
        tp.segment_attention_outputs(tp.Desc((L, 16, 72), "float32"), kv, kv, cu, cu, 0.1)
    with pytest.raises(ValueError, match="cu_seqlens_k must be int32"):
        tp.segment_attention_outputs(kv, kv, kv, cu, tp.Desc((S,), "float32"), 0.1)

    h = tp.Desc((L, 1536), "bfloat16")
    mod = tp.Desc((S, 1536), "bfloat16")
    h_out, y, mean, rstd = tp.editnet_inject_outputs(h, h, mod, mod, mod, cu, 1e-6, 16)
    assert h_out == y == h and mean == rstd == tp.Desc((L,), "float32")
    with pytest.raises(ValueError, match=r"gate must be \[S, 1536\]"):
        tp.editnet_inject_outputs(h, h, mod, mod, tp.Desc((S, 1152), "bfloat16"), cu, 1e-6, 16)
    with pytest.raises(ValueError, match="max_segments"):
        tp.editnet_inject_outputs(h, h, mod, mod, mod, cu, 1e-6, 0)


def test_plugin_type_combinations():
    assert tp.io_types("Rope3D") == ("FP32|FP16|BF16,FP32|FP16|BF16,INT32|INT32|INT32,FP32|FP32|FP32,"
                                     "FP32|FP16|BF16,FP32|FP16|BF16")
    attn = tp.io_types("SegmentAttention").split(",")
    assert len(attn) == 7 and attn[3:5] == ["INT32|INT32|INT32"] * 2 and attn[6] == "FP32|FP32|FP32"
    assert len(tp.io_types("EditNetInject").split(",")) == 10


def test_plugin_launch_geometry():
    rope = tp.rope3d_meta(16, 16, 72, (24, 24, 24))
    assert tp.rope3d_launch(100, 16, 16, rope) == ((7, 8, 1), (100,))  # 16 tokens x 4 heads per program
    attn = {"BLOCK_M": 128}
    assert tp.segment_attention_launch(1000, 5, 16, attn) == ((8, 4, 16), ())
    assert tp.editnet_inject_launch(77, 3, {}) == ((77, 1, 1), (2,))
    meta = tp.segment_attention_meta("bfloat16", 16, 72, 72**-0.5)
    assert meta["ONE_KV"] is False and meta["QK_SCALE"] == pytest.approx(72**-0.5 * 1.4426950408889634)


def _plugin_model():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Rope3D", ["q", "k", "pos"], ["qr", "kr"], domain="omniace", name="rope0",
                         axes_dims=[24, 24, 24], theta=10000.0),
        helper.make_node("SegmentAttention", ["qr", "kr", "v", "cu", "cu"], ["o"], domain="omniace",
                         name="attn0", scale=0.125),
        helper.make_node("EditNetInject", ["o2", "c", "sh", "sc", "g", "cu"], ["h_out", "y"], domain="omniace",
                         eps=1e-6),
    ]
    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [f("q", ["L", 4, 72])], [f("o", ["L", 4, 72])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("omniace", 1)])


def test_adapt_plugin_graph_adds_what_the_kernels_need(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    onnx.save(_plugin_model(), str(tmp_path / "plugin.onnx"))
    assert ot.detect_flavour(tmp_path / "plugin.onnx") == "plugin"

    model = tp.adapt_plugin_graph(_plugin_model(), max_segments=8)
    rope, attn, inject = model.graph.node
    assert list(rope.input)[3] == "omniace_inv_freq_24_24_24_10000.0"
    inv = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[rope.input[3]]
    np.testing.assert_array_equal(inv, rope3d_inv_freq((24, 24, 24), 10000.0, torch.device("cpu")).numpy())
    assert list(attn.output) == ["o", "attn0/lse"]
    assert list(inject.output) == ["h_out", "y", "EditNetInject_2/mean", "EditNetInject_2/rstd"]
    attrs = {a.name: helper.get_attribute_value(a) for a in inject.attribute}
    assert attrs["max_segments"] == 8 and attrs["plugin_namespace"] == b"omniace"
    again = tp.adapt_plugin_graph(model, max_segments=8)  # already adapted: unchanged
    assert len(again.graph.initializer) == 1 and len(again.graph.node[1].output) == 2

    two = _plugin_model()  # rope nodes share one initializer per exact (axes_dims, theta), ONNX's float32
    for theta in (10000.0, 10000.25, 10000.2):  # 10000.25 and 10000.2 print alike at 6 digits
        two.graph.node.append(helper.make_node("Rope3D", ["q", "k", "pos"], [f"q{theta}", f"k{theta}"],
                                               domain="omniace", axes_dims=[24, 24, 24], theta=theta))
    tp.adapt_plugin_graph(two, max_segments=8)
    assert [n.input[3] for n in two.graph.node if n.op_type == "Rope3D"] == [
        "omniace_inv_freq_24_24_24_10000.0", "omniace_inv_freq_24_24_24_10000.0",
        "omniace_inv_freq_24_24_24_10000.25", "omniace_inv_freq_24_24_24_10000.2001953125"]
    assert len(two.graph.initializer) == 3

    bad = _plugin_model()
    bad.graph.node[1].output.append("extra")
    with pytest.raises(ValueError, match=r"attn0 \(SegmentAttention\): 5 inputs and 2 outputs; expected 5 and 1"):
        tp.adapt_plugin_graph(bad, max_segments=8)


@pytest.mark.parametrize("dtype, H, D, align", [(torch.float16, 2, 72, 8), (torch.float32, 3, 13, 1)])
def test_plugin_attention_adapter_calls_the_kernel_as_the_launcher_does(dtype, H, D, align):
    """Head dim 72 (16-byte rows in ALIGN=8 units) and an odd one (ALIGN=1): the plugin's constexprs and
    strides are the launcher's for the same tiles, and the adapter, run by the interpreter, computes what
    the launcher computes (bitwise) and what the reference computes."""
    g = torch.Generator().manual_seed(0)
    lengths = [70, 150, 0, 9]  # partial blocks, whole key blocks (the mask-free interior), an empty segment
    L, cu = sum(lengths), cu_seqlens(lengths)
    q, k, v = (torch.randn(L, H, D, generator=g).to(dtype) for _ in range(3))
    scale = D**-0.5
    meta = tp.segment_attention_meta(str(dtype).removeprefix("torch."), H, D, scale)
    assert meta["ALIGN"] == align and meta["ONE_KV"] is False

    grid, extra = tp.segment_attention_launch(L, cu.numel(), H, meta)
    out, lse = torch.empty_like(q), torch.empty(L, H)
    tp.trt_segment_attention[grid](q, k, v, cu, cu, out, lse, *extra, **meta)

    # the launcher at the plugin's tiles (general path: a key bound above SHORT_KEYS)
    cfg = ta.forward_config(D, 4096, ta.SHORT_KEYS + 1, 1, H, dtype, interpret=False)
    args = (q, k, v, cu, cu, max(lengths), ta.SHORT_KEYS + 1, scale)
    with captured((ta,)) as record:
        ta.attention_forward(*args, config=cfg)
    (launch,) = record
    assert launch.kwargs == {key: val for key, val in meta.items() if key not in ("H", "QK_SCALE")}
    assert launch.args[7] == pytest.approx(meta["QK_SCALE"])
    assert launch.args[8:17] == (H * D // align, D // align) * 4 + (H,)  # row/head strides in ALIGN units; lse's
    ref_out, ref_lse = ta.attention_forward(*args, config=cfg)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    expected = segment_attention(q.double(), k.double(), v.double(), cu, cu, 0, 0, scale)
    assert (out.double() - expected).abs().max().item() < (2e-5 if dtype == torch.float32 else 4e-3)


def test_plugin_rope_and_inject_adapters_match_their_launchers():
    """The other two adapters under the interpreter, against the launchers (bitwise) at the plugin's meta."""
    g = torch.Generator().manual_seed(1)
    L, H, HK, D, axes = 37, 3, 2, 20, (4, 6, 6)  # 4 rest dims copied unchanged
    q, k = torch.randn(L, H, D, generator=g), torch.randn(L, HK, D, generator=g)
    pos = torch.randint(0, 9, (L, 3), generator=g, dtype=torch.int32)
    meta = tp.rope3d_meta(H, HK, D, axes)
    grid, extra = tp.rope3d_launch(L, H, HK, meta)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    tp.trt_rope3d[grid](q, k, pos, rope3d_inv_freq(axes, 500.0, torch.device("cpu")), *extra, qo, ko, **meta)
    ref_q, ref_k = tr.rope3d_rotate(q, k, pos, axes, 500.0)
    assert torch.equal(qo, ref_q) and torch.equal(ko, ref_k) and not torch.equal(qo, q)

    C, lengths = 40, [5, 0, 11]
    cu, Lh = cu_seqlens(lengths), sum(lengths)
    h, ctrl = torch.randn(Lh, C, generator=g), torch.randn(Lh, C, generator=g)
    shift, scale, gate = (torch.randn(len(lengths), C, generator=g) for _ in range(3))
    meta = tp.editnet_inject_meta(C, 1e-6, max_segments=8)  # the plugin compiles for a bound above S
    grid, extra = tp.editnet_inject_launch(Lh, cu.numel(), meta)
    outs = (torch.empty_like(h), torch.empty_like(h), torch.empty(Lh), torch.empty(Lh))
    tp.trt_editnet_inject[grid](h, ctrl, shift, scale, gate, cu, *extra, *outs, **meta)
    for got, want in zip(outs, ti.inject_forward(h, ctrl, shift, scale, gate, cu, 1e-6)):
        assert torch.equal(got, want)


# Compiles each plugin kernel and the launcher's own variant of it (triton_aot: as the JIT would) for sm_90
# and prints what their PTX moves per load, and their shared memory and warps; TRITON_INTERPRET=0 only.
_SAME_CODE = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from omniace.export import trt_plugins as tp
from omniace.kernels import triton_aot as aot, triton_attention as ta, triton_inject as ti, triton_rope as tr
def launcher(module, call):
    with aot.captured((module,)) as record:
        call()
    src, opts = aot.jit_source(record[0], GPUTarget("cuda", 90, 32))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts), opts["num_warps"]
m = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device="meta")
H, D, C, S = 16, 72, 1536, 8
q, cu = m(4096, H, D), m(S + 1, dtype=torch.int32)
cfg = ta.forward_config(D, 4096, ta.SHORT_KEYS + 1, 1, H, torch.bfloat16, interpret=False)
h, mod, pos = m(4096, C), m(S, C), m(4096, 3, dtype=torch.int32)
pairs = {"rope": (tp.compile_rope3d("bfloat16", H, H, D, (24, 24, 24)),
                  launcher(tr, lambda: tr.rope3d_rotate(q, q, pos, (24, 24, 24), 1e4))),
         "attention": (tp.compile_segment_attention("bfloat16", H, D, D**-0.5),
                       launcher(ta, lambda: ta.attention_forward(q, q, q, cu, cu, 4096, ta.SHORT_KEYS + 1, D**-0.5,
                                                                 config=cfg))),
         "inject": (tp.compile_editnet_inject("bfloat16", C, 1e-6, S),
                    launcher(ti, lambda: ti.inject_forward(h, h, mod, mod, mod, cu, 1e-6)))}
print(json.dumps({op: [[aot.memory_mix(p.ptx), p.shared, p.num_warps],
                       [aot.memory_mix(k.asm["ptx"]), k.metadata.shared, w]] for op, (p, (k, w)) in pairs.items()}))
"""


def test_plugin_kernels_compile_to_the_launchers_code(tmp_path):
    """The plugins' pointers carry the JIT's 16-byte alignment: for head dim 72 in bf16 the plugin attention
    kernel has the launcher's 16-byte loads and cp.async (no 2-byte scalar loads) and its shared memory
    (the pipelined tiles); the rope kernel's are 16-byte vectors too; the injection kernel's are the launcher's."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", _SAME_CODE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for op, (plugin, launcher) in found.items():
        assert plugin == launcher, op
    mix = found["attention"][0][0]
    assert "2" not in mix["ld_global"] and mix["cp_async"].get("16", 0) > 0 and mix["mma"] > 0
    assert "16" in found["inject"][0][0]["ld_global"]
    rope = found["rope"][0][0]
    assert "2" not in rope["ld_global"] and "2" not in rope["st_global"] and rope["ld_global"].get("16", 0) > 0


def test_plugin_kernels_compile_for_sm90(tmp_path):
    """The adapters lower through Triton's whole pipeline for Hopper: shared memory within the limit, no
    scratch buffer, and TensorRT's parameter list (inputs, extra args, outputs) plus Triton's two pointers."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "omniace.export.trt_plugins", "--arch", "90",
                           "--dtypes", "bfloat16,float32"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s)" in proc.stdout
    for line in ("ace-0.6b-512         Rope3D            bfloat16", "SegmentAttention  float32",
                 "sd3-medium-editnet   EditNetInject     bfloat16"):
        assert line in proc.stdout
    assert proc.stdout.count("ok  ") == 8


def test_plugin_compile_check_refuses_an_arch_without_limits(capsys):
    """The shared-memory limit comes from triton_aot.LIMITS: an architecture it lacks is refused up front."""
    with pytest.raises(SystemExit) as exc:
        tp.main(["--arch", "75"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--arch: invalid choice: 75" in err and "90" in err


class _FakeDim:
    """A fake of tensorrt.plugin.ShapeExpr: a build-time constant or a symbolic dim."""

    def __init__(self, value=None):
        self.value, self.is_fake = value, False

    @property
    def is_constant(self):
        return self.value is not None

    def constant_value(self):
        return self.value


def _fake_tensorrt(monkeypatch):
    """Fakes of ``tensorrt`` and ``tensorrt.plugin``, as far as register_plugins uses them (from their docs)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-fake"
    trt.float32, trt.float16, trt.bfloat16, trt.int32 = "trt.float32", "trt.float16", "trt.bfloat16", "trt.int32"
    trtp = types.ModuleType("tensorrt.plugin")
    registry: dict = {}

    def decorator(kind):
        def wrap(plugin_id):
            def add(fn):
                if (kind, plugin_id) in registry:  # TensorRT refuses a second registration of an id
                    raise RuntimeError(f"{plugin_id} already has a {kind} function")
                registry[kind, plugin_id] = fn
                return fn
            return add
        return wrap

    class TensorDesc:
        def __init__(self, shape=(), dtype=None):
            self.shape_expr, self.dtype = tuple(shape), dtype

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class ShapeExprs:
        @staticmethod
        def from_tuple(shape):
            return tuple(shape)

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot")
    trtp.TensorDesc, trtp.ShapeExprs = TensorDesc, ShapeExprs
    trtp.AutoTuneCombination = lambda io_types, layouts: (io_types, layouts)
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_REGISTERED", False)
    return trt, trtp, registry


def test_register_plugins_against_fake_tensorrt(monkeypatch):
    trt, trtp, registry = _fake_tensorrt(monkeypatch)
    tp.register_plugins(90)
    ids = [f"omniace::{op}" for op in tp.OPS]
    assert set(registry) == {(kind, i) for kind in ("register", "autotune", "aot") for i in ids}
    L, S = _FakeDim(), _FakeDim()
    q = trtp.TensorDesc((L, _FakeDim(16), _FakeDim(72)), trt.bfloat16)
    pos, inv = trtp.TensorDesc((L, _FakeDim(3)), trt.int32), trtp.TensorDesc((_FakeDim(36),), trt.float32)
    qo, ko = registry["register", ids[0]](q, q, pos, inv, np.array([24, 24, 24], np.int32), 10000.0)
    assert qo.dtype == trt.bfloat16 and qo.shape_expr == (L, 16, 72)
    cu = trtp.TensorDesc((S,), trt.int32)
    out, lse = registry["register", ids[1]](q, q, q, cu, cu, 0.1)
    assert out.shape_expr == (L, 16, 72) and (lse.shape_expr, lse.dtype) == ((L, 16), trt.float32)
    h = trtp.TensorDesc((L, _FakeDim(1536)), trt.float16)
    mod = trtp.TensorDesc((S, _FakeDim(1536)), trt.float16)
    descs = registry["register", ids[2]](h, h, mod, mod, mod, cu, 1e-6, 8)
    assert [d.dtype for d in descs] == [trt.float16, trt.float16, trt.float32, trt.float32]
    assert descs[2].shape_expr == (L,)
    assert registry["autotune", ids[1]](q, q, q, cu, cu, (out, lse)) == [(tp.io_types("SegmentAttention"), "LINEAR")]
    with pytest.raises(ValueError, match="Rope3D: pos must be int32"):
        registry["register", ids[0]](q, q, trtp.TensorDesc((L, _FakeDim(3)), trt.float32), inv,
                                     np.array([24, 24, 24], np.int32), 10000.0)
    tp.register_plugins(90)  # idempotent: a second call registers nothing (the fake would raise)
    assert len(registry) == 9


@pytest.mark.tensorrt
def test_register_plugins_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin")
    tp.register_plugins(90)
    for op in tp.OPS:
        assert hasattr(getattr(trtp.op, tp.NAMESPACE), op)
