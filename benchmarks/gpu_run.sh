#!/usr/bin/env bash
# GPU runs in two phases of a few minutes each (logs go to OUT_DIR/all.log); wheels for packages the
# machine lacks (diffusers) may be put in .whl/ (git-ignored) and are installed first:
#   core:  GPU tests, operator timing at both default shapes, one model forward, `sla2 bench` itself
#   extra: the model forward under torch.compile, and `sla2 report` at 480p with peak memory
#   lowbit: low-bit GPU tests, low-bit accuracy (random and embedded-model inputs), operator timing of
#           bf16 SLA2 beside its low-bit modes and FA2 at both default shapes
#   finetune: fine-tuning GPU test; `sla2 finetune` on the embedded model at 0.97 with the recipe's defaults
#           (validation dense/before/after, minutes, memory; also evaluated with int8) and 3 steps of a
#           full-size Wan2.1-1.3B at 480p x 81 frames with gradient checkpointing (samples/s, peak memory)
#   qat:    the same embedded run with --quant int8, evaluated with and without int8 (run after finetune)
#   quality-pilot: the quality suite's acceptance matrix, 10 workers at once, 200 steps (and the shipped form):
#           checks every method on CUDA and measures per-job rates under concurrency; its last line says how many
#           steps fit in 8 minutes
#   verify: kernel checksums against the tree in .old/ (an earlier commit's sla2cli/ and kernels/ as sla2_kernels/,
#           if present) and this tree's, every GPU test, `sla2 bench` at 32760 tokens, 3 full-size Wan2.1-1.3B
#           fine-tuning steps, and a 100-step quality pilot (every method on CUDA, per-job rates under concurrency)
#   quality: the same with QUALITY_STEPS steps (required) and QUALITY_MINUTES of budget (default 8): writes
#           quality_embedded.csv, quality.log and shipped/ (the three files that go into sla2cli/assets/);
#           QUALITY_METHODS=sla2 runs dense and sla2 at every sparsity only (4 jobs: more steps in the same time; a list
#           without sla2 writes no shipped/); QUALITY_SPARSITIES (e.g. 0.97) instead of 0.9,0.95,0.97;
#           QUALITY_CALIBRATION_CLIPS, QUALITY_ROUTER_STEPS: stage 1 (3, 400); QUALITY_TESTS=1 runs every GPU test
#           beside it (gpu_tests.log), which takes GPU time from the jobs
#   final: kernel checksums of this tree, .old/ and .speed/ (a candidate kernel change), every GPU test, `sla2 bench`
#           at 0.97 on both default shapes for this tree and .speed/, and 3 full-size Wan2.1-1.3B fine-tuning steps
#   speed: every GPU test, `sla2 bench` with sla2-lowbit at 0.97 on both default shapes, the forward's and backward's
#           stages timed alone (gpu_suite.py --parts), and the Wan2.1-14B 720p model bench with random weights
#   backward: the kernel GPU tests, then fwd+bwd of FA2 and SLA2 at 0.97 on both default shapes with the backward's
#           stages alone and each backward kernel under every launch setting of gpu_suite.py's sweep
#   ab:     every GPU test of this tree, then `sla2 bench` at 0.97 on both default shapes for this tree and for .base/
#           (an earlier commit's sla2cli/, kernels/ as sla2_kernels/, recipes/ inside sla2cli/), each beside FA2,
#           then this tree's kernel profile (as in profile)
#   route:  FA2 and SLA2 forwards at 0.97 on both default shapes, PyTorch's routing and the routing kernels under
#           every launch setting of gpu_suite.py's sweep
#   tma:    the kernel GPU tests, then the forward and both backward kernels gathering blocks of rows through
#           pointers or tensor descriptors, at 0.97 on both default shapes (gpu_suite.py --tma-parts)
#   profile: GPU time of every kernel the op launches at 0.97 on both default shapes, forward and forward+backward
#   memory: fine-tuning peak memory of Wan2.1-14B at 720p x 81 frames measured at 1, 2 and 4 blocks and extrapolated
#           (benchmarks/memory_breakdown.py); the same for Wan2.1-1.3B at 480p at 2, 4 and 8 blocks, beside 3 steps of
#           the whole 1.3B model, which checks the extrapolation
#   release: every GPU test, `sla2 bench` at 0.97 on both default shapes beside FA2, then what bound runs
#   bound:  Wan2.1-1.3B at 480p x 81 frames, eager, forward and training step (gradient checkpointing, as the recipe
#           fine-tunes): FA2, SLA2 at 0.97 and the model with self-attention skipped (what any attention is bounded by)
# Usage: bash benchmarks/gpu_run.sh OUT_DIR core|extra|lowbit|finetune|qat|verify|quality-pilot|quality|final|speed|backward|ab|route|tma|profile|memory|bound|release
set -uo pipefail
out=${1:?output folder}
phase=${2:?core, extra, lowbit, finetune, qat, verify, quality-pilot, quality, final, speed, backward, ab, route, tma, profile, memory, bound or release}
mkdir -p /tmp/site "$out"
log="$out/all.log"
source benchmarks/gpu_packages.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"

