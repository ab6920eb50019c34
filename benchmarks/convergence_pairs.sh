#!/usr/bin/env bash
# Before/after validation curves at the documented budgets (issue 18): each pair runs side by side (same load), one
# thread each, CPU-time budgets; "before" is the 0.2.0 code at fb48b58 in a separate worktree.
#   git worktree add ../wt_before fb48b58
#   bash benchmarks/convergence_pairs.sh ../wt_before /tmp/conv brain|isic|ixi
# Writes <out>/<set>_{before,after}/ (training + evaluation), <out>/<set>_uptime.txt and the figure
# bundles/<bundle>/docs/<set>_convergence.png.
# One setting, same code: give this repository as "before", the setting's old value in BEFORE_ARGS, and a figure name:
#   BEFORE_ARGS="--range_weight 0" BEFORE_LABEL="range_weight 0 (0.4.1)" FIGURE=brain_range_weight.png \
#     bash benchmarks/convergence_pairs.sh . /tmp/rw brain
set -euo pipefail
BEFORE=$(cd "$1" && pwd); OUT=$2; SET=$3
BEFORE_ARGS=${BEFORE_ARGS:-}; BEFORE_LABEL=${BEFORE_LABEL:-0.2.0}; FIGURE=${FIGURE:-${SET}_convergence.png}
TITLE=${TITLE:-"$SET: $BEFORE_LABEL vs this version, side by side, one thread each"}
AFTER=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(cd "$AFTER/../shared/data" && pwd)
case $SET in
  brain) B=vqvae; ARGS="--dataset_dir $DATA/brain_mri_2d --data_layout folder --test_fraction 0.1 --val_fraction 0.02 --seed 0"
         TRAIN="--max_epochs 100 --time_budget_minutes 20 --time_budget_clock process" ;;
  isic)  B=vqvae; ARGS="--dataset_dir $DATA/isic_256 --data_layout isic --in_channels 3 --test_fraction 0.1 --val_fraction 0.02 --seed 0"
         TRAIN="--max_epochs 1000 --time_budget_minutes 20 --time_budget_clock process" ;;
  ixi)   B=vqvae; CONFIGS="['configs/train.json','configs/3d.json']"; ARGS="--dataset_dir $DATA/ixi_t1_2mm --seed 0"
         TRAIN="--patch_size [64,64,64] --max_epochs 1000 --val_interval 5 --time_budget_minutes 30 --time_budget_clock process --cpu_bf16 True" ;;
  *) echo "set must be brain, isic or ixi"; exit 1 ;;
esac
mkdir -p "$OUT"
( while true; do echo "$(date -u +%T) $(uptime)"; sleep 60; done ) > "$OUT/${SET}_uptime.txt" & LOAD=$!
PIDS=()
for side in before after; do
  ROOT=$([ $side = before ] && echo "$BEFORE" || echo "$AFTER")
  EXTRA=$([ $side = before ] && echo "$BEFORE_ARGS" || echo "")
  ( cd "$ROOT/bundles/$B" && PYTHONPATH=$ROOT OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
      python -m monai.bundle run --config_file "${CONFIGS:-configs/train.json}" $ARGS --output_dir "$OUT/${SET}_$side" $TRAIN $EXTRA \
      > "$OUT/${SET}_$side.log" 2>&1 ) &
  PIDS+=($!)
done
wait "${PIDS[@]}"
kill $LOAD
for side in before after; do
  ROOT=$([ $side = before ] && echo "$BEFORE" || echo "$AFTER")
  EXTRA=$([ $side = before ] && echo "$BEFORE_ARGS" || echo "")
  ( cd "$ROOT/bundles/$B" && PYTHONPATH=$ROOT OMP_NUM_THREADS=1 python -m monai.bundle run $EXTRA \
      --config_file "['configs/train.json','configs/evaluate.json']" $ARGS --output_dir "$OUT/${SET}_$side" >> "$OUT/${SET}_$side.log" 2>&1 )
done
PYTHONPATH=$AFTER python "$AFTER/benchmarks/convergence_figure.py" --out "$AFTER/bundles/$B/docs/$FIGURE" \
  --title "$TITLE" "$BEFORE_LABEL=$OUT/${SET}_before/logs/history.jsonl" "this version=$OUT/${SET}_after/logs/history.jsonl"
