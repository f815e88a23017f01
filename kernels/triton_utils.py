"""Small helpers shared by the Triton kernels: interpreter detection and launch-size arithmetic."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from omniace import has_module


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under the interpreter (tests)."""
    if not has_module("triton"):
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def unit_last_stride(x: Tensor) -> Tensor:
    """The kernels take any row/head strides but need a unit stride along the last dim: copy only if not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def split_head_dim(d: int) -> tuple[int, int]:
    """Split head dim ``d`` into two power-of-two tiles ``(d0, d1)`` (``d1 = 0``: one tile) for ``tl.dot``.

    A single tile pads ``d`` to the next power of two, which for 72 wastes 44% of every dot; 64 + 16
    wastes 10%. The split is used only where it is smaller than the single padded tile. Tiles are at
    least 16 wide, the smallest ``tl.dot`` operand.
    """
    single = max(16, next_pow2(d))
    if d <= 16 or single == d:
        return single, 0
    d0 = single // 2
    d1 = max(16, next_pow2(d - d0))
    return (d0, d1) if d0 + d1 < single else (single, 0)
