"""Compile every Triton kernel variant the launchers use, for a GPU architecture, with no GPU present.

``python -m omniace.kernels.triton_aot [--arch 90] [--quick] [--candidates] [--json PATH]`` calls the
real launchers (``attention_forward/backward``, ``rope3d_rotate``, ``inject_forward/backward``) on meta
tensors at the bench's preset shapes (every dtype; ``--candidates`` adds every tuning tile), captures
each kernel launch instead of running it, and compiles it exactly as Triton's JIT would at that launch:
the JIT's own argument specialisation (16-byte pointer alignment, integers divisible by 16, i32 or i64
by value, ``1`` folded to a constant) through Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin). Per variant it reports, from ``ptxas -v`` and the PTX: registers, spill bytes, shared memory,
occupancy (blocks and warps per SM, what limits them) and the global load mix (bytes per load
instruction, ``cp.async`` by size, TMA), and fails a variant whose shared memory exceeds the
architecture's limit. ``--json`` keeps the report (``bench/results/aot_sm90_*``) so a GPU run can be
set beside it. Needs ``TRITON_INTERPRET`` unset or 0 (the tests run it in its own process) and Triton's
JIT internals of 3.3 or later (``create_function_from_signature``, ``_pack_args``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a compute capability (CUDA programming guide, occupancy calculator)."""
    smem_per_sm: int  # bytes
    smem_per_block: int  # bytes a block may opt into
    max_warps: int
    max_blocks: int = 32
    regs: int = 65536
    reserved_smem_per_block: int = 1024


LIMITS = {80: SMLimits(167936, 166912, 64), 86: SMLimits(102400, 101376, 48, 16),
          89: SMLimits(102400, 101376, 48, 24), 90: SMLimits(233472, 232448, 64),
          100: SMLimits(233472, 232448, 64), 120: SMLimits(102400, 101376, 48)}
TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HALF = ("fp16", "bf16")


@dataclass
class Launch:
    """One captured kernel launch: the JIT function and the arguments the launcher passed it."""
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Variant:
    """A distinct compiled specialisation, with every preset case whose launch produced it."""
    label: str
    dtype: str
    default: bool  # the heuristics' own choice (not only a tuning candidate)
    launch: Launch
    cases: list[str] = field(default_factory=list)


@contextlib.contextmanager
def captured(modules) -> Iterator[list[Launch]]:
    """Within the block, launching any ``@triton.jit`` kernel of ``modules`` records it instead of running."""
    from triton.runtime.jit import KernelInterface  # JITFunction, and InterpretedFunction under TRITON_INTERPRET

    record: list[Launch] = []
    kernels = [v for m in modules for v in vars(m).values() if isinstance(v, KernelInterface)]

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            record.append(Launch(kernel, args, kwargs))
        return run

    for k in kernels:
        k.run = recorder(k)  # the instance attribute shadows the class's run, which kernel[grid](...) calls
    try:
        yield record
    finally:
        for k in kernels:
            del k.run


def _meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")  # data_ptr() is 0: 16-byte aligned, as allocations are


def _attention_calls(quick: bool, candidates: bool) -> Iterator[tuple[str, torch.dtype, bool, Callable[[], None]]]:
    """``(case, dtype, is the heuristics' config, launcher call)`` at the bench's attention shapes."""
    from omniace.bench.cases import AttnCase, attention_cases

    from . import triton_attention as ta
    from . import triton_tuning as tuning

    cases = attention_cases(small=False)
    if quick:  # one ACE self- and cross-attention case (head dim 72)
        cases = [c for c in cases if c.name in ("ace512-c1-self", "ace512-c1-cross")]
    else:  # plus a head dim that is no multiple of 8 (scalar loads by necessity; must still compile)
        cases.append(AttnCase("odd-d13-self", "self", (1000, 3000), (1000, 3000), 4, 13))
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dt in dtypes:
        for c in cases:
            S, H, D, Lq, Lk, mq, mk = len(c.lq), c.heads, c.head_dim, sum(c.lq), sum(c.lk), max(c.lq), max(c.lk)
            q, k, v, cu_q, cu_k = (_meta(Lq, H, D, dtype=dt), _meta(Lk, H, D, dtype=dt), _meta(Lk, H, D, dtype=dt),
                                   _meta(S + 1, dtype=torch.int32), _meta(S + 1, dtype=torch.int32))
            lse = _meta(Lq, H, dtype=torch.float32)
            fwd = ta.forward_config(D, mq, mk, S, H, dt, interpret=False)
            one_kv = ta._one_kv(fwd, mk)
            for i, cfg in enumerate(tuning.forward_candidates(fwd, one_kv, dt) if candidates else [fwd]):
                yield c.name, dt, i == 0, functools.partial(ta.attention_forward, q, k, v, cu_q, cu_k, mq, mk,
                                                            D ** -0.5, config=cfg)
            bwd = ta.backward_config(D, dt, interpret=False)
            for i, cfg in enumerate(tuning.backward_candidates(bwd, dt) if candidates else [bwd]):
                yield c.name, dt, i == 0, functools.partial(ta.attention_backward, q, q, k, v, q, lse, cu_q, cu_k,
                                                            mq, mk, D ** -0.5, config=cfg)


