#!/usr/bin/env bash
# GPU checks of the kernels issue, sized for the device tool's 10-minute calls:
#   run(command="bash bench/run_gpu.sh tests")                       install, build csrc, gpu-marked tests
#   run(command="bash bench/run_gpu.sh bench --skip-denoiser")        op benchmarks (all providers)
#   run(command="bash bench/run_gpu.sh bench --skip-ops")             whole-denoiser step benchmark
# The machine has no network: omniace installs with --no-deps. Results (JSON, SVGs, logs) land in $OUT;
# copy the JSON and SVGs into bench/results/ and commit them.
set -uo pipefail
OUT=${OUT:-/tmp/omniace_out}
mkdir -p "$OUT"
what=${1:-tests}
shift || true
pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
case "$what" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python - <<'PY' 2>&1 | tee "$OUT/build.log" | tail -5
import time, torch
from omniace.kernels import cuda_ext
t = time.time(); cuda_ext.load(); print(f"csrc built in {time.time() - t:.0f}s")
print("self-check failures:", cuda_ext.self_check(torch.device("cuda")))
PY
    timeout 420 python -m pytest -q -m gpu tests/ >"$OUT/gpu_tests.log" 2>&1
    echo "gpu tests exit $?"; tail -25 "$OUT/gpu_tests.log"
    ;;
  bench)
    timeout 540 python -m omniace.bench --out "$OUT" "$@" >"$OUT/bench.txt" 2>"$OUT/bench.err"
    echo "bench exit $?"; tail -60 "$OUT/bench.txt"; tail -5 "$OUT/bench.err"
    ;;
  *) echo "usage: bench/run_gpu.sh tests|bench [bench args]"; exit 2 ;;
esac
