"""Triton kernels (and, on a GPU, the CUDA ones) against the reference ops.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set in conftest) with small tiles, so
small odd shapes still cover many blocks, partial blocks, empty and short segments and one long
segment. bf16 runs on the GPU only: Triton 3.9's interpreter computes bf16 arithmetic wrongly.

Tolerance rule (flash-attention's): the kernel's error against a float64 evaluation of the reference may
be at most twice the reference's own error in the same dtype, plus a small absolute slack per dtype.
"""
import pytest
import torch

from omniace.kernels import editnet_inject, rope3d, segment_attention
from omniace.kernels.ops import available_backends, use_backend

from helpers import cu_seqlens, tiny_ace_case

GPU = pytest.mark.gpu
SLACK = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU)]


def _device(dtype):
    return "cuda" if dtype == torch.bfloat16 else "cpu"


def assert_close(fast, ref_low, ref_hi, dtype, what):
    """``fast`` vs ``ref_hi`` (float64) within 2x the error of ``ref_low`` (reference in ``dtype``)."""
    for i, (f, lo, hi) in enumerate(zip(fast, ref_low, ref_hi)):
        assert f.shape == hi.shape and f.dtype == lo.dtype, (what, i, f.shape, hi.shape, f.dtype, lo.dtype)
        err = (f.double() - hi.double()).abs().max().item() if f.numel() else 0.0
        own = (lo.double() - hi.double()).abs().max().item() if f.numel() else 0.0
        scale = max(1.0, hi.abs().max().item() if f.numel() else 1.0)
        assert err <= 2 * own + SLACK[dtype] * scale, f"{what}[{i}]: error {err:.3g} vs reference's own {own:.3g}"


