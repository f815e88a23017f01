"""The reference ops against independent formulations (complex numbers, dense masks, float64)."""
import pytest
import torch

from omniace.kernels import editnet_inject, rope3d, segment_attention
from omniace.kernels.ops import available_backends

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axes,head_dim", [((24, 24, 24), 72), ((8, 4, 4), 18), ((2, 6, 4), 13 * 2 + 1)])
def test_rope3d_matches_complex_rotation(dtype, axes, head_dim):
    L, H, Hk = 37, 3, 2
    q = torch.randn(L, H, head_dim).to(dtype)
    k = torch.randn(L, Hk, head_dim).to(dtype)
    pos = torch.randint(0, 50, (L, 3), dtype=torch.int32)
    qo, ko = rope3d(q, k, pos, axes)
    # independent: complex multiply in float64, frequencies per axis
    d = sum(axes)
    ang = []
    for a, m in enumerate(axes):
        inv = 10000.0 ** (-torch.arange(0, m, 2, dtype=torch.float64) / m)
        ang.append(pos[:, a, None].double() * inv)
    rot = torch.polar(torch.ones(L, d // 2, dtype=torch.float64), torch.cat(ang, 1))[:, None]
    for x, out in ((q, qo), (k, ko)):
        xc = torch.view_as_complex(x[..., :d].double().reshape(L, x.shape[1], d // 2, 2).contiguous())
        want = torch.cat([torch.view_as_real(xc * rot).flatten(-2), x[..., d:].double()], -1)
        assert out.dtype == dtype
        err = (out.double() - want).abs().max() / want.abs().max()
        assert err < 4 * TOL[dtype], err
        assert torch.equal(out[..., d:], x[..., d:])  # dims past sum(axes) pass unchanged


def test_rope3d_backward_is_inverse_rotation():
    L = 11
    q = torch.randn(L, 2, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(L, 1, 12, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 9, (L, 3), dtype=torch.int32)
    torch.autograd.gradcheck(lambda a, b: rope3d(a, b, pos, (4, 4, 2)), (q, k))


def _dense_attention(q, k, v, lq, lk, scale):
    """Dense masked attention in float64 over the block-diagonal mask (an independent formulation)."""
    sq = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq))
    sk = torch.repeat_interleave(torch.arange(len(lk)), torch.tensor(lk))
    allowed = sq[:, None] == sk[None, :]
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)  # rows with no key: zeros
    return torch.einsum("hqk,khd->qhd", p, v.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 72, 128, 13])
def test_segment_attention_matches_dense_mask(dtype, head_dim):
    lq, lk = [17, 1, 0, 40, 5], [3, 9, 4, 0, 33]  # odd lengths, empty q and empty k segments
    H = 2
    q, k, v = (torch.randn(sum(n), H, head_dim).to(dtype) for n in (lq, lk, lk))
    out = segment_attention(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk))
    want = _dense_attention(q, k, v, lq, lk, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - want).abs().max() < 4 * TOL[dtype] * max(1, want.abs().max())
    assert out[18:58].abs().max() == 0  # the q segment whose k segment is empty outputs zeros