# `sla2 bench` at 0.97 on both default shapes, beside FA2, for another tree laid out as installed (kernels/ as
# sla2_kernels/, recipes/ inside sla2cli/): run from inside it, so that its sla2cli, not this tree's, is imported.
bench_other_tree() {  # TREE CSV COMMIT
  (cd "$1" && export PYTHONPATH="$PWD:/tmp/site" SLA2_COMMIT="$3" && python3 -c "import sla2cli, sla2_kernels; \
    print('$1 tree:', sla2cli.__file__, sla2_kernels.__file__)" && timeout 150 python3 -m sla2cli bench \
    --sparsity 0.97 --time-budget 3 --provider fa2 --provider sla2 --csv "$2")
}
if [ "$phase" = core ]; then
  python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_convert.py 2>&1 \
    | grep -v DEBUG | grep -E "errors\(|passed|failed|Error" | tee -a "$log"
  python3 benchmarks/gpu_suite.py --csv "$out/operator.csv" --shapes 1,12,32760,128 1,40,75600,128 \
    --sparsities 0.9 0.95 0.97 --rep-ms 150 >> "$log" 2>&1
  python3 benchmarks/model_suite.py --csv "$out/model.csv" >> "$log" 2>&1
  timeout 200 python3 -m sla2cli bench --shape 1,12,32760,128 --sparsity 0.9 --sparsity 0.95 --sparsity 0.97 \
    --csv "$out/bench_cli.csv" --plot "$out/bench_cli.png" >> "$log" 2>&1
elif [ "$phase" = lowbit ]; then
  python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_quantization_gpu.py tests/test_kernels_gpu.py \
    tests/test_bench.py 2>&1 \
    | grep -v DEBUG | grep -E "errors|oracle|passed|failed|Error|assert" | tee -a "$log"
  timeout 150 python3 benchmarks/lowbit_accuracy.py --csv "$out/lowbit_accuracy.csv" >> "$log" 2>&1
  timeout 200 python3 benchmarks/gpu_suite.py --csv "$out/operator_lowbit.csv" --shapes 1,12,32760,128 \
    --sparsities 0.97 --quant int8 int8-fp8 --rep-ms 150 >> "$log" 2>&1
  timeout 150 python3 benchmarks/gpu_suite.py --csv "$out/operator_lowbit_14b.csv" --shapes 1,40,75600,128 \
    --sparsities 0.97 --modes fwd --quant int8 --rep-ms 150 >> "$log" 2>&1
  timeout 150 python3 benchmarks/lowbit_parts.py --csv "$out/lowbit_parts.csv" > "$out/lowbit_parts.txt" 2>&1
