import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("OMNIACE_BACKEND", "auto")
# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. This must be set before
# Triton decorates any kernel; torch.cuda.is_available() only asks the driver, it creates no context.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from fixed seeds; tests draw fresh random inputs from them."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # GPU tests skip cleanly on machines without CUDA; nothing queries the GPU at import time.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "tensorrt: needs TensorRT (extra 'trt'); skipped where it is not installed")


def pytest_runtest_setup(item):
    # TensorRT is optional and not installable on CI machines: its tests skip where it is missing
    if "tensorrt" in item.keywords:
        import omniace

        if not omniace.has_module("tensorrt"):
            pytest.skip("needs TensorRT: pip install 'omniace[trt]'")
