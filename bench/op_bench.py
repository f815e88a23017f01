"""Per-op benchmarks: every provider of rope3d, segment_attention and editnet_inject, per mode.

Providers: ``reference`` (eager PyTorch), ``compile`` (the reference under ``torch.compile``), the
omniace kernels ``triton`` and ``cuda``, and for attention the baselines ``sdpa``, ``flex``, ``varlen``,
``flash_attn`` and ``xformers``. Modes: ``fwd`` (no autograd), ``bwd`` (the backward alone, graph kept)
and ``full`` (forward + backward). Before timing, every provider's forward is checked against the
reference (or against Triton where the reference would not fit in memory); a mismatch is reported in
the row's status. Throughput is GB/s (minimum bytes an op must move) for rope3d and editnet_inject and
TFLOP/s (4·H·D·Σ lq·lk forward, 2.5x that backward, FlashAttention's convention) for attention.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from omniace.kernels import editnet_inject, rope3d, segment_attention

from .cases import AttnCase, InjectCase, RopeCase, attention_cases, inject_cases, rope_cases
from .hardware import Hardware
from .timing import measure

OPS = ("rope3d", "segment_attention", "editnet_inject")
MODES = ("fwd", "bwd", "full")
OMNIACE = ("triton", "cuda")
PROVIDERS = {
    "rope3d": ("reference", "compile", "triton", "cuda"),
    "segment_attention": ("reference", "triton", "cuda", "sdpa", "flex", "varlen", "flash_attn", "xformers"),
    "editnet_inject": ("reference", "compile", "triton", "cuda"),
}
# The reference attention is a Python loop over segments with data-dependent bounds: torch.compile
# breaks the graph at every segment and measures nothing useful, so SDPA/flex/varlen stand in for it.


@dataclass
class Problem:
    op: str
    case: str
    tokens: int
    leaves: list[Tensor]
    forward: Callable[[str, list[Tensor]], tuple[Tensor, ...]]
    metric: str  # "GB/s" or "TFLOP/s"
    amount: dict[str, float]  # bytes or FLOPs per mode
    reference_bytes: int = 0  # peak extra memory of the reference backward (skip it where that won't fit)


@dataclass
class Row:
    op: str
    case: str
    mode: str
    provider: str
    dtype: str
    tokens: int
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    metric: str = ""
    throughput: float | None = None
    fraction_of_limit: float | None = None
    max_rel_err: float | None = None
    speedup_over: dict[str, float] = field(default_factory=dict)  # other provider -> its time / this time


def _tup(x) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def rope_problem(c: RopeCase, dtype: torch.dtype, device: torch.device) -> Problem:
    L, H, D = c.tokens, c.heads, c.head_dim
    qkv = torch.randn(L, 3 * H, D, device=device, dtype=dtype)  # q and k as strided views, as in the model
    side = int(max(1, (L // 4) ** 0.5))
    pos = torch.stack([torch.arange(L, device=device) // (side * side), torch.arange(L, device=device) // side % side,
                       torch.arange(L, device=device) % side], 1).to(torch.int32)

    def forward(backend: str, leaves: list[Tensor]) -> tuple[Tensor, ...]:
        (x,) = leaves
        return rope3d(x[:, :H], x[:, H:2 * H], pos, c.axes, backend=backend)

    nbytes = 2 * L * 2 * H * D * qkv.element_size()
    return Problem("rope3d", c.name, L, [qkv], forward, "GB/s", {"fwd": nbytes, "bwd": nbytes, "full": 2 * nbytes})


def attention_problem(c: AttnCase, dtype: torch.dtype, device: torch.device) -> Problem:
    H, D = c.heads, c.head_dim
    q = torch.randn(sum(c.lq), H, D, device=device, dtype=dtype)
    k = torch.randn(sum(c.lk), H, D, device=device, dtype=dtype)
    v = torch.randn(sum(c.lk), H, D, device=device, dtype=dtype)
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
          for lens in (c.lq, c.lk)]

    def forward(backend: str, leaves: list[Tensor]) -> tuple[Tensor, ...]:
        return (segment_attention(*leaves, cu[0], cu[1], max(c.lq), max(c.lk), backend=backend),)

    pairs = sum(a * b for a, b in zip(c.lq, c.lk))
    flops = 4.0 * H * D * pairs
    return Problem("segment_attention", c.name, c.tokens, [q, k, v], forward, "TFLOP/s",
                   {"fwd": flops, "bwd": 2.5 * flops, "full": 3.5 * flops}, reference_bytes=5 * 4 * H * max(
                       a * b for a, b in zip(c.lq, c.lk)))


def inject_problem(c: InjectCase, dtype: torch.dtype, device: torch.device) -> Problem:
    L, C, S = c.tokens, c.channels, len(c.lengths)
    cu = torch.tensor([0, *torch.tensor(c.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    leaves = [torch.randn(L, C, device=device, dtype=dtype), torch.randn(L, C, device=device, dtype=dtype)]
    leaves += [0.1 * torch.randn(S, C, device=device, dtype=dtype) for _ in range(3)]

    def forward(backend: str, leaves: list[Tensor]) -> tuple[Tensor, ...]:
        return editnet_inject(*leaves, cu, backend=backend)

    e = leaves[0].element_size()
    return Problem("editnet_inject", c.name, L, leaves, forward, "GB/s",
                   {"fwd": 4 * L * C * e, "bwd": 6 * L * C * e, "full": 10 * L * C * e})


CASES = {"rope3d": (rope_cases, rope_problem), "segment_attention": (attention_cases, attention_problem),
         "editnet_inject": (inject_cases, inject_problem)}


def case_names(op: str, small: bool) -> list[str]:
    """The case names of ``op`` as the CLI's table prints them, in the order of :func:`problems`."""
    return [c.name for c in CASES[op][0](small)]


