#!/usr/bin/env bash
# The embedded default, engine/assets/ace-edit.safetensors, from nothing: the corpus (every task family), the
# training run (torchrun, FSDP2 on gloo), the held-out evaluation, then the copy. About 75 minutes on a
# 2-core CPU (docs/default_model.md has the measured times). Seeded throughout: the corpus, the data order,
# the noise and the initial weights follow --seed. NPROC changes the global batch (the token budget is per
# rank), so only NPROC=2 reproduces the shipped run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synth-default}
OUT=${OUT:-runs/default}
NPROC=${NPROC:-2}
STEPS=${STEPS:-8000}
python -m omniace.train.synthetic --out "$DATA" --pairs 16000 --short-sides 64 --seed 0
OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m omniace.train.trainer \
  --data "$DATA" --out "$OUT" --preset ace-edit --steps "$STEPS" --lr 1e-3 --warmup 200 --token-budget 1024 \
  --ckpt-every 1000 --log-every 100 --decoder pil --seed 0 --export-dtype fp16
python -m omniace.train.eval --weights "$OUT/model.safetensors" --out "$OUT/eval" --per-task 4 --steps 10
cp "$OUT/model.safetensors" engine/assets/ace-edit.safetensors
echo "installed $OUT/model.safetensors as engine/assets/ace-edit.safetensors"