elif [ "$phase" = finetune ]; then
  python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_finetune.py 2>&1 \
    | grep -v DEBUG | grep -E "passed|failed|Error|assert" | tee -a "$log"
  timeout 500 python3 benchmarks/finetune_gpu.py --out "$out/finetune" --phases embedded,wan \
    --csv finetune_gpu.csv >> "$log" 2>&1
elif [ "$phase" = verify ]; then
  if [ -d .old ]; then
    PYTHONPATH="$PWD/.old:/tmp/site" SLA2_COMMIT="${OLD_COMMIT:-old}" timeout 240 python3 \
      benchmarks/kernel_regression.py --out "$out/regression_old.txt" > /tmp/regression_old.log 2>&1 &
  fi
  timeout 240 python3 benchmarks/kernel_regression.py --out "$out/regression_new.txt" > /tmp/regression_new.log 2>&1 &
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | grep -v DEBUG | tail -8 | tee -a "$log"
  wait
  tail -2 /tmp/regression_old.log /tmp/regression_new.log >> "$log"
  if [ -f "$out/regression_old.txt" ]; then
    diff <(tail -n +2 "$out/regression_old.txt") <(tail -n +2 "$out/regression_new.txt") > /dev/null \
      && echo "kernel checksums: identical to .old" | tee -a "$log" || echo "kernel checksums DIFFER" | tee -a "$log"
  fi
  timeout 150 python3 -m sla2cli bench --shape 1,12,32760,128 --sparsity 0.9 --sparsity 0.97 \
    --csv "$out/bench_cli.csv" --plot "$out/bench_cli.png" >> "$log" 2>&1
  timeout 120 python3 benchmarks/finetune_gpu.py --out /tmp/finetune --phases wan --csv "$out/finetune_wan_gpu.csv" \
    >> "$log" 2>&1
  timeout 200 python3 benchmarks/quality_suite.py --matrix acceptance --jobs 8 --steps 100 --device cuda \
    --out /tmp/quality-pilot --csv "$out/quality_pilot.csv" --time-budget-minutes 3 > "$out/quality_pilot.log" 2>&1
  tail -14 "$out/quality_pilot.log" >> "$log"
elif [ "$phase" = quality-pilot ]; then
  timeout 480 python3 benchmarks/quality_suite.py --matrix acceptance --jobs 10 --steps 200 --device cuda \
    --out /tmp/quality-pilot --csv "$out/quality_pilot.csv" --ship "$out/shipped_pilot" --time-budget-minutes 6.5 \
    > "$out/quality_pilot.log" 2>&1
  tail -12 "$out/quality_pilot.log" >> "$log"
elif [ "$phase" = quality ]; then
  # QUALITY_METHODS (e.g. sla2) runs those methods at every sparsity, beside the dense reference, instead of the
  # acceptance matrix: fewer jobs at once, so more steps fit in the same minutes.
  matrix=(--matrix acceptance)
  [ -n "${QUALITY_METHODS:-}" ] && matrix=(--matrix full --methods "$QUALITY_METHODS")
  # The shipped form comes from the sla2 job at 0.97, so a run without sla2 writes none.
  ship=(--ship "$out/shipped")
  [ -n "${QUALITY_METHODS:-}" ] && [[ ",$QUALITY_METHODS," != *,sla2,* ]] && ship=()
  [ -n "${QUALITY_SPARSITIES:-}" ] && matrix+=(--sparsities "$QUALITY_SPARSITIES")
  if [ "${QUALITY_TESTS:-0}" = 1 ]; then
    (timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | grep -v DEBUG > "$out/gpu_tests.log") &
  fi
  # Stage 1 on the GPU: QUALITY_CALIBRATION_CLIPS and QUALITY_ROUTER_STEPS, by default 3 and 400 as the README's
  # first tables were made (the recipe's defaults, 1 and 150, are sized to take under 10 minutes on 2 CPU cores).
  timeout 575 python3 benchmarks/quality_suite.py "${matrix[@]}" --jobs 10 --steps "${QUALITY_STEPS:?}" \
    --calibration-clips "${QUALITY_CALIBRATION_CLIPS:-3}" --router-steps "${QUALITY_ROUTER_STEPS:-400}" \
    --device cuda --out /tmp/quality --csv "$out/quality_embedded.csv" "${ship[@]}" \
    --time-budget-minutes "${QUALITY_MINUTES:-8}" > "$out/quality.log" 2>&1
  wait
  tail -12 "$out/quality.log" >> "$log"
  [ -f "$out/gpu_tests.log" ] && tail -4 "$out/gpu_tests.log" | tee -a "$log"