def _run(fn, inputs, grads_out, backend, dtype=None):
    """Outputs and input gradients of ``fn`` under ``backend``; inputs cast to ``dtype`` first."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    with use_backend(backend):
        outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [x for x in xs if x.requires_grad]
    gs = torch.autograd.grad(outs, diff, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + list(gs)


def check_against_reference(fn, inputs, grads_out, dtype, what, backend="triton"):
    fast = _run(fn, inputs, grads_out, backend, dtype)
    low = _run(fn, inputs, grads_out, "reference", dtype)
    high = _run(fn, inputs, grads_out, "reference", torch.float64)
    assert_close(fast, low, high, dtype, what)


# ---- rope3d ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axes,head_dim", [((8, 28, 28), 64), ((24, 24, 24), 72), ((32, 48, 48), 128),
                                           ((4, 8, 8), 27)])
def test_rope3d_triton(dtype, axes, head_dim):
    dev = _device(dtype)
    L, H, Hk = 37, 3, 2
    qkv = torch.randn(L, H + 2 * Hk, head_dim, device=dev)  # q, k as strided views, as the models pass them
    pos = torch.randint(0, 40, (L, 3), dtype=torch.int32, device=dev)

    def fn(qkv):
        q, k, _ = qkv.split([H, Hk, Hk], dim=1)
        return rope3d(q, k, pos, axes)

    grads = [torch.randn(L, H, head_dim, device=dev), torch.randn(L, Hk, head_dim, device=dev)]
    check_against_reference(fn, [qkv], grads, dtype, f"rope3d D={head_dim}")


# ---- segment_attention -------------------------------------------------------------------------------
ATTN_CASES = {
    # name: (query segment lengths, key segment lengths)
    "self_ragged": ([37, 0, 5, 50], [37, 0, 5, 50]),  # odd, empty, shorter than a tile, several tiles
    "cross_short_keys": ([70, 33, 0, 9], [7, 20, 3, 0]),  # per-CU text keys; one unit with no text
    "one_long_segment": ([211], [211]),
    # whole tiles only (the interpreter's tiles are 16): every block takes the mask-free interior path
    "tile_multiples": ([32, 16, 48], [64, 16, 48]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 128, 13])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_segment_attention_triton(dtype, head_dim, case):
    if case == "one_long_segment" and head_dim != 72 and dtype != torch.bfloat16:
        pytest.skip("one head dim is enough for the long segment on the interpreter")
    dev = _device(dtype)
    lq, lk = ATTN_CASES[case]
    H = 2
    q = torch.randn(sum(lq), H, head_dim, device=dev)
    k = torch.randn(sum(lk), H, head_dim, device=dev) * 1.5  # peakier softmax than unit scale
    v = torch.randn(sum(lk), H, head_dim, device=dev)
    cu_q, cu_k = cu_seqlens(lq, dev), cu_seqlens(lk, dev)

    def fn(q, k, v):
        return segment_attention(q, k, v, cu_q, cu_k, max(lq), max(lk))

    check_against_reference(fn, [q, k, v], [torch.randn_like(q)], dtype, f"attention {case} D={head_dim}")


def test_segment_attention_takes_strided_views():
    """q/k/v as slices of a packed qkv, and a q whose head dim is not unit-stride."""
    lens = [13, 30]
    qkv = torch.randn(43, 3, 2, 24)
    q = torch.randn(43, 24, 2).transpose(1, 2)  # stride(-1) == 2
    cu = cu_seqlens(lens)

    def fn(qkv, q):
        return segment_attention(q, qkv[:, 1], qkv[:, 2], cu, cu, 30, 30)

    check_against_reference(fn, [qkv, q], [torch.randn(43, 2, 24)], torch.float32, "strided attention")


@pytest.mark.parametrize("dtype,strides,align", [
    (torch.bfloat16, (1152, 72), 8),  # the ACE preset: 16 heads of 72, a 144-byte head the JIT cannot prove
    (torch.float16, (3 * 1152, 72, 1152, 72), 8),  # q/k/v as views of a packed qkv
    (torch.float16, (1156, 72), 4),  # a padded row: 8-byte alignment only
    (torch.float32, (216, 72), 4),
    (torch.float32, (78, 26), 2),
    (torch.bfloat16, (39, 13), 1),  # odd head dim: scalar loads
])
def test_row_align_is_the_widest_alignment_every_stride_allows(dtype, strides, align):
    from omniace.kernels.triton_attention import row_align

    assert row_align(dtype, strides) == align


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_segment_attention_with_rows_aligned_below_16_bytes(pad):
    """Row strides of 24 + pad fp32 elements give ALIGN 1, 2 and 4: the kernels scale every stride back."""
    from omniace.kernels.triton_attention import row_align

    lens, H, D = [21, 40], 2, 24
    buf = torch.randn(61, 3, H * D + pad)  # q, k, v rows padded by `pad` elements

    def view(i, t):
        return t[:, i, :H * D].unflatten(-1, (H, D))

    assert row_align(torch.float32, (view(0, buf).stride(0), D)) == {1: 1, 2: 2, 4: 4}[pad]
    cu = cu_seqlens(lens)

    def fn(buf):
        return segment_attention(view(0, buf), view(1, buf), view(2, buf), cu, cu, 40, 40)

    check_against_reference(fn, [buf], [torch.randn(61, H, D)], torch.float32, f"attention pad={pad}")


def test_attention_backward_is_two_kernels_dq_first():
    """``delta`` is computed inside the dQ kernel, so it must launch before the dK/dV kernel that reads it."""
    from omniace.kernels import triton_attention as ta
    from omniace.kernels.triton_aot import captured

    q, lse = torch.randn(20, 2, 16), torch.zeros(20, 2)
    cu = cu_seqlens([20])
    with captured((ta,)) as launches:
        ta.attention_backward(q, q, q, q, q, lse, cu, cu, 20, 20, 0.25)
    assert [launch.kernel.__name__ for launch in launches] == ["_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]


def test_ops_export_as_single_custom_ops():
    """torch.export sees each kernel call as one omniace op (fake implementations, no kernel runs)."""

    class Block(torch.nn.Module):
        def forward(self, q, k, pos, cu, h, mods):
            q, k = rope3d(q, k, pos, (4, 4, 4), backend="triton")
            o = segment_attention(q, k, k, cu, cu, 5, 5, backend="triton")
            return editnet_inject(h, o.flatten(1), mods[0], mods[1], mods[2], cu, backend="triton")

    args = (torch.randn(9, 2, 16), torch.randn(9, 2, 16), torch.zeros(9, 3, dtype=torch.int32), cu_seqlens([4, 5]),
            torch.randn(9, 32), torch.randn(3, 2, 32))
    graph = torch.export.export(Block(), args).graph_module.code
    for op in ("omniace.rope3d", "omniace.segment_attention", "omniace.editnet_inject"):
        assert graph.count(op + ".default") == 1, graph


def test_segment_attention_lse_is_logsumexp():
    from omniace.kernels.custom_ops import segment_attention_op

    lq, lk = [9, 4, 20], [5, 0, 40]
    q, k, v = torch.randn(33, 2, 16), torch.randn(45, 2, 16), torch.randn(45, 2, 16)
    _, lse = segment_attention_op(q, k, v, cu_seqlens(lq), cu_seqlens(lk), 20, 40, 0.25, "triton")
    bq, bk = cu_seqlens(lq).tolist(), cu_seqlens(lk).tolist()
    for s in range(3):
        scores = torch.einsum("qhd,khd->qhk", q[bq[s]:bq[s + 1]], k[bk[s]:bk[s + 1]]) * 0.25
        torch.testing.assert_close(lse[bq[s]:bq[s + 1]], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


# ---- editnet_inject ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,channels", [([5, 0, 30, 1], 37), ([3, 9, 14, 2, 8], 96), ([40], 200)])
def test_editnet_inject_triton(dtype, lengths, channels):
    dev = _device(dtype)
    L, S, C = sum(lengths), len(lengths), channels
    cu = cu_seqlens(lengths, dev)
    hc = torch.randn(L, 2 * C, device=dev) * 2 + 0.5  # h and ctrl as column slices of one buffer
    mods = [torch.randn(S, C, device=dev) * 0.5 for _ in range(3)]

    def fn(hc, shift, scale, gate):
        return editnet_inject(hc[:, :C], hc[:, C:], shift, scale, gate, cu)

    grads = [torch.randn(L, C, device=dev), torch.randn(L, C, device=dev)]
    check_against_reference(fn, [hc, *mods], grads, dtype, f"editnet_inject C={C}")


def _inject_grads(h, ctrl, mods, cu, grads):
    xs = [t.detach().clone().requires_grad_() for t in (h, ctrl, *mods)]
    outs = editnet_inject(*xs[:2], *xs[2:], cu, backend="triton")
    return torch.autograd.grad(outs, xs, grads)


# the instance (segments straddling 8-row programs, an empty one) and odd shapes of our own:
# segments shorter than a program, runs of empty segments, one segment over many programs, no rows at all
INJECT_DET_CASES = [([5, 0, 30, 1], 37), ([0, 3, 0, 0, 2, 9, 1, 0], 19), ([61], 45), ([0, 0], 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=GPU)])
@pytest.mark.parametrize("lengths,channels", INJECT_DET_CASES)
def test_editnet_inject_backward_is_deterministic(dtype, lengths, channels):
    """Two backward runs give bit-identical gradients, and they match the reference (tolerance rule above)."""
    dev = _device(dtype)
    L, S, C = sum(lengths), len(lengths), channels
    cu = cu_seqlens(lengths, dev)
    h, ctrl = (torch.randn(L, C, device=dev, dtype=dtype) * 2 + 0.5 for _ in range(2))
    mods = [(torch.randn(S, C, device=dev) * 0.5).to(dtype) for _ in range(3)]
    grads = [torch.randn(L, C, device=dev, dtype=dtype) for _ in range(2)]
    first, second = _inject_grads(h, ctrl, mods, cu, grads), _inject_grads(h, ctrl, mods, cu, grads)
    for name, a, b in zip(("h", "ctrl", "shift", "scale", "gate"), first, second):
        assert a.dtype == dtype and torch.equal(a.view(torch.int8), b.view(torch.int8)), f"d {name} differs"
    if L == 0:  # no rows: the modulation gradients are exact zeros, not uninitialised memory
        assert all(bool((g == 0).all()) for g in first[2:])
    check_against_reference(lambda h, c, a, b, g: editnet_inject(h, c, a, b, g, cu), [h, ctrl, *mods], grads,
                            dtype, f"editnet_inject bwd {lengths} C={C}")


def test_editnet_inject_backward_sums_in_a_fixed_order():
    """d shift is exactly the fp32 sum over rows in row order inside each 8-row program, then over the
    programs in order: a fixed function of the inputs, whatever order the GPU schedules programs in."""
    from omniace.kernels.triton_inject import backward_meta

    lengths, C = [3, 21, 0, 12], 29
    rows = backward_meta(C, len(lengths), sum(lengths))["ROWS"]
    cu = cu_seqlens(lengths)
    h, ctrl = torch.randn(2, sum(lengths), C)
    mods = [torch.randn(len(lengths), C) for _ in range(3)]
    dy = torch.randn(sum(lengths), C) * 1e3  # large and small terms: a different order rounds differently
    dy[::5] *= 1e-4
    d_shift = _inject_grads(h, ctrl, mods, cu, [torch.zeros_like(dy), dy])[2]
    for s in range(len(lengths)):
        total = torch.zeros(C)
        for p0 in range(int(cu[s]) // rows * rows, int(cu[s + 1]), rows):  # the programs segment s overlaps
            part = torch.zeros(C)
            for r in range(max(p0, int(cu[s])), min(p0 + rows, int(cu[s + 1]))):
                part = part + dy[r]
            total = total + part
        assert torch.equal(d_shift[s], total), f"segment {s}"


def test_editnet_inject_kernels_use_no_atomics():
    """Atomics would make the gradient sums depend on scheduling; the interpreter cannot show that."""
    import ast
    import inspect

    from omniace.kernels import triton_inject

    tree = ast.parse(inspect.getsource(triton_inject))
    calls = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("atomic")}
    assert not calls, calls


_INJECT_PTX = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from omniace.kernels import triton_inject as ti

F32 = {"cu": "i32", "mean": "fp32", "rstd": "fp32", "p_shift": "fp32", "p_scale": "fp32", "p_gate": "fp32"}
HALF = ("dh_out", "dy", "h_out", "ctrl", "scale", "gate", "dh", "dctrl")
C = 1152
bwd = ti.backward_meta(C, 2, 8192, interpret=False)
red = dict(ROWS=bwd["ROWS"], **ti.reduce_meta(C, interpret=False))
for fn, meta, partial in ((ti._inject_bwd_kernel, bwd, "fp32"), (ti._inject_reduce_kernel, red, "bf16")):
    meta = dict(meta)
    warps = meta.pop("num_warps")
    sig = {}
    for a in fn.arg_names:
        if a in meta:
            sig[a] = "constexpr"
        elif a in F32 or a in HALF or a.startswith("d_"):
            sig[a] = "*" + (F32.get(a) or ("bf16" if a in HALF else partial))
        else:
            sig[a] = "i64" if a.startswith("s_") else "i32"
    k = triton.compile(ASTSource(fn, sig, {(fn.arg_names.index(a),): v for a, v in meta.items()}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ops = [t[1] if t[0].startswith("@") and len(t) > 1 else t[0]  # "@%p1 st.global..." is predicated
           for t in (line.split() for line in k.asm["ptx"].splitlines()) if t]
    print(fn.__name__, "atom", sum(o.startswith("atom.") for o in ops), "red", sum(o.startswith("red.") for o in ops),
          "st.global", sum(o.startswith("st.global") for o in ops))
"""


