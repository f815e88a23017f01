"""Compile every Triton kernel variant the launchers use, for a GPU architecture, with no GPU present.

``python -m omniace.kernels.triton_aot [--arch 90] [--quick]`` lowers each kernel through Triton's whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) using exactly the compile-time
parameters and launch options of ``triton_{rope,attention,inject}.py`` at preset shapes, and checks the
shared memory each needs against the architecture's limit. The interpreter tests check numerics; this
checks what only real compilation can: types, layouts, tile shapes and resource use. Needs
``TRITON_INTERPRET`` unset or 0 (it runs in its own process under the tests).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# shared memory per block (bytes) that kernels may opt into, by compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# per kernel: pointer args and their element type ("T" = the data dtype), and the float scalars
ARGS = {
    "_rope3d_kernel": ({"q": "T", "k": "T", "qo": "T", "ko": "T", "pos": "i32", "inv_freq": "fp32"}, ()),
    "_attn_fwd_kernel": ({"Q": "T", "K": "T", "V": "T", "O": "T", "LSE": "fp32", "cu_q": "i32", "cu_k": "i32"},
                         ("qk_scale",)),
    "_attn_bwd_dkdv_kernel": ({"Q": "T", "K": "T", "V": "T", "DO": "T", "LSE": "fp32", "DELTA": "fp32", "DK": "T",
                               "DV": "T", "cu_q": "i32", "cu_k": "i32"}, ("qk_scale", "scale")),
    "_attn_bwd_dq_kernel": ({"Q": "T", "K": "T", "V": "T", "DO": "T", "LSE": "fp32", "DELTA": "fp32", "DQ": "T",
                             "cu_q": "i32", "cu_k": "i32"}, ("qk_scale", "scale")),
    "_inject_fwd_kernel": ({"h": "T", "ctrl": "T", "shift": "T", "scale": "T", "gate": "T", "cu": "i32",
                            "h_out": "T", "y": "T", "mean_out": "fp32", "rstd_out": "fp32"}, ("eps",)),
    "_inject_bwd_kernel": ({"dh_out": "T", "dy": "T", "h_out": "T", "ctrl": "T", "scale": "T", "gate": "T",
                            "cu": "i32", "mean": "fp32", "rstd": "fp32", "dh": "T", "dctrl": "T", "d_shift": "fp32",
                            "d_scale": "fp32", "d_gate": "fp32"}, ()),
}


@dataclass
class Variant:
    label: str
    kernel: object  # a triton JITFunction
    dtype: torch.dtype
    meta: dict  # constexprs plus num_warps / num_stages


def variants(quick: bool) -> Iterator[Variant]:
    from . import triton_attention as ta
    from . import triton_inject as ti
    from . import triton_rope as tr
    from . import triton_tuning as tuning
    from omniace.engine.config import ace_rope_axes

    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dt in dtypes:
        head_dims = (64, 72, 128, 13) if not quick else (72, 128) if dt == torch.bfloat16 else (72,)
        for D in head_dims:
            for one_kv, max_k in ((False, 4096), (True, 120)):
                default = ta.forward_config(D, 4096, max_k, 2, 16, dt, interpret=False)
                configs = [default] if quick else tuning.forward_candidates(default, one_kv, dt)
                for i, cfg in enumerate(configs):
                    yield Variant(f"attention fwd D={D} {'short-keys' if one_kv else 'general'} #{i}",
                                  ta._attn_fwd_kernel, dt, ta.forward_meta(dt, D, cfg, ta._one_kv(cfg, max_k)))
            default = ta.backward_config(D, dt, interpret=False)
            for i, cfg in enumerate([default] if quick else tuning.backward_candidates(default, dt)):
                meta = ta.backward_meta(dt, D, cfg)
                yield Variant(f"attention bwd dk/dv D={D} #{i}", ta._attn_bwd_dkdv_kernel, dt, meta)
                yield Variant(f"attention bwd dq D={D} #{i}", ta._attn_bwd_dq_kernel, dt, meta)
        for D in ((72,) if quick else (64, 72, 128)):
            for inverse in (False, True):
                yield Variant(f"rope3d D={D}{' inverse' if inverse else ''}", tr._rope3d_kernel, dt,
                              tr.rope_meta(ace_rope_axes(D), D, 16, 16, inverse))
        for C in ((1152,) if quick else (1152, 1536, 37)):
            yield Variant(f"editnet_inject fwd C={C}", ti._inject_fwd_kernel, dt, ti.forward_meta(C, 2))
            yield Variant(f"editnet_inject bwd C={C}", ti._inject_bwd_kernel, dt,
                          ti.backward_meta(C, 2, 8192, interpret=False))


def compile_variant(v: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = v.kernel
    name = fn.__name__
    pointers, floats = ARGS[name]
    meta = dict(v.meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    sig = {}
    for arg in fn.arg_names:
        if arg in meta:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = "*" + (TYPE[v.dtype] if pointers[arg] == "T" else pointers[arg])
        elif arg in floats:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i64" if arg.startswith("s_") else "i32"
    constexprs = {(fn.arg_names.index(k),): val for k, val in meta.items()}
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32), options=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    ap.add_argument("--quick", action="store_true",
                    help="default tiles only, bf16/fp32 and the preset head dims (the full run adds every tuning candidate)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton

    limit = SMEM_LIMIT.get(args.arch, 101376)
    failures = 0
    print(f"triton {triton.__version__}, sm_{args.arch}, shared memory limit {limit} B")
    for v in variants(args.quick):
        t0 = time.perf_counter()
        try:
            k = compile_variant(v, args.arch)
        except Exception as exc:
            failures += 1
            print(f"FAIL {v.label:44} {TYPE[v.dtype]:5} {type(exc).__name__}: {str(exc)[:400]}")
            continue
        smem = k.metadata.shared
        ok = smem <= limit
        failures += not ok
        print(f"{'ok  ' if ok else 'SMEM'} {v.label:44} {TYPE[v.dtype]:5} shared {smem:6d} B  "
              f"warps {v.meta.get('num_warps')} stages {v.meta.get('num_stages', '-')}  {time.perf_counter() - t0:.1f}s")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
