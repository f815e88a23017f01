"""How a training worker ends: with its launcher when the launcher dies, and at a step boundary on SIGTERM."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by the elastic agent for each worker it starts


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    torchrun starts every worker in a session of its own, so killing the launcher's process group leaves
    the workers training. The kernel signal reaches a worker however its parent (torchrun's elastic agent,
    which starts the workers from its main thread) ends, and even while the worker is blocked in a
    collective, where a watchdog thread polling ``os.getppid()`` could not act. SIGKILL, not SIGTERM: with
    the launcher gone nobody collects the run, and a checkpoint written on the way out would race the next
    run; torchrun itself forwards a graceful SIGTERM while it lives.

    A parent that died before this call leaves the process re-parented to init (pid 1: it kills itself
    now) or to a sub-reaper; a worker orphaned that early also loses the agent's rendezvous store, so its
    process group never forms. Returns False where there is no ``prctl`` (not Linux); raises OSError if
    the call fails.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True


class StopSignal:
    """Records SIGTERM (a scheduler's pre-emption notice; torchrun forwards it to every worker) instead of dying.

    The trainer reads ``received`` at each step, agrees across ranks (one rank signalled is enough), and
    saves a checkpoint at that step boundary before exiting. Install from the main thread only.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum

    def install(self) -> None:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None
