#!/usr/bin/env bash
# On the GPU host: LayerZero's GPU tests and attention benchmark, results under $OUT.
#
#   bash scripts/gpu_check.sh doctor       lz.doctor() only (runs and caches each backend's probe)
#   bash scripts/gpu_check.sh tests        doctor + pytest -m gpu tests/gpu, FlashInfer's attention grid left out
#   bash scripts/gpu_check.sh flashinfer   FlashInfer's attention grid (nvcc JIT: ~30 s per kernel variant)
#   bash scripts/gpu_check.sh bench        benchmarks/attention.py
#   bash scripts/gpu_check.sh all          the three in a row (over 10 minutes: not for one device command)
#
# Each mode stays under ~9.5 minutes on an H100, so each fits one device command; run them back to
# back while the host is up (JIT caches live in ~/.cache on the host, and LayerZero's probe
# verdicts in ~/.cache/layerzero). Runs from the source tree with the host's python3 (no pip
# install of the project); optional packages come from /tmp/site (../shared/gpu/README.md).
# Files written directly under $OUT (default ./gpu-out), at most 8:
#   doctor.txt       lz.doctor(): every backend's state on this machine
#   gpu-tests.txt    pytest output (per-kernel grid summaries, failures)     [tests]
#   grid.json        the attention grid per kernel: ran / passed / refused (reasons) / failed
#   flashinfer.txt   pytest output of FlashInfer's grid                       [flashinfer]
#   grid-flashinfer.json
#   attention.txt    the benchmark's table and summary                        [bench]
#   attention.json, attention.png
# Env: LZ_GPU_GRID=quick|default|full (grid size), BENCH_ARGS (extra benchmark flags).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-tests}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
left() { echo $(( ${1} - SECONDS > 30 ? ${1} - SECONDS : 30 )); }   # seconds left of a budget

pytest_gpu() {  # log report -k-expression
  LZ_GPU_REPORT="$OUT/$2" timeout "$(left 560)" $PY -m pytest -m gpu tests/gpu -q -s -rs \
    -p no:cacheprovider -k "$3" > "$OUT/$1" 2>&1 || status=1
  grep -E "^[a-z_.0-9]+: [0-9]+/[0-9]+ passed|FAILED|ERROR|passed|failed|skipped" "$OUT/$1" | tail -40
}

if [[ $what == all || $what == tests || $what == doctor ]]; then
  echo "== doctor (runs each backend's subprocess probe once; FlashInfer's JIT-compiles rmsnorm)"
  timeout 240 $PY -m layerzero doctor > "$OUT/doctor.txt" 2>&1 || status=1
  head -60 "$OUT/doctor.txt"
fi
if [[ $what == all || $what == tests ]]; then
  echo "== pytest -m gpu tests/gpu (without FlashInfer's attention grid)"
  pytest_gpu gpu-tests.txt grid.json "not (grid and flashinfer)"
fi
if [[ $what == all || $what == flashinfer ]]; then
  SECONDS=0
  echo "== pytest -m gpu tests/gpu -k 'grid and flashinfer'"
  pytest_gpu flashinfer.txt grid-flashinfer.json "grid and flashinfer"
fi
if [[ $what == all || $what == bench ]]; then
  SECONDS=0
  echo "== benchmarks/attention.py"
  timeout 570 $PY benchmarks/attention.py --out "$OUT" --max-seconds 470 ${BENCH_ARGS:-} \
    > "$OUT/attention.txt" 2>&1 || status=1
  tail -60 "$OUT/attention.txt"
fi
exit $status
