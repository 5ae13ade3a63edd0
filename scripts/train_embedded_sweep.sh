#!/usr/bin/env bash
# Train the embedded model with several initial attention-logit scales at once, one GPU each, then measure
# every result's attention structure and validation loss. Wheels for missing packages may sit in .whl/.
# Usage: bash scripts/train_embedded_sweep.sh OUT_DIR MINUTES GAIN [GAIN ...]   (one GAIN per visible GPU)
# OUT_DIR/sweep.log gets one summary line per run; OUT_DIR/gain-<G>/ the weights, json and measurement.
set -uo pipefail
out=${1:?output folder}
minutes=${2:?minutes per run}
shift 2
mkdir -p /tmp/site "$out"
source benchmarks/gpu_packages.sh
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 -c "from diffusers import WanTransformer3DModel" || exit 1
gpu=0
for gain in "$@"; do
  mkdir -p "$out/gain-$gain"
  CUDA_VISIBLE_DEVICES=$gpu python3 scripts/train_embedded.py --out "$out/gain-$gain" --device cuda \
    --minutes "$minutes" --qk-gain "$gain" --quiet > "$out/gain-$gain/train.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
gpu=0
for gain in "$@"; do
  CUDA_VISIBLE_DEVICES=$gpu python3 -m sla2cli.embedded.measure --clips 4 --device cuda \
    --assets "$out/gain-$gain" > "$out/gain-$gain/measure.json" 2> "$out/gain-$gain/measure.err" &
  gpu=$((gpu + 1))
done
wait
for gain in "$@"; do
  mass=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['mean_top_block_mass_share'])" \
    "$out/gain-$gain/measure.json" 2>/dev/null || echo failed)
  echo "gain $gain: top-10% block mass $mass; $(tail -n 1 "$out/gain-$gain/train.log")" | tee -a "$out/sweep.log"
done
