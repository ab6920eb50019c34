#!/usr/bin/env bash
# The four generators of this repository at equal budgets on one data set (issue 16, part 4).
#   bash benchmarks/generator_comparison.sh OUT brain|isic [GEN_CPU_MINUTES] [STAGE1_CPU_MINUTES] [GENERATORS]
# Stage 1, each bundle's default recipe (max_epochs 100 on brain, 1000 on ISIC, as convergence_pairs.sh) for STAGE1_CPU_MINUTES (default 20) process CPU-minutes:
#   OUT/vqvae (skipped when it already holds models/model.pt, e.g. the "after" side of convergence_pairs.sh,
#   copied or linked there) and OUT/vqvae2.
# Stage 2, GEN_CPU_MINUTES (default 8) process CPU-minutes of training each, one thread each, two at a time:
#   gated     pixelcnn_prior + configs/gated.json (a gated PixelCNN) on OUT/vqvae
#   transformer pixelcnn_prior (the default causal transformer prior) on OUT/vqvae
#   hierarchical pixelcnn_prior + configs/vqvae2.json + configs/vqvae2_gated_top.json (top and bottom gated
#             PixelCNNs) on OUT/vqvae2
#   hierarchical_transformer  pixelcnn_prior + configs/vqvae2.json (the default: a transformer top prior, as the
#             paper's self-attention top prior, and a gated bottom prior) on OUT/vqvae2
# (before pixelcnn_prior 0.4.0 the gated PixelCNNs were the defaults and the transformers overlays; the generator
# names, and what each trains, are the same.)
#   diffusion latent_diffusion on OUT/vqvae
# then each bundle's evaluate.json: 128 samples against 128 test images (c2st_accuracy with its power check,
# MS-SSIM diversity, NLL per level, CPU seconds per sample; diffusion with DIFFUSION_STEPS DDIM steps, default 50),
# and benchmarks/generator_table.py, which prints the table and draws OUT/<set>_generators.png.
# GENERATORS (default "gated transformer hierarchical diffusion") picks a subset; finished steps are skipped.
# GEN_ARGS (default none): more stage-2 training settings, e.g. "--learning_rate 0.0003 --batch_size 16".
# GEN_CONFIGS (default none): overlays appended to every stage-2 command, e.g. "configs/rflow.json" (diffusion only).
# TEST_FRACTION (default 0.1) sets the test split: ISIC needs 0.15 for the 64 test photos of a two-sample test.
set -euo pipefail
OUT=$1; SET=$2; GEN_MIN=${3:-8}; S1_MIN=${4:-20}; GENS=${5:-gated transformer hierarchical diffusion}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(cd "$ROOT/../shared/data" && pwd)
STEPS=${DIFFUSION_STEPS:-50}; TEST=${TEST_FRACTION:-0.1}
case $SET in
  brain) ARGS="--dataset_dir $DATA/brain_mri_2d --data_layout folder --test_fraction $TEST --val_fraction 0.02 --seed 0"
         EPOCHS1=100 ;;
  isic)  ARGS="--dataset_dir $DATA/isic_256 --data_layout isic --in_channels 3 --test_fraction $TEST --val_fraction 0.02 --seed 0"
         EPOCHS1=1000 ;;
  *) echo "set must be brain or isic"; exit 1 ;;
esac
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$ROOT OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
( while true; do echo "$(date -u +%T) $(uptime)"; sleep 60; done ) > "$OUT/uptime.txt" & LOAD=$!
trap 'kill $LOAD 2>/dev/null' EXIT
bundle() {  # bundle NAME LOG ARGS... : one monai.bundle run from bundles/NAME, appended to OUT/LOG.log
  local name=$1 log=$2; shift 2
  echo "$(date -u +%T) $name $*" >> "$OUT/$log.log"
  ( cd "$ROOT/bundles/$name" && /usr/bin/time -f "cpu_seconds %U user %S sys, wall %e s" \
      python -m monai.bundle run --bundle_root . "$@" >> "$OUT/$log.log" 2>&1 )
}
BUDGET1="--max_epochs $EPOCHS1 --time_budget_minutes $S1_MIN --time_budget_clock process"
stage1() {  # stage1 BUNDLE: train + evaluate unless done
  local b=$1
  if [ ! -f "$OUT/$b/models/model.pt" ]; then bundle "$b" "$b" --config_file configs/train.json $ARGS --output_dir "$OUT/$b" $BUDGET1; fi
  if [ ! -f "$OUT/$b/eval/metrics.json" ]; then
    bundle "$b" "$b" --config_file "['configs/train.json','configs/evaluate.json']" $ARGS --output_dir "$OUT/$b"
  fi
}
S1=()  # the stage-1 bundles that the chosen generators need
case " $GENS " in *" gated "*|*" transformer "*|*" diffusion "*) stage1 vqvae & S1+=($!) ;; esac
case " $GENS " in *" hierarchical "*|*" hierarchical_transformer "*) stage1 vqvae2 & S1+=($!) ;; esac
wait "${S1[@]}"
BUDGET2="--max_epochs 10000 --time_budget_minutes $GEN_MIN --time_budget_clock process --sample_interval 0"
gen() {  # gen NAME: train then evaluate one generator unless done
  local g=$1 b=pixelcnn_prior vq=vqvae overlay="" extra=""
  case $g in
    gated) overlay=",'configs/gated.json'" ;;
    transformer) ;;
    hierarchical) overlay=",'configs/vqvae2.json','configs/vqvae2_gated_top.json'"; vq=vqvae2 ;;
    hierarchical_transformer) overlay=",'configs/vqvae2.json'"; vq=vqvae2 ;;
    diffusion) b=latent_diffusion; extra="--num_inference_steps $STEPS" ;;
  esac
  local c; for c in ${GEN_CONFIGS:-}; do overlay="$overlay,'$c'"; done
  local common="--autoencoder_dir $OUT/$vq --output_dir $OUT/$g"
  if [ ! -f "$OUT/$g/models/model.pt" ]; then
    bundle $b "$g" --config_file "['configs/train.json'$overlay]" $common $BUDGET2 ${GEN_ARGS:-}
  fi
  if [ ! -f "$OUT/$g/eval/metrics.json" ]; then
    bundle $b "$g" --config_file "['configs/train.json'$overlay,'configs/evaluate.json']" $common $extra
  fi
}
set -- $GENS
while [ $# -gt 0 ]; do
  gen "$1" & PA=$!; PB=""
  if [ $# -gt 1 ]; then gen "$2" & PB=$!; fi
  wait $PA ${PB:+$PB}; shift; [ $# -gt 0 ] && shift
done
python "$ROOT/benchmarks/generator_table.py" "$OUT" --title "$SET: generators at $GEN_MIN CPU-min each" \
  --figure "$OUT/${SET}_generators.png" $GENS
