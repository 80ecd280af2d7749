#!/usr/bin/env bash
# On the GPU host: LayerZero's GPU tests and attention benchmark, results under $OUT.
#
#   bash scripts/gpu_check.sh [all|tests|bench|doctor]     (default: all)
#
# Runs from the source tree with the host's python3 (no pip install of the project); optional
# packages come from /tmp/site (see ../shared/gpu/README.md: wheels.sh base|full, then install).
# Writes at most 7 files directly under $OUT (default ./gpu-out):
#   doctor.txt        lz.doctor(): every backend's state on this machine
#   gpu-tests.txt     pytest -m gpu tests/gpu (grid summary per kernel, failures)
#   gpu-tests.xml     the same as JUnit XML
#   grid.json         the attention grid per kernel: ran / passed / refused with reasons / failed
#   attention.txt     benchmarks/attention.py's table and summary
#   attention.json    its numbers
#   attention.png     its chart
# Env: LZ_GPU_GRID=quick|default|full (size of the grid), BENCH_ARGS (extra benchmark flags).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

if [[ $what == all || $what == doctor || $what == tests ]]; then
  echo "== doctor"
  $PY -m layerzero doctor > "$OUT/doctor.txt" 2>&1 || status=1
  head -40 "$OUT/doctor.txt"
fi
if [[ $what == all || $what == tests ]]; then
  echo "== pytest -m gpu tests/gpu"
  LZ_GPU_REPORT="$OUT/grid.json" timeout 560 $PY -m pytest -m gpu tests/gpu -q -s -rs -p no:cacheprovider \
    --junitxml "$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1 || status=1
  grep -E "passed in|^[a-z_.0-9]+: [0-9]+/[0-9]+ passed|FAILED|ERROR|passed|failed" "$OUT/gpu-tests.txt" | tail -40
fi
if [[ $what == all || $what == bench ]]; then
  echo "== benchmarks/attention.py"
  timeout 560 $PY benchmarks/attention.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/attention.txt" 2>&1 || status=1
  tail -50 "$OUT/attention.txt"
fi
exit $status
