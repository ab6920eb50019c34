#!/usr/bin/env bash
# Latent diffusion on brain_mri_2d against its training budget, before and after the 0.7.0 recipe (issue 30, part 3):
# "before" is latent_diffusion 0.6.0's learning rate 3e-4 and batch 16, "after" the 0.7.0 default (1e-3, batch 8);
# "rflow" the 0.7.0 default with configs/rflow.json (rectified flow, 0.8.0). RECIPES (default "before after") picks.
# Each recipe trains 8 CPU-minutes, is evaluated (evaluate.json: strict and downsampled c2st, memorisation audit),
# then resumes from a copy of its run folder for 8 and 16 more (16 and 32 in all), each evaluated in turn. One
# stage-1 VQ-VAE (STAGE1_CPU_MINUTES, default 10) serves all. The recipes run side by side, one thread each.
# EVAL_SEEDS (default "0") adds evaluates of every point with other seeds (sampling noise, classifier folds; same
# model, same test slices) into OUT/NAME_MINUTES_seedS/diffusion/eval, the trained run's logs linked beside them.
#   bash benchmarks/diffusion_budget_curve.sh OUT [STAGE1_CPU_MINUTES]
# then: python benchmarks/budget_curve.py --strict --figure FIG "diffusion=8:OUT/before_8:before" ... (printed at the end)
set -euo pipefail
OUT=$1; S1=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
declare -A RECIPE=([before]="--learning_rate 0.0003 --batch_size 16" [after]="" [rflow]="")
declare -A CONFIGS=([before]="" [after]="" [rflow]="configs/rflow.json")
RECIPES=${RECIPES:-before after}
recipe() {  # recipe NAME: the 8, 16 and 32 CPU-minute points of one recipe
  local name=$1 prev="" total=0
  for step in 8 8 16; do
    total=$((total + step)); local dir="$OUT/${name}_$total"
    mkdir -p "$dir"; [ -e "$dir/vqvae" ] || ln -s "$OUT/vqvae" "$dir/vqvae"
    if [ -n "$prev" ] && [ ! -d "$dir/diffusion" ]; then  # resume: the earlier run's checkpoints, not its model or eval
      cp -r "$prev/diffusion" "$dir/diffusion"; rm -rf "$dir/diffusion/models/model.pt" "$dir/diffusion/eval"
    fi
    GEN_ARGS="${RECIPE[$name]}" GEN_CONFIGS="${CONFIGS[$name]}" bash "$ROOT/benchmarks/generator_comparison.sh" "$dir" brain "$step" "$S1" diffusion \
      > "$dir.out" 2>&1
    prev=$dir
  done
  local seed t overlay="" c
  for c in ${CONFIGS[$name]}; do overlay="$overlay,'$c'"; done
  for t in 32 16 8; do  # the target budget's seeds first: a run stopped early has them
    for seed in ${EVAL_SEEDS:-0}; do
      [ "$seed" = 0 ] && continue
      local run="$OUT/${name}_$t" ev="$OUT/${name}_${t}_seed$seed/diffusion"
      [ -f "$ev/eval/metrics.json" ] && continue
      mkdir -p "$ev"; [ -e "$ev/logs" ] || ln -s "$run/diffusion/logs" "$ev/logs"
      ( cd "$ROOT/bundles/latent_diffusion" && OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python -m monai.bundle run \
          --bundle_root . --config_file "['configs/train.json'$overlay,'configs/evaluate.json']" \
          --autoencoder_dir "$run/vqvae" --output_dir "$run/diffusion" --eval_dir "$ev/eval" \
          --num_inference_steps 50 --seed "$seed" > "$ev.out" 2>&1 )
    done
  done
}
if [ ! -f "$OUT/vqvae/models/model.pt" ]; then  # stage 1 as generator_comparison.sh trains it on brain_mri_2d
  ( cd "$ROOT/bundles/vqvae" && OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python -m monai.bundle run \
      --config_file configs/train.json --bundle_root . --dataset_dir "$ROOT/../shared/data/brain_mri_2d" \
      --data_layout folder --test_fraction 0.1 --val_fraction 0.02 --seed 0 --output_dir "$OUT/vqvae" \
      --max_epochs 100 --time_budget_minutes "$S1" --time_budget_clock process > "$OUT/vqvae.log" 2>&1 )
fi
if [ ! -f "$OUT/vqvae/eval/metrics.json" ]; then  # evaluated once here, not by both recipes at the same time
  ( cd "$ROOT/bundles/vqvae" && OMP_NUM_THREADS=1 python -m monai.bundle run --bundle_root . \
      --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir "$ROOT/../shared/data/brain_mri_2d" \
      --data_layout folder --test_fraction 0.1 --val_fraction 0.02 --seed 0 --output_dir "$OUT/vqvae" >> "$OUT/vqvae.log" 2>&1 )
fi
for name in $RECIPES; do recipe "$name" & done; wait
ARGS=(); for name in $RECIPES; do for t in 8 16 32; do
  ARGS+=("diffusion=$t:$OUT/${name}_$t:$name")
  for seed in ${EVAL_SEEDS:-0}; do [ "$seed" = 0 ] || ARGS+=("diffusion=$t:$OUT/${name}_${t}_seed$seed:$name"); done
done; done
echo python "$ROOT/benchmarks/budget_curve.py" --strict --figure docs/diffusion_budget_before_after.png "${ARGS[@]}"
