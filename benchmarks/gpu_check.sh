#!/usr/bin/env bash
# The training-throughput ratios against the official trainer's step, on a CUDA GPU: the same
# benchmark as the CPU figures (benchmarks/train_throughput.py: official-style step vs ours, eager,
# compiled, compiled + bf16 autocast), with the GPU synchronised at the end of every round.
#
#     bash benchmarks/gpu_check.sh [extra train_throughput.py flags, e.g. --size 64 --rounds 9]
#
# Without a GPU it says so and exits 0, so it is safe to run anywhere (CI runs it on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch $(python -c 'import torch; print(torch.__version__)') here;" \
       "nothing to measure (the CPU figures: python benchmarks/train_throughput.py --compile --amp)"
  exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
exec python benchmarks/train_throughput.py --device cuda --compile --amp --steps 50 --rounds 7 "$@"