def problems(op: str, small: bool, dtype: torch.dtype, device: torch.device) -> list[Callable[[], Problem]]:
    """Deferred problem builders (inputs are allocated one case at a time)."""
    shapes, build = CASES[op]
    return [functools.partial(build, c, dtype, device) for c in shapes(small)]


def _callable(p: Problem, provider: str) -> Callable[[list[Tensor]], tuple[Tensor, ...]]:
    if provider == "compile":  # default dynamic: static on the first shape, one dynamic graph after
        return _compiled_reference(p.op, p.forward)
    return lambda *xs: p.forward(provider, list(xs))


_COMPILED: dict[str, Callable] = {}


def _compiled_reference(op: str, forward: Callable) -> Callable:
    """One torch.compile wrapper per op, so later cases reuse its (dynamic) graph instead of recompiling."""
    if op not in _COMPILED:
        # every case is a new shape and closure: allow the recompiles rather than fall back to eager
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        # the bwd mode replays one backward on a kept graph; donated buffers forbid retain_graph
        torch._functorch.config.donated_buffer = False
        _COMPILED[op] = torch.compile(lambda fwd, *xs: fwd("reference", list(xs)))
    compiled = _COMPILED[op]
    return lambda *xs: compiled(forward, *xs)


def _skip_reason(p: Problem, provider: str, device: torch.device, mode: str = "fwd") -> str | None:
    from omniace.kernels.ops import _REGISTRY

    if provider == "flex" and device.type == "cpu" and mode != "fwd":
        return "skipped: FlexAttention has no CPU backward"
    if provider == "compile" and p.op == "segment_attention":
        return "skipped: reference attention loops over segments (no single compiled graph)"
    name = "reference" if provider == "compile" else provider
    entry = _REGISTRY[p.op].get(name)
    if entry is None or not entry.available(device):
        return "unavailable on this machine"
    if device.type == "cpu" and name in OMNIACE:
        return "skipped: Triton on the CPU is the test interpreter, not a provider"
    if p.leaves[0].dtype not in entry.dtypes:
        return f"unavailable for {p.leaves[0].dtype}"
    if name == "reference" and p.reference_bytes and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if p.reference_bytes > 0.5 * free:
            return f"skipped: reference would need {p.reference_bytes / 2**30:.0f} GiB"
    return None


