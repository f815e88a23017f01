"""What a run writes beside its checkpoints: ``metrics.jsonl`` (one record per log step) and ``skipped.jsonl``
(every record the loader skipped, with its id, kind and reason). A resumed run first cuts both back to its
step, then writes what the interrupted run had written after it again, so both files read as one run's.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch.distributed as dist

METRICS, SKIPPED = "metrics.jsonl", "skipped.jsonl"
# fields of a metrics record that follow the wall clock; all others repeat bit for bit in a resumed run
TIMING_KEYS = ("samples_per_s", "tokens_per_s", "mfu", "s_per_step", "eta_s")


class Window:
    """Step outputs between two log lines, reduced over ranks when logged.

    The loss and per-task sums go into each checkpoint (:meth:`state_dict`), so a run resumed inside a
    window logs the record an uninterrupted run logs; the throughput counters restart with the process.
    """

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.loss: float = state.get("loss", 0.0)
        self.steps: int = state.get("steps", 0)
        self.task_sum: dict[str, float] = defaultdict(float, state.get("task_sum", {}))
        self.task_n: dict[str, int] = defaultdict(int, state.get("task_n", {}))
        self.last: dict = state.get("last", {})  # lr and grad norm of the newest step
        self.timed_steps = self.samples = self.tokens = self.flops = 0
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        return {"loss": self.loss, "steps": self.steps, "task_sum": dict(self.task_sum),
                "task_n": dict(self.task_n), "last": self.last}

    def add(self, out: dict) -> None:
        self.loss += float(out["loss"])
        self.steps += 1
        for task, value in zip(out["tasks"], out["per_sample"].tolist()):
            self.task_sum[task] += value
            self.task_n[task] += 1
        self.last = {"lr": out["lr"], "grad_norm": out["grad_norm"]}
        self.timed_steps += 1
        self.samples += len(out["tasks"])
        self.tokens += out["tokens"]
        self.flops += out["flops"]

    def reduce(self, step: int, world: int, peak: float | None, end: int, data: dict[str, int]) -> dict:
        """Collective: the record of this window over all ranks. ``data`` is this rank's loader totals
        (summed into ``record["data"]``), ``end`` the run's last step (for the ETA), ``peak`` FLOP/s per rank."""
        seconds = time.perf_counter() - self.t0
        gathered = [None] * world
        mine = (self.loss, self.samples, self.tokens, self.flops, dict(self.task_sum), dict(self.task_n), data)
        dist.all_gather_object(gathered, mine)
        task_sum: dict[str, float] = defaultdict(float)
        task_n: dict[str, int] = defaultdict(int)
        totals: dict[str, int] = defaultdict(int)
        for _, _, _, _, ts, tn, stats in gathered:
            for k, v in ts.items():
                task_sum[k] += v
                task_n[k] += tn[k]
            for k, v in stats.items():
                totals[k] += v
        samples, tokens, flops = (sum(g[i] for g in gathered) for i in (1, 2, 3))
        per_step = seconds / max(1, self.timed_steps)
        return {"step": step, "loss": sum(g[0] for g in gathered) / self.steps, "lr": self.last["lr"],
                "grad_norm": self.last["grad_norm"],
                "loss_per_task": {k: task_sum[k] / task_n[k] for k in sorted(task_sum)},
                "data": dict(sorted(totals.items())),
                "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (peak * world) if peak else None,
                "s_per_step": per_step, "eta_s": per_step * (end - step)}


class RunLog:
    """Appends to ``metrics.jsonl`` and ``skipped.jsonl`` under ``out``; a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = Path(out), enabled

    def _append(self, name: str, records: list[dict]) -> None:
        if self.enabled and records:
            with open(self.out / name, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))

    def metrics(self, record: dict) -> None:
        self._append(METRICS, [record])

    def skipped(self, records: list[dict]) -> None:
        """``records``: ``{"step", "rank", "id", "kind", "reason"}`` each, ``step`` the step they were read for."""
        self._append(SKIPPED, records)

    def truncate(self, step: int) -> None:
        """Drop records past ``step`` (written by an interrupted run after the checkpoint it resumes from)."""
        for name in (METRICS, SKIPPED):
            path = self.out / name
            if not self.enabled or not path.exists():
                continue
            keep = [ln for ln in path.read_text().splitlines() if _step_of(ln) <= step]
            path.write_text("".join(ln + "\n" for ln in keep))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except ValueError:  # a line torn by a kill mid-write: only the tail, past the checkpoint, can be torn
        return float("inf")
