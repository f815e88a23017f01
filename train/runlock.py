"""An exclusive lock on a run's output folder, so that two training runs never write into the same ``--out``.

``fcntl.flock`` on ``<out>/run.lock``: the kernel (on a shared file system, its lock manager: NFSv4,
Lustre mounted with ``-o flock``, GPFS) releases it when the holder dies, however it dies, so a dead run
never blocks the next one. The file names the holder (host, pid, since) for the message a second run gets,
and a heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) covers file systems whose flock is local
to each host or missing: a record left by another host is watched until its heartbeat is ``STALE_AFTER_S``
old (a live holder beats again before that, and the new run stops) - a run requeued on another node after
a hard kill waits at most that long. The file is never deleted (deleting a flock file lets two runs lock
two inodes).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

LOCK_FILE = "run.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 4 * HEARTBEAT_S  # a foreign holder silent this long is gone (its host died)
# errors of a file system that cannot flock: the lock then rests on the holder record and its heartbeat
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str  # ISO 8601 local time with its UTC offset

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


def read_holder(path: str | Path) -> Holder | None:
    """The holder a lock file names, or None for an empty or unreadable file (nobody, or a crash mid-write)."""
    try:
        d = json.loads(Path(path).read_text())
        return Holder(str(d["host"]), int(d["pid"]), str(d["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """``RunLock(out).acquire()`` before anything is written into ``out``; ``release()`` (or process death) frees it.

    Raises :class:`RunLockedError` naming the holder when another live run has the folder.
    """

    def __init__(self, folder: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 log=lambda msg: None):
        self.path = Path(folder) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.log = log
        self.host = socket.gethostname()
        self.previous: Holder | None = None  # the dead run whose lock this one took over (for the log)
        self.flock = True  # False where the file system has no flock (then the record and heartbeat decide)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(self._message(read_holder(self.path), "it holds the lock")) from None
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
                self.flock = False
            holder = read_holder(self.path)
            if holder is not None:
                why = self._still_running(holder)
                if why:
                    raise RunLockedError(self._message(holder, why))
            self.previous = holder
            me = Holder(self.host, os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _still_running(self, holder: Holder) -> str | None:
        """Why a recorded holder still counts as live although flock let this run in, or None (it is gone)."""
        if holder.host == self.host:
            if self.flock:  # flock is exact on one host: the holder died and the kernel released its lock
                return None
            return "its process is alive" if holder.pid != os.getpid() and _pid_alive(holder.pid) else None
        # flock may not reach across hosts here: a live holder beats again before its record goes stale
        beat = self.path.stat().st_mtime
        wait = self.stale_after_s - (time.time() - beat)
        if wait > 0:
            self.log(f"lock: {self.path} names {holder.describe()}; waiting up to {wait:.0f} s for its heartbeat")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 4, max(0.0, deadline - time.monotonic())))
            if self.path.stat().st_mtime != beat:
                return "its heartbeat goes on"
        return None

    def _message(self, holder: Holder | None, why: str) -> str:
        who = holder.describe() if holder else "holder unknown (it has not written its name yet)"
        return (f"{self.path.parent} is in use by another training run ({who}; {why}): stop that run, or "
                f"train into another --out (the lock is {self.path})")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # a transient file-system error: the next beat retries
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now; the file itself stays (see the module docstring)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