elif [ "$phase" = final ]; then
  # kernel checksums of this tree, of .old/ (an earlier commit) and of .speed/ (a candidate kernel change), each tree
  # laid out as installed (kernels/ as sla2_kernels/, recipes/ inside sla2cli/); every GPU test of this tree and the
  # kernel GPU tests of .speed/; sla2 bench at 0.97 on both default shapes for this tree and for .speed/, side by side
  # with FlashAttention2 in each process; 3 full-size Wan2.1-1.3B fine-tuning steps
  timeout 200 python3 benchmarks/kernel_regression.py --out "$out/regression_new.txt" > /tmp/regression_new.log 2>&1 &
  for tree in old speed; do
    if [ -d ".$tree" ]; then
      PYTHONPATH="$PWD/.$tree:/tmp/site" SLA2_COMMIT="$tree" timeout 200 python3 benchmarks/kernel_regression.py \
        --out "$out/regression_$tree.txt" > "/tmp/regression_$tree.log" 2>&1 &
    fi
  done
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | grep -v DEBUG | tail -8 | tee -a "$log"
  wait
  tail -n 2 /tmp/regression_*.log >> "$log"
  for tree in old speed; do
    if [ -f "$out/regression_$tree.txt" ]; then
      diff <(tail -n +2 "$out/regression_$tree.txt") <(tail -n +2 "$out/regression_new.txt") > /dev/null \
        && echo "kernel checksums: identical to .$tree" | tee -a "$log" \
        || echo "kernel checksums differ from .$tree" | tee -a "$log"
    fi
  done
  timeout 120 python3 -m sla2cli bench --sparsity 0.97 --time-budget 3 --provider fa2 --provider sla2 \
    --csv "$out/bench_main.csv" >> "$log" 2>&1
  if [ -d .speed ]; then
    (cd .speed && export PYTHONPATH="$PWD:$PWD/tests:/tmp/site" && timeout 150 python3 -m pytest -q \
      -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_quantization_gpu.py 2>&1 | grep -v DEBUG \
      | tail -6) 2>&1 | tee -a "$log"
    bench_other_tree .speed "$out/bench_speed.csv" speed 2>&1 | tee -a "$log"
  fi
  timeout 120 python3 benchmarks/finetune_gpu.py --out /tmp/finetune --phases wan --csv "$out/finetune_wan_gpu.csv" \
    >> "$log" 2>&1
