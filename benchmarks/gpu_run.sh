#!/usr/bin/env bash
# One GPU session: GPU tests, operator timing (two shapes), whole-model timing (eager and compiled),
# and `sla2 bench` itself. Writes at most 8 files to OUT_DIR; the logs go to OUT_DIR/all.log.
# Usage: bash benchmarks/gpu_run.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
mkdir -p /tmp/site "$out"
log="$out/all.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_convert.py 2>&1 \
  | grep -v DEBUG > "$out/gpu_tests.log"
grep -E "errors\(|passed|failed" "$out/gpu_tests.log" | tee -a "$log"
python3 benchmarks/gpu_suite.py --csv "$out/operator.csv" --shapes 1,12,32760,128 \
  --sparsities 0.9 0.95 0.97 --rep-ms 200 >> "$log" 2>&1
python3 benchmarks/gpu_suite.py --csv "$out/operator_14b.csv" --shapes 1,40,75600,128 \
  --sparsities 0.97 --modes fwd --rep-ms 100 >> "$log" 2>&1
python3 benchmarks/model_suite.py --csv "$out/model.csv" >> "$log" 2>&1
timeout 400 python3 benchmarks/model_suite.py --csv "$out/model_compiled.csv" --compile >> "$log" 2>&1
timeout 200 python3 -m sla2cli bench --shape 1,12,32760,128 --sparsity 0.97 --mode fwd \
  --csv "$out/bench_cli.csv" --plot "$out/bench_cli.png" >> "$log" 2>&1
grep -vE "^\s*$|Warning|warn" "$log" | tail -60
