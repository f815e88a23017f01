"""Timing: warm-up excluded, median of many, CUDA events on a GPU (L2 flushed between runs)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2, so every timed run starts cold


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    min_ms: float | None = None  # the least disturbed run: the fairest figure on a shared, loaded machine
    cpu_ms: float | None = None  # median process CPU time (all threads): barely moved by other processes' load


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 10, rep: int = 50,
            flush_l2: bool = True) -> Timing:
    """Time ``fn()``; inputs small enough to stay in L2 would otherwise look faster than HBM allows."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        torch.cuda.synchronize(device)
        for s, e in zip(starts, ends):
            if flush is not None:
                flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _timing(times)


def _timing(times: list[float], cpu_times: list[float] | None = None) -> Timing:
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), min(times),
                  statistics.median(cpu_times) if cpu_times else None)


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                        rep: int = 5) -> dict[str, Timing]:
    """Time several calls round-robin (wall clock, synchronised on a GPU): on a shared machine a burst of
    load then slows every provider in the same round, instead of whichever was running at the time."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {name: _timing(times[name], cpu[name] if device.type == "cpu" else None) for name in fns}