elif [ "$phase" = speed ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | grep -v DEBUG | tail -4 | tee -a "$log"
  timeout 120 python3 -m sla2cli bench --sparsity 0.97 --time-budget 3 --provider fa2 --provider sla2 \
    --provider sla2-lowbit --csv "$out/lowbit_bench.csv" >> "$log" 2>&1
  timeout 100 python3 benchmarks/gpu_suite.py --csv "$out/parts.csv" --shapes 1,12,32760,128 1,40,75600,128 \
    --sparsities 0.97 --modes fwd --parts --rep-ms 60 >> "$log" 2>&1
  start=$(date +%s)
  timeout 200 python3 -m sla2cli bench --model wan2.1-t2v-14b --random-weights --resolution 720p \
    --csv "$out/model_wan2.1-14b_720p.csv" >> "$log" 2>&1
  echo "14B 720p model bench: exit $?, $(( $(date +%s) - start )) s" | tee -a "$log"
elif [ "$phase" = backward ]; then
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_kernels_gpu.py 2>&1 \
    | grep -v DEBUG | grep -E "errors\(|passed|failed|Error" | tee -a "$log"
  timeout 330 python3 benchmarks/gpu_suite.py --csv "$out/backward_parts.csv" --shapes 1,12,32760,128 \
    1,40,75600,128 --sparsities 0.97 --modes fwd fwd+bwd --backward-parts --rep-ms 60 >> "$log" 2>&1
elif [ "$phase" = ab ]; then
  # AB_TESTS: the GPU test files to run first (default: all of tests/)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu ${AB_TESTS:-tests} 2>&1 | grep -v DEBUG | tail -6 \
    | tee -a "$log"
  timeout 150 python3 -m sla2cli bench --sparsity 0.97 --time-budget 3 --provider fa2 --provider sla2 \
    --csv "$out/bench_new.csv" >> "$log" 2>&1
  bench_other_tree .base "$out/bench_base.csv" "${BASE_COMMIT:-base}" >> "$log" 2>&1
  timeout 150 python3 benchmarks/profile_op.py --csv "$out/op_kernels.csv" >> "$log" 2>&1
elif [ "$phase" = route ]; then
  timeout 300 python3 benchmarks/gpu_suite.py --csv "$out/route_sweep.csv" --shapes 1,12,32760,128 1,40,75600,128 \
    --modes fwd --route-parts --rep-ms 100 >> "$log" 2>&1
elif [ "$phase" = tma ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py 2>&1 | grep -v DEBUG \
    | tail -4 | tee -a "$log"
  timeout 300 python3 benchmarks/gpu_suite.py --csv "$out/tma_sweep.csv" --shapes 1,12,32760,128 1,40,75600,128 \
    --modes fwd --tma-parts --rep-ms 60 >> "$log" 2>&1
elif [ "$phase" = memory ]; then
  timeout 300 python3 benchmarks/memory_breakdown.py --recipe wan2.1-t2v-14b --latents 16,21,90,160 --layers 1 2 4 \
    --csv "$out/memory_wan2.1-14b_720p.csv" >> "$log" 2>&1
  timeout 200 python3 benchmarks/memory_breakdown.py --recipe wan2.1-t2v-1.3b --latents 16,21,60,104 --layers 2 4 8 \
    --gpus 2 --csv "$out/memory_wan2.1-1.3b_480p.csv" >> "$log" 2>&1
  timeout 120 python3 benchmarks/finetune_gpu.py --out /tmp/finetune --phases wan --csv "$out/finetune_wan_gpu.csv" \
    >> "$log" 2>&1
elif [ "$phase" = bound ] || [ "$phase" = release ]; then
  if [ "$phase" = release ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | grep -v DEBUG | tail -6 | tee -a "$log"
    timeout 150 python3 -m sla2cli bench --sparsity 0.97 --time-budget 3 --provider fa2 --provider sla2 \
      --csv "$out/bench.csv" >> "$log" 2>&1
  fi
  timeout 240 python3 benchmarks/model_suite.py --csv "$out/model_bound.csv" --modes fwd fwd+bwd --attention-free \
    --gradient-checkpointing >> "$log" 2>&1
elif [ "$phase" = profile ]; then
  timeout 300 python3 benchmarks/profile_op.py --csv "$out/op_kernels.csv" >> "$log" 2>&1
elif [ "$phase" = qat ]; then
  timeout 500 python3 benchmarks/finetune_gpu.py --out "$out/finetune" --phases qat --csv finetune_qat_gpu.csv \
    >> "$log" 2>&1
else
  timeout 330 python3 benchmarks/model_suite.py --csv "$out/model_compiled.csv" --compile >> "$log" 2>&1
  timeout 240 python3 benchmarks/report_gpu.py --csv "$out/report.csv" --summary "$out/report_memory.csv" \
    >> "$log" 2>&1
fi
grep -vE "^\s*$|Warning|warn" "$log" | tail -70