def test_editnet_inject_backward_ptx_has_no_atomics(tmp_path):
    """What runs on the GPU: both backward kernels compiled for sm_90 (no GPU needed) hold no atomic
    (``atom.``) or reduction (``red.``) instruction."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _INJECT_PTX], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()[:2]
    assert [ln.split(" st.global")[0] for ln in lines] == ["_inject_bwd_kernel atom 0 red 0",
                                                           "_inject_reduce_kernel atom 0 red 0"], lines
    assert all(int(ln.rsplit(" ", 1)[1]) > 0 for ln in lines), lines  # the sums are stored, plainly


@GPU
def test_editnet_inject_backward_is_bit_identical_at_scale():
    """Thousands of programs race on a GPU: the sums must still not depend on which finishes first."""
    lengths, C = [9000, 1, 7000, 4096], 1152
    cu = cu_seqlens(lengths, "cuda")
    h, ctrl, dh, dy = (torch.randn(sum(lengths), C, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mods = [torch.randn(len(lengths), C, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    runs = [_inject_grads(h, ctrl, mods, cu, [dh, dy]) for _ in range(3)]
    for later in runs[1:]:
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(runs[0], later))


# ---- registration ------------------------------------------------------------------------------------
def test_auto_never_picks_the_interpreter():
    q = torch.randn(5, 1, 8)
    assert "triton" in available_backends("rope3d", "cpu")  # runnable here, under the interpreter
    assert available_backends("segment_attention", "cpu")[:1] == ["triton"]
    from omniace.kernels.ops import _auto

    assert _auto("rope3d", q.device, q.dtype).name == "reference"
    with pytest.raises(ValueError, match="backend 'triton' takes"):
        rope3d(q.double(), q.double(), torch.zeros(5, 3, dtype=torch.int32), (2, 2, 2), backend="triton")


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration, as torch.library checks them."""
    from omniace.kernels import custom_ops as C

    q = torch.randn(11, 2, 16, requires_grad=True)
    k = torch.randn(11, 1, 16, requires_grad=True)
    pos = torch.randint(0, 5, (11, 3), dtype=torch.int32)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(C.rope3d_op, (q, k, pos, [4, 4, 4], 10000.0, "triton"), test_utils=tests)
    cu_q, cu_k = cu_seqlens([6, 5]), cu_seqlens([3, 4])
    kv = torch.randn(7, 2, 16, requires_grad=True)
    torch.library.opcheck(C.segment_attention_op, (q, kv, kv, cu_q, cu_k, 6, 4, 0.25, "triton"), test_utils=tests)
    h = torch.randn(11, 24, requires_grad=True)
    mods = [torch.randn(2, 24, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(C.editnet_inject_op, (h, h * 2, *mods, cu_q, 1e-6, "triton"), test_utils=tests)


def test_compiled_graph_holds_one_op_per_call():
    """torch.compile sees each kernel as one op (forward and backward), with no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k = torch.randn(9, 2, 16, requires_grad=True), torch.randn(9, 2, 16, requires_grad=True)
    pos = torch.randint(0, 5, (9, 3), dtype=torch.int32)
    cu = cu_seqlens([4, 5])

    def step(q, k):
        q2, k2 = rope3d(q, k, pos, (4, 4, 4), backend="triton")
        return segment_attention(q2, k2, k2, cu, cu, 5, 5, backend="triton").square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    loss = torch.compile(step, backend=counter, fullgraph=True)(q, k)
    loss.backward()
    assert counter.frame_count == 1
    want_q = torch.autograd.grad(step(q, k), q)[0]
    torch.testing.assert_close(q.grad, want_q)


# ---- the models on the kernels -------------------------------------------------------------------------
def test_ace_tiny_forward_backward_on_triton():
    model, batch, x, t = tiny_ace_case()
    outs = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with use_backend(backend):
            out = model(batch, x, t)
        out.square().mean().backward()
        outs[backend] = (out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], atol=2e-5, rtol=1e-4)
    for a, b in zip(outs["triton"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


# ---- GPU only: bf16 above, CUDA kernels, large shapes --------------------------------------------------
@GPU
def test_cuda_backend_self_check_and_ops():
    from omniace.kernels import cuda_ext

    cuda_ext.load()
    assert cuda_ext.self_check(torch.device("cuda")) == []
    L, H = 300, 4
    pos = torch.randint(0, 64, (L, 3), dtype=torch.int32, device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qkv = torch.randn(L, 3 * H, 72, device="cuda")
        check_against_reference(lambda t: rope3d(t[:, :H], t[:, H:2 * H], pos, (24, 24, 24)), [qkv],
                                [torch.randn(L, H, 72, device="cuda")] * 2, dtype, "cuda rope3d", "cuda")
        lq, lk = [200, 0, 100], [120, 5, 1]
        q, k, v = (torch.randn(sum(n), H, 72, device="cuda") for n in (lq, lk, lk))
        cq, ck = cu_seqlens(lq, "cuda"), cu_seqlens(lk, "cuda")
        check_against_reference(lambda q, k, v: segment_attention(q, k, v, cq, ck, 200, 120), [q, k, v],
                                [torch.randn_like(q)], dtype, "cuda cross-attention", "cuda")
        h = torch.randn(L, 1152, device="cuda")
        mods = [torch.randn(3, 1152, device="cuda") for _ in range(3)]
        cu = cu_seqlens([100, 0, 200], "cuda")
        check_against_reference(lambda h, c, a, b, g: editnet_inject(h, c, a, b, g, cu), [h, h.flip(0), *mods],
                                [torch.randn_like(h)] * 2, dtype, "cuda editnet_inject", "cuda")


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_segment_attention_triton_large(dtype):
    lens = [4096 + 17, 1024, 3 * 1024 + 5]
    H, D = 16, 72
    q, k, v = (torch.randn(sum(lens), H, D, device="cuda") for _ in range(3))
    cu = cu_seqlens(lens, "cuda")
    check_against_reference(lambda q, k, v: segment_attention(q, k, v, cu, cu, max(lens), max(lens)),
                            [q, k, v], [torch.randn_like(q)], dtype, "attention large")


# ---- attention baselines (the bench compares against them, so they must be right) ----------------------
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("case", ["self_ragged", "cross_short_keys"])
def test_attention_baselines(backend, case):
    lq, lk = ATTN_CASES[case]
    q, k, v = torch.randn(sum(lq), 2, 16), torch.randn(sum(lk), 2, 16), torch.randn(sum(lk), 2, 16)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)

    def fn(q, k, v):
        return segment_attention(q, k, v, cu_q, cu_k, max(lq), max(lk))

    if backend == "flex":  # FlexAttention has no CPU backward; forward only here, both on the GPU bench
        with use_backend("flex"):
            got = fn(q, k, v)
        torch.testing.assert_close(got, fn(q, k, v), atol=1e-5, rtol=1e-5)
        return
    check_against_reference(fn, [q, k, v], [torch.randn_like(q)], torch.float32, f"{backend} {case}", backend)