def _other_calls(quick: bool) -> Iterator[tuple[str, torch.dtype, bool, Callable[[], None]]]:
    """rope3d and editnet_inject launches at the bench's shapes (their launchers pick their own tiles)."""
    from omniace.bench.cases import inject_cases, rope_cases

    from . import triton_inject as ti
    from . import triton_rope as tr

    ropes, injects = rope_cases(small=False), inject_cases(small=False)
    if quick:
        ropes, injects = ropes[:1], injects[:1]
    for dt in ((torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)):
        for c in ropes:
            q, pos = _meta(c.tokens, c.heads, c.head_dim, dtype=dt), _meta(c.tokens, 3, dtype=torch.int32)
            for inverse in (False, True):
                yield c.name, dt, True, functools.partial(tr.rope3d_rotate, q, q, pos, c.axes, 10000.0, inverse)
        for c in injects:
            L, S, C = c.tokens, len(c.lengths), c.channels
            h, cu, mod = _meta(L, C, dtype=dt), _meta(S + 1, dtype=torch.int32), _meta(S, C, dtype=dt)
            stat = _meta(L, dtype=torch.float32)
            yield c.name, dt, True, functools.partial(ti.inject_forward, h, h, mod, mod, mod, cu, 1e-6)
            yield c.name, dt, True, functools.partial(ti.inject_backward, h, h, h, h, mod, mod, cu, stat, stat)