def _max_rel_err(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> float:
    err = 0.0
    for a, b in zip(got, want):
        scale = max(1.0, b.float().abs().max().item())
        err = max(err, (a.float() - b.float()).abs().max().item() / scale)
    return err


MISMATCH = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def run_problem(p: Problem, providers: list[str], modes: list[str], hw: Hardware, device: torch.device,
                warmup: int, rep: int) -> list[Row]:
    dtype = p.leaves[0].dtype
    limit = hw.copy_gb_s if p.metric == "GB/s" else hw.matmul_tflop_s
    rows, want = [], None
    usable = {}
    for prov in providers:
        reason = _skip_reason(p, prov, device)
        if reason:
            rows += [Row(p.op, p.case, m, prov, str(dtype), p.tokens, reason) for m in modes]
            continue
        usable[prov] = _callable(p, prov)
    oracle = "reference" if "reference" in usable else next(iter(usable), None)
    with torch.no_grad():
        if oracle is not None:
            want = _tup(usable[oracle](*p.leaves))
    for prov, fn in usable.items():
        try:
            with torch.no_grad():
                err = _max_rel_err(_tup(fn(*p.leaves)), want)
        except Exception as exc:  # report, keep benchmarking the others
            rows += [Row(p.op, p.case, m, prov, str(dtype), p.tokens, f"error: {exc}"[:200]) for m in modes]
            continue
        status = "ok" if err <= MISMATCH[dtype] else f"MISMATCH vs {oracle}"
        for mode in modes:
            row = Row(p.op, p.case, mode, prov, str(dtype), p.tokens, status, metric=p.metric, max_rel_err=err)
            reason = _skip_reason(p, prov, device, mode)
            if reason:
                row.status = reason
                rows.append(row)
                continue
            try:
                t = _time_mode(fn, p.leaves, mode, device, warmup, rep)
            except Exception as exc:
                row.status = f"error: {exc}"[:200]
                rows.append(row)
                continue
            row.median_ms, row.p20_ms, row.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
            scale = 1e9 if p.metric == "GB/s" else 1e12
            row.throughput = p.amount[mode] / (t.median_ms * 1e-3) / scale
            row.fraction_of_limit = row.throughput / limit
            rows.append(row)
    _fill_ratios(rows)
    return rows


def mode_runner(fn, leaves: list[Tensor], mode: str) -> Callable[[], object]:
    """A zero-argument call that runs ``mode``: the forward without autograd, the backward alone on a
    kept graph (``bwd``), or forward and backward (``full``). Shared by the CLI and the pytest suite."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*leaves)
        return run
    xs = [x.detach().requires_grad_(True) for x in leaves]
    outs = _tup(fn(*xs))
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, xs, grads, retain_graph=True)
    return lambda: torch.autograd.grad(_tup(fn(*xs)), xs, grads)


def _time_mode(fn, leaves: list[Tensor], mode: str, device: torch.device, warmup: int, rep: int):
    return measure(mode_runner(fn, leaves, mode), device, warmup, rep)


def _fill_ratios(rows: list[Row]) -> None:
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.median_ms is not None:
            groups.setdefault((r.op, r.case, r.mode), []).append(r)
    for group in groups.values():
        for r in group:
            r.speedup_over = {o.provider: o.median_ms / r.median_ms for o in group if o is not r}


def run_ops(ops: list[str], providers: list[str] | None, modes: list[str], small: bool, dtype: torch.dtype,
            hw: Hardware, device: torch.device, warmup: int, rep: int, log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    for op in ops:
        provs = [p for p in PROVIDERS[op] if providers is None or p in providers]
        for build in problems(op, small, dtype, device):
            p = build()
            log(f"  {op} {p.case} ({p.tokens} tokens)")
            rows += run_problem(p, provs, modes, hw, device, warmup, rep)
            del p
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
