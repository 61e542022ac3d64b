#!/usr/bin/env bash
# Trains the shipped bundles with the paper preset (checkpoints/README.md lists the results).
# Usage: scripts/make_checkpoints.sh OUT_ROOT EPOCHS [KIND ...]
# 11 epochs of Fashion-MNIST's 50,000 training images = 17,193 steps of batch 32 (>= 10 epochs).
# Resumable: a finished kind is skipped, an interrupted one continues from its checkpoint.
# Then: python scripts/finish_bundles.py runs/ship --refit-priors (priors, scores, compact bundles in checkpoints/).
set -euo pipefail
out=${1:-runs/ship}; epochs=${2:-11}; shift 2 || true
kinds=("$@"); [ ${#kinds[@]} -eq 0 ] && kinds=(gaussian_1 vq vq_ema vmf nc gaussian_4 vq_reset fixed_var vae fsq simvq)
common=(--preset paper --epochs "$epochs" --snapshot-every 500 --checkpoint-every 1000 --seed 0 --quiet)
for kind in "${kinds[@]}"; do
  ds=fashion-mnist; case $kind in vmf|nc) ds=fashion-mnist-cat8;; esac
  if [ -f "$out/$kind/status.json" ] && grep -q '"finished"' "$out/$kind/status.json"; then continue; fi
  resume=(); [ -f "$out/$kind/checkpoint.pt" ] && resume=(--resume)
  python -m sqvae_core train --model "$kind" --dataset "$ds" --out "$out/$kind" "${common[@]}" "${resume[@]}"
done
