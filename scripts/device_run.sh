#!/usr/bin/env bash
# Everything the GPU machine runs, in one script (the device tool's lease is short):
#   scripts/device_run.sh test    GPU tests + compute-sanitizer memcheck of every kernel
#   scripts/device_run.sh bench SUITE [options]   a benchmark suite (prefill, decode, decode-multi)
#   scripts/device_run.sh tune WHAT [options]     kernel profile / launch-config sweep (msattn.bench.tune)
# Logs and results go to $OUT (or ./device_out when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
mode=${1:-test}
shift || true
case "$mode" in
  test)
    python3 -m pytest -q tests 2>&1 | tail -n 40 | tee "$OUT/pytest.log"
    # Memcheck: the small-shape kernel tests (every kernel and launch path) under compute-sanitizer.
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
        tests/test_indexer.py tests/test_sparse_attention.py tests/test_paged.py -k "not gpu" 2>&1 | tail -n 15 | tee "$OUT/memcheck.log"
    ;;
  bench)
    suite=${1:-prefill}
    shift || true
    python3 -m msattn.bench.cli bench "$suite" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench-$suite.log"
    ;;
  tune)
    python3 -m msattn.bench.tune "$@" --out "$OUT" 2>&1 | tee -a "$OUT/tune.log"
    ;;
esac
