"""Opt-in measured tile choice for the Triton attention kernels: ``OMNIACE_AUTOTUNE=1`` (CUDA only).

The default tiles are heuristics picked without a GPU. With tuning on, the first call for a shape bucket
(direction, dtype, head dim, short-key path, power-of-two bucket of max_q / max_k) times a few candidate
tilings on the real inputs and keeps the fastest for the process; ``tuned()`` lists the choices (the
bench writes them to its JSON, so good defaults can be promoted). Tuning never runs while a CUDA graph
is captured or torch.compile traces, and a candidate that does not fit (shared memory, registers) is
skipped. Every candidate is in ``triton_aot``'s compile check.
"""
from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

_BEST: dict[tuple, object] = {}


def enabled(device: torch.device) -> bool:
    return (os.environ.get("OMNIACE_AUTOTUNE", "0") == "1" and device.type == "cuda"
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def forward_candidates(default, one_kv: bool, dtype: torch.dtype) -> list:
    """The heuristic default first, then variations of tile height, key tile, warps and stages."""
    if dtype == torch.float32:
        return [default]
    if one_kv:
        shapes = [(128, 1, 8), (128, 2, 8), (128, 4, 8), (64, 1, 4), (64, 2, 4), (128, 1, 4)]
        out = [replace(default, block_m=m, q_blocks=qb, num_warps=w) for m, qb, w in shapes]
    else:
        shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2)]
        out = [replace(default, block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return [default] + [c for c in out if c != default]


def backward_candidates(default, dtype: torch.dtype) -> list:
    if dtype == torch.float32:
        return [default]
    shapes = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (128, 128, 8, 1)]
    out = [replace(default, block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return [default] + [c for c in out if c != default]


def bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def pick(key: tuple, candidates: list, run: Callable[[object], None], reps: int = 5) -> object:
    """The fastest candidate for ``key`` (measured once per process), ``run(config)`` launching it."""
    if key in _BEST:
        return _BEST[key]
    best, best_ms = candidates[0], math.inf
    for cfg in candidates:
        try:
            run(cfg)  # compiles; also surfaces out-of-resources
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                start.record()
                run(cfg)
                end.record()
            torch.cuda.synchronize()
            ms = statistics.median(s.elapsed_time(e) for s, e in events)
        except Exception:  # noqa: BLE001 - a tiling that cannot launch here is simply not a candidate
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _BEST[key] = best
    return best


def tuned() -> list[dict]:
    return [{"key": [str(k) for k in key], "config": asdict(cfg)} for key, cfg in _BEST.items()]