def jit_source(launch: Launch, target):
    """``(ASTSource, options dict)`` exactly as ``JITFunction.run`` builds them for this launch."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    fn, backend = launch.kernel, make_backend(target)
    if not (hasattr(jit, "create_function_from_signature") and hasattr(fn, "_pack_args")):
        raise RuntimeError(f"triton_aot reuses the JIT's specialisation (create_function_from_signature, "
                           f"JITFunction._pack_args), which Triton {triton.__version__} lacks: expected 3.3 or later")
    kwargs = dict(launch.kwargs, debug=False)
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def collect(quick: bool, target, candidates: bool = False) -> list[Variant]:
    """The distinct specialisations the launchers produce at the preset shapes, in first-seen order."""
    from . import triton_attention, triton_inject, triton_rope

    found: dict[str, Variant] = {}
    with captured((triton_attention, triton_rope, triton_inject)) as record:
        for case, dt, default, call in (*_attention_calls(quick, candidates), *_other_calls(quick)):
            record.clear()
            call()
            for launch in record:
                src, opts = jit_source(launch, target)
                key = src.hash() + repr(sorted(opts.items()))
                if key not in found:
                    const = {k[0] if isinstance(k, tuple) else k: v for k, v in src.constants.items()}
                    names = launch.kernel.arg_names
                    cx = {names[i]: v for i, v in const.items() if isinstance(i, int) and names[i].isupper()}
                    label = f"{launch.kernel.__name__} {' '.join(f'{k}={v}' for k, v in cx.items())} " \
                            f"w{opts['num_warps']} s{opts['num_stages']}"
                    found[key] = Variant(label, TYPE[dt], default, launch)
                v = found[key]
                v.default |= default
                if case not in v.cases:
                    v.cases.append(case)
    return list(found.values())


_LD = re.compile(r"\bld\.global(\S*)")
_ST = re.compile(r"\bst\.global(\S*)")
_CP = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")
_TMA = re.compile(r"\bcp\.async\.bulk\.tensor")
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\.")  # tensor-core instructions (none: CUDA-core FMAs)


def _access_bytes(suffix: str) -> int:
    """Bytes moved by one ``ld/st.global`` from its suffix, e.g. ``.v4.b32`` -> 16, ``.b16`` -> 2."""
    parts = suffix.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
    return vec * bits // 8


def memory_mix(ptx: str) -> dict:
    """Static counts of global memory instructions in the PTX, keyed by bytes per instruction, and of
    tensor-core (``mma``/``wgmma``) instructions."""
    def by_size(sizes) -> dict[str, int]:
        return {str(k): n for k, n in sorted(Counter(sizes).items())}
    return {"ld_global": by_size(_access_bytes(s) for s in _LD.findall(ptx)),
            "cp_async": by_size(int(n, 0) for n in _CP.findall(ptx)),
            "tma_loads": len(_TMA.findall(ptx)), "mma": len(_MMA.findall(ptx)),
            "st_global": by_size(_access_bytes(s) for s in _ST.findall(ptx))}


def _ptxas(arch: int) -> tuple[str, str]:
    """The ptxas Triton assembles ``sm_<arch>`` with, and the ``--gpu-name`` it passes."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        return get_ptxas(arch).path, sm_arch_from_capability(arch)
    except (ImportError, AttributeError):  # other Triton versions: the ptxas on PATH
        return "ptxas", f"sm_{arch}{'a' if arch >= 90 else ''}"


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` with the flags Triton compiles with."""
    ptxas, gpu = _ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return {"registers": num(r"Used (\d+) registers"), "spill_store_bytes": num(r"(\d+) bytes spill stores"),
            "spill_load_bytes": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame"),
            "static_smem_bytes": num(r"(\d+) bytes smem")}


def occupancy(registers: int, smem: int, warps: int, lim: SMLimits) -> dict:
    """Resident blocks and warps per SM, and which resource limits them (registers per warp in units of 256)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    limits = {"warps": lim.max_warps // warps, "blocks": lim.max_blocks,
              "registers": (lim.regs // regs_per_warp) // warps,
              "shared": lim.smem_per_sm // (smem + lim.reserved_smem_per_block)}
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "fraction": blocks * warps / lim.max_warps,
            "limited_by": min(limits, key=limits.get)}


def report(v: Variant, arch: int) -> dict:
    """Compile ``v`` for ``sm_<arch>`` and measure it (raises what compilation raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    src, opts = jit_source(v.launch, target)
    k = triton.compile(src, target=target, options=opts)
    usage = ptxas_usage(k.asm["ptx"], arch)
    smem = k.metadata.shared + usage["static_smem_bytes"]
    warps = opts["num_warps"]
    return {"label": v.label, "kernel": v.launch.kernel.__name__, "dtype": v.dtype, "default": v.default,
            "cases": v.cases, "num_warps": warps, "num_stages": opts["num_stages"],
            "signature": {k: str(t) for k, t in src.signature.items() if t != "constexpr"},
            **usage, "shared_bytes": smem, "occupancy": occupancy(usage["registers"], smem, warps, LIMITS[arch]),
            "memory": memory_mix(k.asm["ptx"])}


def meets_targets(row: dict) -> list[str]:
    """Issue 13's targets for a heuristics-chosen variant: what it misses (empty when it meets them).

    Half precision: no spills and no 2-byte scalar global loads. fp32: spills of at most 512 bytes.
    Head dims that are no multiple of 8 are exempt from the load target (their rows are not 16-byte aligned).
    """
    if not row["default"]:
        return []
    spill = row["spill_store_bytes"] + row["spill_load_bytes"]
    misses = []
    if row["dtype"] in HALF:
        if spill:
            misses.append(f"spills {spill} B")
        odd = any(c.startswith("odd-") for c in row["cases"]) and len(row["cases"]) == 1
        if row["memory"]["ld_global"].get("2", 0) and not odd:
            misses.append(f"{row['memory']['ld_global']['2']} scalar 2-byte loads")
    elif spill > 512:
        misses.append(f"spills {spill} B")
    return misses


def _provenance(arch: int) -> dict:
    """The source's git commit (``+dirty`` with local changes) and the ptxas that assembled, for the report."""
    here = os.path.dirname(os.path.abspath(__file__))

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    sha = run("git", "rev-parse", "HEAD")
    dirty = bool(run("git", "status", "--porcelain", "--untracked-files=no"))
    return {"git_sha": (sha + "+dirty" if dirty else sha) or None,
            "ptxas": next((line for line in run(_ptxas(arch)[0], "--version").splitlines() if "release" in line), None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS), help="compute capability x 10")
    ap.add_argument("--quick", action="store_true", help="bf16/fp32 and one ACE case per kernel only")
    ap.add_argument("--candidates", action="store_true",
                    help="every tuning candidate too, not only the heuristics' tiles (about 4x the variants)")
    ap.add_argument("--json", metavar="PATH", help="write the report here (e.g. bench/results/aot_sm90_<date>.json)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget

    lim = LIMITS[args.arch]
    print(f"triton {triton.__version__}, sm_{args.arch}, shared memory limit {lim.smem_per_block} B per block")
    variants = collect(args.quick, GPUTarget("cuda", args.arch, 32), args.candidates)
    rows, failures = [], 0
    for v in variants:
        try:
            row = report(v, args.arch)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, not only the first
            failures += 1
            print(f"FAIL {v.label} {v.dtype}: {type(exc).__name__}: {str(exc)[:400]}")
            rows.append({"label": v.label, "dtype": v.dtype, "cases": v.cases, "error": str(exc)[:2000]})
            continue
        row["misses"] = meets_targets(row)
        fits = row["shared_bytes"] <= lim.smem_per_block
        failures += not fits
        rows.append(row)
        occ, mem = row["occupancy"], row["memory"]
        print(f"{'ok  ' if fits else 'SMEM'} {row['dtype']:4} {'*' if row['default'] else ' '} {v.label}\n"
              f"     regs {row['registers']:3d} spill {row['spill_store_bytes']}/{row['spill_load_bytes']} B "
              f"smem {row['shared_bytes']} B  {occ['warps_per_sm']} warps/SM ({occ['limited_by']})  "
              f"ld {mem['ld_global']} cp.async {mem['cp_async']} tma {mem['tma_loads']}  "
              f"{'  MISSES: ' + '; '.join(row['misses']) if row['misses'] else ''}")
    missed = sum(bool(r.get("misses")) for r in rows)
    print(f"{len(rows)} variants, {failures} failure(s), {missed} default variant(s) missing the targets "
          "(* = the heuristics' choice)")
    if args.json:
        meta = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "quick": args.quick,
                "candidates": args.candidates,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **_provenance(args.arch), "limits": asdict(lim), "variants": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
