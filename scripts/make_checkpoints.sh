#!/usr/bin/env bash
# Trains the shipped bundles (checkpoints/README.md lists the commands and results).
# Usage: scripts/make_checkpoints.sh OUT_ROOT STEPS [KIND ...]
# Resumable: a finished kind is skipped, an interrupted one continues from its checkpoint.
set -euo pipefail
out=${1:-runs/ship}; steps=${2:-2500}; shift 2 || true
kinds=("$@"); [ ${#kinds[@]} -eq 0 ] && kinds=(gaussian_1 vq vq_ema vmf nc gaussian_4 vq_reset fixed_var vae)
common=(--preset paper --steps "$steps" --val-every 500 --snapshot-every 100 --checkpoint-every 500 --seed 0 --quiet)
for kind in "${kinds[@]}"; do
  ds=fashion-mnist; case $kind in vmf|nc) ds=fashion-mnist-cat8;; esac
  if [ -f "$out/$kind/status.json" ] && grep -q '"finished"' "$out/$kind/status.json"; then continue; fi
  resume=(); [ -f "$out/$kind/checkpoint.pt" ] && resume=(--resume)
  python -m sqvae_core train --model "$kind" --dataset "$ds" --out "$out/$kind" "${common[@]}" "${resume[@]}"
done
