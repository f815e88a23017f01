"""pytest-benchmark suite: ``python -m pytest bench/test_suite.py --benchmark-only [--benchmark-json F]``.

One benchmark per (op, case, provider, mode) on the same shapes and providers as the CLI (CPU-sized
without a GPU). Each checks the provider's forward against the reference before timing it, so a fast
wrong kernel fails instead of winning. Not part of the test suite (``testpaths = tests``).
"""
import pytest
import torch

from omniace.bench.op_bench import MISMATCH, MODES, OPS, PROVIDERS, _callable, _max_rel_err, _tup, mode_runner, problems

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32


def _cases():
    for op in OPS:
        for i, build in enumerate(problems(op, not GPU, DTYPE, DEVICE)):
            for provider in PROVIDERS[op]:
                for mode in MODES:
                    yield pytest.param(op, i, provider, mode, id=f"{op}-{i}-{provider}-{mode}")


@pytest.mark.parametrize("op,index,provider,mode", list(_cases()))
def test_op(benchmark, op, index, provider, mode):
    from omniace.bench.op_bench import _skip_reason

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

    def run():
        step()
        if GPU:  # wall-clock timing: wait for the kernels
            torch.cuda.synchronize()

    benchmark(run)
