#!/usr/bin/env bash
# The README's generate chains (MNI152 slices, the main job's VQ-VAE) with one lever changed at a time (issue 30,
# part 2): each variant is a stage-2 training run of the default bundle with the overrides below, then the bundle's
# inference (16 samples, seed 0, and 128 for the realism score); benchmarks/chain_grid_figure.py draws every
# variant's samples in one figure with its epochs, iterations and CPU seconds, and benchmarks/chain_realism.py scores
# the 128 against the stage-1 reconstructions of all 192 slices.
#   bash benchmarks/default_chain_levers.sh OUT [VARIANTS]
# OUT/stage1 is the main job (bundles/vqvae, configs/train.json, defaults), trained unless it holds models/model.pt.
# VARIANTS (default: all below) picks a subset; a finished step (a trained model.pt, a samples.png) is skipped.
# A sampling variant ("sample:VARIANT ARGS") trains nothing: it samples VARIANT's trained model with the inference
# settings ARGS (e.g. the prior's top_p), after every training variant has run.
# One thread per run, two runs at a time (OMP_WAIT_POLICY=PASSIVE), so CPU seconds compare across variants; the
# wall times of the README come from separate runs on 2 idle cores.
set -euo pipefail
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
declare -A ARGS=(
  [diffusion_lr3e-4_b16]="latent_diffusion --learning_rate 0.0003 --batch_size 16"
  [diffusion_min_snr5]="latent_diffusion --learning_rate 0.0003 --batch_size 16 --min_snr_gamma 5.0"
  [diffusion_lr1e-3_e150]="latent_diffusion --learning_rate 0.001 --batch_size 16 --max_epochs 150"
  [diffusion_lr1e-3_b8]="latent_diffusion --learning_rate 0.001 --batch_size 8"
  [diffusion_augment]="latent_diffusion --augment True --cache_latents False"
  [diffusion_attn2]="latent_diffusion"
  [prior_default]="pixelcnn_prior"
  [prior_e60]="pixelcnn_prior --max_epochs 60"
  [prior_dropout0.3]="pixelcnn_prior --embedding_dropout 0.3"
  [prior_temp0.9]="sample:prior_default --temperature 0.9"
  [prior_topp0.95]="sample:prior_default --top_p 0.95"
  [prior_topp0.9]="sample:prior_default --top_p 0.9"
  [prior_topp0.8]="sample:prior_default --top_p 0.8"
  [prior_topk16]="sample:prior_default --top_k 16"
)
# (diffusion_lr3e-4_b16 is latent_diffusion 0.6.0's default, diffusion_lr1e-3_b8 0.7.0's: 100 epochs each;
# diffusion_augment and diffusion_attn2 are 0.7.0's default with flips and rotations of the slices, encoded every
# step, or with self-attention at the UNet's middle level too)
# network overrides: given to the training and to every inference of the variant (and of its sampling variants)
declare -A NET=([diffusion_attn2]="--unet_def#attention_levels [False,True,True]")
VARIANTS=${2:-${!ARGS[*]}}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$ROOT OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
( while true; do echo "$(date -u +%T) $(uptime)"; sleep 60; done ) > "$OUT/uptime.txt" & LOAD=$!
trap 'kill $LOAD 2>/dev/null' EXIT
if [ ! -f "$OUT/stage1/models/model.pt" ]; then
  ( cd "$ROOT/bundles/vqvae" && python -m monai.bundle run --config_file configs/train.json \
      --output_dir "$OUT/stage1" > "$OUT/stage1.log" 2>&1 )
fi
variant() {  # variant NAME: train, then sample, with /usr/bin/time's CPU seconds in OUT/NAME.time
  local name=$1; set -- ${ARGS[$name]}; local bundle=$1; shift
  local model=$name train=("$@") sampling=()
  if [[ $bundle == sample:* ]]; then  # another variant's model, sampled with other settings
    model=${bundle#sample:}; bundle=${ARGS[$model]%% *}; train=(); sampling=("$@")
    if [ ! -f "$OUT/$model/models/model.pt" ]; then echo "$name: train $model first (add it to VARIANTS)"; return 1; fi
    mkdir -p "$OUT/$name"; ln -sfn "$OUT/$model/logs" "$OUT/$name/logs"; cp "$OUT/$model.time" "$OUT/$name.time"
  fi
  local common=(--autoencoder_dir "$OUT/stage1" --output_dir "$OUT/$model" ${NET[$model]:-})
  local count=--n_samples; [ "$bundle" = pixelcnn_prior ] && count=--num_samples
  cd "$ROOT/bundles/$bundle"
  if [ "$model" = "$name" ] && [ ! -f "$OUT/$name/models/model.pt" ]; then
    /usr/bin/time -f "%U %S %e" -o "$OUT/$name.time" python -m monai.bundle run --config_file configs/train.json \
      "${common[@]}" "${train[@]}" > "$OUT/$name.train.log" 2>&1
  fi
  [ -f "$OUT/$name/inference/samples.png" ] || python -m monai.bundle run --config_file configs/inference.json \
    "${common[@]}" "${sampling[@]}" --inference_dir "$OUT/$name/inference" > "$OUT/$name.inf.log" 2>&1
  [ -f "$OUT/$name/inference_realism/samples.png" ] || python -m monai.bundle run --config_file configs/inference.json \
    "${common[@]}" "${sampling[@]}" "$count" 128 --inference_dir "$OUT/$name/inference_realism" \
    > "$OUT/$name.inf128.log" 2>&1
}
for kind in train sample; do  # the training variants first, two at a time, then the sampling ones
  pids=()  # (a bare `wait` would also wait for the load logger, which never ends)
  for name in $VARIANTS; do
    [[ ${ARGS[$name]} == sample:* ]] && is=sample || is=train
    [ "$is" = "$kind" ] || continue
    ( variant "$name" ) & pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
done
python "$ROOT/benchmarks/chain_grid_figure.py" "$OUT" $VARIANTS
python "$ROOT/benchmarks/chain_realism.py" "$OUT" $VARIANTS | tee "$OUT/realism.jsonl"
