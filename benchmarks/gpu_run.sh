#!/usr/bin/env bash
# One GPU session: install carried wheels, run the GPU tests, then the operator timing suite.
# Usage: bash benchmarks/gpu_run.sh OUT_DIR [suite args...]
set -uo pipefail
out=${1:?output folder}; shift
mkdir -p /tmp/site "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
ln -sfn "$PWD/kernels" /tmp/site/sla2_kernels
export PYTHONPATH="$PWD:/tmp/site:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -m pytest -q -x -s -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -40
python3 benchmarks/gpu_suite.py --csv "$out/operator.csv" "$@" 2>&1 | tee "$out/suite.log"