def test_segment_attention_gradients():
    lq, lk = [5, 3], [4, 6]
    q = torch.randn(8, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(10, 2, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, 2, 6, dtype=torch.float64, requires_grad=True)
    out = segment_attention(q, k, v, _cu(lq), _cu(lk), 5, 6, scale=0.3)
    ref = _dense_attention(q, k, v, lq, lk, 0.3)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_editnet_inject_matches_definition(dtype):
    lengths = [7, 0, 31, 1]
    C = 45
    h, ctrl = torch.randn(39, C).to(dtype), torch.randn(39, C).to(dtype)
    shift, scale, gate = (torch.randn(4, C).to(dtype) for _ in range(3))
    h_out, y = editnet_inject(h, ctrl, shift, scale, gate, _cu(lengths))
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    want_h = h.double() + gate.double()[seg] * ctrl.double()
    mu, var = want_h.mean(-1, keepdim=True), want_h.var(-1, unbiased=False, keepdim=True)
    want_y = (want_h - mu) / (var + 1e-6).sqrt() * (1 + scale.double()[seg]) + shift.double()[seg]
    assert h_out.dtype == y.dtype == dtype
    assert (h_out.double() - want_h).abs().max() < 4 * TOL[dtype] * want_h.abs().max()
    assert (y.double() - want_y).abs().max() < 4 * TOL[dtype] * want_y.abs().max()


def test_editnet_inject_gradcheck():
    cu = _cu([3, 4])
    args = [torch.randn(7, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args += [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    torch.autograd.gradcheck(lambda *a: editnet_inject(*a, cu), tuple(args))


def test_bad_inputs_are_named():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="pos must be int32"):
        rope3d(q, q, torch.zeros(3, 3, dtype=torch.int32), (2, 2, 2))
    with pytest.raises(ValueError, match="exceeds the head dim"):
        rope3d(q, q, torch.zeros(4, 3, dtype=torch.int32), (4, 4, 4))
    with pytest.raises(ValueError, match="three non-negative even"):
        rope3d(q, q, torch.zeros(4, 3, dtype=torch.int32), (3, 2, 2))
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the row count 4"):
        segment_attention(q, q, q, _cu([3]), _cu([4]), 3, 4)
    with pytest.raises(ValueError, match="int32"):
        segment_attention(q, q, q, torch.tensor([0, 4]), _cu([4]), 4, 4)
    with pytest.raises(ValueError, match="must be fp32/fp16/bf16"):
        segment_attention(q.long(), q, q, _cu([4]), _cu([4]), 4, 4)
    with pytest.raises(ValueError, match=r"shift must be \[S=1, C=8\]"):
        editnet_inject(q[:, 0], q[:, 0], torch.zeros(2, 8), torch.zeros(1, 8), torch.zeros(1, 8), _cu([4]))


def test_backend_switch(monkeypatch):
    q = torch.randn(3, 1, 4)
    pos = torch.zeros(3, 3, dtype=torch.int32)
    named_only = ("dense", "onnx_plugin")  # no host reads / export: used only when named
    assert [b for b in available_backends("rope3d") if b not in named_only][-1] == "reference"
    assert "cuda" not in available_backends("rope3d", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        rope3d(q, q, pos, (2, 2, 0), backend="nope")
    with pytest.raises(RuntimeError, match="'cuda' cannot run on device cpu"):
        rope3d(q, q, pos, (2, 2, 0), backend="cuda")
    with pytest.raises(RuntimeError, match="'flash_attn' cannot run on device cpu"):
        segment_attention(q, q, q, _cu([3]), _cu([3]), 3, 3, backend="flash_attn")
    monkeypatch.setenv("OMNIACE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        rope3d(q, q, pos, (2, 2, 0))
    monkeypatch.setenv("OMNIACE_BACKEND", "reference")
    rope3d(q, q, pos, (2, 2, 0))


def test_auto_ranks_triton_attention_above_the_cuda_cross_kernel(monkeypatch):
    """The CUDA cross-attention runs on CUDA cores: on a GPU ``auto`` picks Triton (tensor cores) for
    attention, and keeps the CUDA kernels for rope3d and editnet_inject."""
    import dataclasses

    from omniace.kernels import ops

    for op in ops.OPS:  # pretend a GPU where both kernel backends pass their checks
        for name in ("cuda", "triton"):
            entry = ops._REGISTRY[op][name]
            monkeypatch.setitem(ops._REGISTRY[op], name, dataclasses.replace(entry, available=lambda d: True))
    gpu = torch.device("cuda")
    assert ops._auto("segment_attention", gpu, torch.bfloat16).name == "triton"
    assert ops._auto("rope3d", gpu, torch.bfloat16).name == "cuda"
    assert ops._auto("editnet_inject", gpu, torch.float16).name == "cuda"
    assert ops._resolve("segment_attention", "cuda", gpu, torch.bfloat16) is ops._REGISTRY["segment_attention"]["cuda"].fn


def test_auto_on_the_cpu_runs_attention_one_sdpa_per_segment(monkeypatch):
    """On the CPU ``auto`` picks per-segment SDPA (no padding), which matches the reference, including an
    empty key segment (zeros) and a strided q; under torch.compile it traces without a graph break."""
    from omniace.kernels import ops

    monkeypatch.delenv("OMNIACE_BACKEND", raising=False)
    q = torch.randn(3 + 6 + 4, 3, 16)[:, :, :13]  # a view: head dim 13 of 16
    k, v = torch.randn(2, 5 + 0 + 7, 3, 13)
    cu_q, cu_k = _cu([3, 6, 4]), _cu([5, 0, 7])
    assert ops._auto("segment_attention", q.device, q.dtype).name == "sdpa_segments"
    assert "sdpa_segments" not in available_backends("segment_attention", "meta")  # offered on the CPU only
    got = segment_attention(q, k, v, cu_q, cu_k, 6, 7)
    want = segment_attention(q, k, v, cu_q, cu_k, 6, 7, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool((got[3:9] == 0).all())
    one = _cu([13])  # one segment: SDPA's own (strided) output, no copy
    k1, v1 = torch.randn(2, 13, 3, 13)
    torch.testing.assert_close(segment_attention(q, k1, v1, one, one, 13, 13).flatten(1),
                               segment_attention(q, k1, v1, one, one, 13, 13, backend="reference").flatten(1),
                               atol=1e-5, rtol=1e-5)
    traced = torch.compile(lambda q, k, v: segment_attention(q, k, v, cu_q, cu_k, 6, 7), fullgraph=True,
                           backend="eager")
    torch.testing.assert_close(traced(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_on_the_cpu_injects_segment_by_segment(dtype, monkeypatch):
    """On the CPU ``auto`` runs editnet_inject per segment (no gathered [L, C] modulation rows); outputs
    and gradients match the reference (empty segments included), and torch.compile traces it whole."""
    from omniace.kernels import ops

    monkeypatch.delenv("OMNIACE_BACKEND", raising=False)
    assert ops._auto("editnet_inject", torch.device("cpu"), dtype).name == "segments"
    cu = _cu([4, 0, 9, 1])
    args = [torch.randn(14, 24).to(dtype), torch.randn(14, 24).to(dtype)] + [torch.randn(4, 24).to(dtype) for _ in range(3)]
    grads = [torch.randn(14, 24).to(dtype) for _ in range(2)]
    results = []
    for backend in ("auto", "reference"):
        xs = [a.clone().requires_grad_() for a in args]
        outs = editnet_inject(*xs, cu, backend=backend)
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(outs, xs, grads)))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for i, (got, want) in enumerate(zip(*results)):
        assert got.dtype == want.dtype, i
        torch.testing.assert_close(got.float(), want.float(), atol=tol * 4, rtol=tol, msg=f"output/grad {i}")
    traced = torch.compile(lambda *a: editnet_inject(*a, cu), fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(*args)[1].float(), results[1][1].float(), atol=tol * 4, rtol=tol)


def test_the_kernels_folder_is_inert_as_a_top_level_package():
    """transformers/diffusers import a top-level ``kernels`` package (Hugging Face's) to read its version; with
    the checkout on sys.path they found this folder, executed it again and registered the omniace:: custom ops
    twice, which corrupted torch's dispatcher (a later kernel call crashed). Under that name it is now empty."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, torch; import omniace.kernels.custom_ops; import kernels\n"
            "print(sorted(m for m in sys.modules if m.startswith('kernels.')), hasattr(kernels, 'segment_attention'))\n"
            "try:\n    import kernels.ops\nexcept ImportError:\n    print('no-submodules')\n"
            "print(torch.ops.omniace.segment_attention.default._schema.name)")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "False", "no-submodules", "omniace::segment_attention"]
