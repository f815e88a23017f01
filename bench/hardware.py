"""What the benchmark ran on, and the hardware limits measured in the same run.

The host facts (:func:`describe_host`) are what an infra engineer needs to set two result files side by
side: the omniace git commit (and whether the tree had local changes), CPU and GPU model, driver, the
thread count torch used, and the versions of torch, Triton, CUDA, Python, NumPy and diffusers.

The limits are measured, not taken from a datasheet: a large device-to-device copy for memory bandwidth
(bytes read + written per second) and a large bf16 matmul for compute. Every op's throughput is then
reported as a fraction of these.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .timing import measure


@dataclass
class Hardware:
    device: str
    name: str
    driver: str | None
    torch: str
    triton: str | None
    cuda: str | None
    python: str
    date: str
    copy_gb_s: float  # measured: 2 x bytes / time of a large copy
    matmul_tflop_s: float  # measured: dense matmul in matmul_dtype
    matmul_dtype: str
    cpu: str = ""
    threads: int = 0  # torch.get_num_threads() during the run
    git_sha: str | None = None  # omniace's commit; None outside a git checkout
    git_dirty: bool | None = None  # local changes on top of git_sha
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(where: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit SHA, has local changes)`` of the checkout holding omniace (or ``where``); ``(None, None)``
    outside a git checkout, e.g. an installed wheel."""
    where = where or Path(__file__).resolve().parent
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None, None
    return sha, bool(git("status", "--porcelain", "--untracked-files=no"))


def describe_host(device: torch.device) -> dict:
    """Host facts without measuring anything: commit, CPU/GPU model, driver, threads, versions, date."""
    gpu = device.type == "cuda"
    sha, dirty = git_state()
    return dict(
        device=device.type,
        name=torch.cuda.get_device_name(device) if gpu else "cpu",
        cpu=cpu_model(),
        driver=_driver() if gpu else None,
        threads=torch.get_num_threads(),
        git_sha=sha,
        git_dirty=dirty,
        versions={"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
                  "python": platform.python_version(), "numpy": _version("numpy"),
                  "diffusers": _version("diffusers"), "omniace": _version("omniace")},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=5, rep=30, flush_l2=False)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def matmul_throughput(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=5, rep=20, flush_l2=False)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def describe(device: torch.device, small: bool) -> Hardware:
    """Host facts plus the measured copy bandwidth and matmul throughput."""
    gpu = device.type == "cuda"
    mm_dtype = torch.bfloat16 if gpu else torch.float32
    host = describe_host(device)
    v = host["versions"]
    return Hardware(
        device=host["device"],
        name=torch.cuda.get_device_name(device) if gpu else host["cpu"],
        driver=host["driver"],
        torch=v["torch"],
        triton=v["triton"],
        cuda=v["cuda"],
        python=v["python"],
        date=host["date"],
        copy_gb_s=copy_bandwidth(device, (1 << 30) if gpu and not small else (64 << 20)),
        matmul_tflop_s=matmul_throughput(device, 8192 if gpu and not small else 1024, mm_dtype),
        matmul_dtype=str(mm_dtype).removeprefix("torch."),
        cpu=host["cpu"],
        threads=host["threads"],
        git_sha=host["git_sha"],
        git_dirty=host["git_dirty"],
        versions=v,
    )
