#!/usr/bin/env bash
# One GPU session: install carried wheels, run the GPU tests, the operator suite and the model suite.
# Usage: bash benchmarks/gpu_run.sh OUT_DIR [operator-suite args...]
set -uo pipefail
out=${1:?output folder}; shift
mkdir -p /tmp/site "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_convert.py 2>&1 | grep -v DEBUG > "$out/gpu_tests.log"
tail -5 "$out/gpu_tests.log"
python3 benchmarks/gpu_suite.py --csv "$out/operator.csv" "$@" 2>&1 | tee "$out/suite.log"
python3 benchmarks/model_suite.py --csv "$out/model.csv" 2>&1 | tee "$out/model.log"
