"""pytest-benchmark suite: ``python -m pytest bench/test_suite.py --benchmark-only [--benchmark-json F]``.

The same shapes and providers as the CLI (CPU-sized without a GPU), with IDs named as the CLI's table
names its rows: ``op-case-mode-provider`` (``rope3d-ace-small-c1-fwd-reference``) and
``denoiser-preset-mode-provider`` (``denoiser-ace-tiny-inference-omniace``). Each op benchmark checks the
provider's forward against the reference before timing it, so a fast wrong kernel fails instead of
winning. Not part of the test suite (``testpaths = tests``).
"""
import pytest
import torch

from omniace.bench import denoiser
from omniace.bench.op_bench import (MISMATCH, MODES, OPS, PROVIDERS, _callable, _max_rel_err, _skip_reason, _tup,
                                    case_names, mode_runner, problems)

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32


def _op_cases():
    for op in OPS:
        for i, case in enumerate(case_names(op, not GPU)):
            for mode in MODES:
                for provider in PROVIDERS[op]:
                    yield pytest.param(op, i, mode, provider, id=f"{op}-{case}-{mode}-{provider}")


def _sync():
    if GPU:  # wall-clock timing: wait for the kernels
        torch.cuda.synchronize()


@pytest.mark.parametrize("op,index,mode,provider", list(_op_cases()))
def test_op(benchmark, op, index, mode, provider):
    p = problems(op, not GPU, DTYPE, DEVICE)[index]()
    reason = _skip_reason(p, provider, DEVICE, mode)
    if reason:
        pytest.skip(reason)
    fn = _callable(p, provider)
    with torch.no_grad():
        got, want = _tup(fn(*p.leaves)), _tup(p.forward("reference", p.leaves))
    assert _max_rel_err(got, want) <= MISMATCH[DTYPE]
    benchmark.extra_info.update(case=p.case, tokens=p.tokens, metric=p.metric, amount=p.amount[mode])
    step = mode_runner(fn, p.leaves, mode)
    benchmark(lambda: (step(), _sync()))


def _denoiser_cases():
    for preset in denoiser.cases(not GPU):
        for mode in ("inference", "training"):
            for provider in denoiser.providers(compile_=GPU):
                yield pytest.param(preset, mode, provider, id=f"denoiser-{preset}-{mode}-{provider}")


@pytest.mark.parametrize("preset,mode,provider", list(_denoiser_cases()))
def test_denoiser(benchmark, preset, mode, provider):
    case = denoiser.setup_case(preset, not GPU, DTYPE, DEVICE)
    benchmark.extra_info.update(preset=preset, image_tokens=case.tokens, forward_flops=case.flops)
    step = denoiser.step_fn(case, mode, provider)
    benchmark(lambda: (step(), _sync()))
