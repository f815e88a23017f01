"""What the benchmark ran on, and the hardware limits measured in the same run.

The limits are measured, not taken from a datasheet: a large device-to-device copy for memory bandwidth
(bytes read + written per second) and a large bf16 matmul for compute. Every op's throughput is then
reported as a fraction of these.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
from dataclasses import asdict, dataclass

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
    """Device facts plus the measured copy bandwidth and matmul throughput."""
    gpu = device.type == "cuda"
    mm_dtype = torch.bfloat16 if gpu else torch.float32
    return Hardware(
        device=device.type,
        name=torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine()),
        driver=_driver() if gpu else None,
        torch=torch.__version__,
        triton=_triton_version(),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        copy_gb_s=copy_bandwidth(device, (1 << 30) if gpu and not small else (64 << 20)),
        matmul_tflop_s=matmul_throughput(device, 8192 if gpu and not small else 1024, mm_dtype),
        matmul_dtype=str(mm_dtype).removeprefix("torch."),
    )
