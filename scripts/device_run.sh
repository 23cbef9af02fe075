#!/usr/bin/env bash
# Everything the GPU machine runs, in one script (the device tool's lease is short):
#   scripts/device_run.sh test [PYTEST_ARGS...]   GPU tests, then compute-sanitizer memcheck of every kernel
#   scripts/device_run.sh pytest [PYTEST_ARGS...] the GPU tests alone (no memcheck); the whole suite
#                                                  takes more than the device's 10 minutes a call on
#                                                  an H200 (2026-12-04): split it, e.g.
#                                                  `pytest tests/test_[a-o]*.py`, then `pytest tests/test_[p-z]*.py`
#   scripts/device_run.sh memcheck                the memcheck step alone
#   scripts/device_run.sh bench SUITE [options]   a benchmark suite (prefill, prefill-chunked, decode,
#                                                  decode-multi, train, hf)
#   scripts/device_run.sh tune WHAT [options]     kernel profile / launch-config sweep (msattn.bench.tune)
#   scripts/device_run.sh ncu LENGTH [DTYPE]      Nsight Compute durations of one decode step's kernels
#   scripts/device_run.sh decode-report [multi]   decode GPU tests + memcheck, then the decode bench
#                                                  (bf16, fp8 and 4-bit keys) beside vLLM (carry .peers)
#                                                  and dense, the 1M decode profile; `multi` adds decode-multi
#   scripts/device_run.sh prefill-report [bench|check]  the chunked shapes beside vLLM (carry .peers),
#                                                  the chunked profile (fused against block-top-k
#                                                  selection), prefill 8K-128K; GPU tests + memcheck
#                                                  and the chunked call's host time (host_time_chunked.py)
#   scripts/device_run.sh chunked-report          GPU tests of the CSR and attention paths, the
#                                                  chunked call's host time (this tree and .peers/msattn_base),
#                                                  chunked shapes beside vLLM, memcheck, prefill 8K-128K
#   scripts/device_run.sh kv-report [ab|check]    `ab`: the prefill's merge A/B at 16K and 128K, fp8 K/V
#                                                  decode at 32 x 8 x 64K of this tree and
#                                                  .peers/msattn_base, attention launch variants;
#                                                  `check`: GPU tests + memcheck of the decode attention
#                                                  and the sparse attention (both merges)
#   scripts/device_run.sh train-report [ab|check] the backward's float32 reductions (bulk TMA dQ against
#                                                  elementwise atomics) at 128K and 512K, training GPU tests + memcheck
#                                                  of the backward kernels, the training step at 32K-512K
#   scripts/device_run.sh all [BENCH_ARGS...]      test, then the prefill and decode benches
# Whole logs and results go to $OUT (or ./device_out when OUT is unset); a summary of every step
# is printed last. The exit status is nonzero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
SUMMARY=()
FAILED=0

# step NAME LOG COMMAND...: run COMMAND with its whole output in $OUT/LOG, record its status.
step() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" > "$OUT/$log" 2>&1
  local status=$?
  local tail_line
  tail_line=$(grep -v '^\s*$' "$OUT/$log" | tail -n 1 | cut -c1-160)
  SUMMARY+=("$(printf '%-9s %-4s %5ss  %s' "$name" "$([ $status -eq 0 ] && echo ok || echo FAIL:$status)" $((SECONDS - start)) "$tail_line")")
  [ $status -eq 0 ] || FAILED=1
  return 0
}

# Memcheck: small-shape tests of every kernel and launch path under compute-sanitizer (the
# forward kernels, then the backward and indexer-loss kernels).
run_memcheck() {
  step memcheck-fwd memcheck-fwd.log timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
      python3 -m pytest -q -x tests/test_indexer.py tests/test_sparse_attention.py tests/test_paged.py \
      -k "not gpu and (two_level or public or wrapper or matches_reference or split or paged_selection or chunk or decode_selection)"
  step memcheck-bwd memcheck-bwd.log timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
      python3 -m pytest -q -x tests/test_sparse_attention_bwd.py tests/test_indexer_loss.py \
      -k "backward_matches_reference_fp32 or backward_16bit or split_buckets or exact_zeros or bitwise or triton_matches_reference"
}

run_tests() {
  step pytest pytest.log python3 -m pytest -q -rs tests "$@"
  run_memcheck
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/gpu.txt"
mode=${1:-test}
shift || true
case "$mode" in
  test)
    run_tests "$@"
    ;;
  pytest)
    step pytest pytest.log python3 -m pytest -q -rs "${@:-tests}"
    ;;
  memcheck)
    run_memcheck
    ;;
  bench)
    suite=${1:-prefill}
    shift || true
    step "$suite" "bench-$suite.log" python3 -m msattn.bench.cli bench "$suite" --out "$OUT" "$@"
    ;;
  tune)
    step tune "tune-${1:-profile}.log" python3 -m msattn.bench.tune "$@" --out "$OUT"
    ;;
  ncu)
    step ncu "ncu-${1:-65536}.log" ncu --launch-skip 6 --launch-count 3 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
        python3 scripts/ncu_decode_step.py "$@"
    ;;
  decode-report)
    step pytest pytest.log timeout 150 python3 -m pytest -q -rs tests/test_indexer.py tests/test_paged.py \
        tests/test_nvfp4.py tests/test_cache.py
    step memcheck memcheck.log timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -x tests/test_indexer.py tests/test_paged.py tests/test_nvfp4.py \
        -k "not gpu and (decode or wrapper or public or fp8 or 4bit or chunk or triton_tile)"
    step decode bench-decode.log timeout 240 python3 -m msattn.bench.cli bench decode --out "$OUT" \
        --lengths 8k,16k,64k,256k,1m --index-dtypes bf16,fp8,nvfp4 --time-budget 0.5
    step tune tune-decode.log timeout 200 python3 -m msattn.bench.tune decode --shapes 1x1x1m \
        --index-dtypes bf16,fp8,nvfp4 --out "$OUT"
    if [ "${1:-}" = multi ]; then
      step decode-multi bench-decode-multi.log timeout 150 python3 -m msattn.bench.cli bench decode-multi \
          --out "$OUT" --batches 8,32 --q-tokens 8 --lengths 4k,64k --index-dtypes bf16 --time-budget 0.3
      step tune-kv tune-decode-kv.log timeout 120 python3 -m msattn.bench.tune decode --profile-only \
          --shapes 32x8x64k --index-dtypes bf16,fp8-kv,fp8,fp8+fp8-kv --out "$OUT"
    fi
    ;;
  prefill-report)
    # The prefill checks (about 8 minutes each part on an H200): `prefill-report bench` times the
    # chunked shapes beside vLLM (carry .peers), the chunked-call profile with the fused selection
    # against the block-score + top-k one, and prefill 8K-128K; `prefill-report check` runs the
    # GPU tests and memcheck of the selection-CSR, sparse-attention, paged and chunk-selection
    # paths. No argument runs both.
    part=${1:-all}
    if [ "$part" != check ]; then
      step chunked bench-prefill-chunked.log timeout 120 python3 -m msattn.bench.cli bench prefill-chunked \
          --out "$OUT"
      step tune tune-chunked.log timeout 150 python3 -m msattn.bench.tune chunked \
          --chunk-shapes 1x512x16k,1x1kx16k,1x2kx64k,4x2kx64k --selections fused,block-topk --out "$OUT"
      step prefill bench-prefill.log timeout 200 python3 -m msattn.bench.cli bench prefill --out "$OUT" \
          --lengths 8k,16k,32k,128k --time-budget 2
    fi
    if [ "$part" != bench ]; then
      step pytest pytest.log timeout 200 python3 -m pytest -q -rs -m gpu tests/test_sparse_attention.py \
          tests/test_sparse_attention_bwd.py tests/test_paged.py tests/test_cache.py tests/test_indexer.py
      step pytest-sel pytest-selection.log timeout 150 python3 -m pytest -q -rs -m "not gpu" \
          tests/test_indexer.py tests/test_paged.py -k "block_topk or select or chunk"
      step memcheck memcheck.log timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
          python3 -m pytest -q -x tests/test_sparse_attention.py tests/test_paged.py \
          -k "not gpu and (csr or matches_reference or chunk or 4bit)"
      step memcheck-sel memcheck-selection.log timeout 90 compute-sanitizer --tool memcheck \
          --error-exitcode 9 python3 -m pytest -q -x tests/test_indexer.py -k "block_topk_selects"
      step host host-chunked.log timeout 60 python3 scripts/host_time_chunked.py
    fi
    ;;
  chunked-report)
    # The chunked-prefill call's host work: GPU tests of the CSR and the
    # attention paths, the host time by stage of this tree and of a base tree carried in
    # .peers/msattn_base (`git archive BASE msattn scripts`), the chunked shapes beside vLLM
    # (carry .peers), prefill 8K-128K, then memcheck of the changed kernels.
    # (the whole files take more than 200 s on an H100: the GPU-marked tests, memcheck below
    # runs the small-shape CSR and attention tests)
    step pytest pytest-gpu.log timeout 240 python3 -m pytest -q -rs -m gpu tests/test_sparse_attention.py \
        tests/test_paged.py tests/test_sparse_attention_bwd.py tests/test_indexer_loss.py
    if [ -d .peers/msattn_base ]; then
      step host-base host-chunked-base.log timeout 90 env PYTHONPATH=$PWD/.peers/msattn_base \
          python3 .peers/msattn_base/scripts/host_time_chunked.py
    fi
    step host host-chunked.log timeout 90 python3 scripts/host_time_chunked.py
    step chunked bench-prefill-chunked.log timeout 150 python3 -m msattn.bench.cli bench prefill-chunked \
        --out "$OUT"
    # The short chunks are bound by the host, whose speed differs between processes by up to 2.5x
    # (H100, 2026-12-08): two more processes of them, to report a median.
    for round in 2 3; do
      step "chunked-$round" "bench-prefill-chunked-$round.log" timeout 60 python3 -m msattn.bench.cli \
          bench prefill-chunked --out "$OUT" --shapes 1x512x16k,1x1kx16k
    done
    step memcheck memcheck.log timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -x tests/test_sparse_attention.py tests/test_paged.py \
        tests/test_sparse_attention_bwd.py -k "not gpu and (csr or matches_reference or chunk or backward_16bit)"
    step prefill bench-prefill.log timeout 150 python3 -m msattn.bench.cli bench prefill --out "$OUT" \
        --lengths 8k,16k,128k --time-budget 1
    ;;
  kv-report)
    # fp8 K/V decode and the prefill's merged partials, in two calls of under 10 minutes:
    # `kv-report ab` times them (the prefill's merge=True against the default at 16K and 128K;
    # the 32 x 8 x 64K decode step of a base tree carried in .peers/msattn_base, `git archive
    # BASE msattn scripts`, and of this tree; this tree's attention launch variants on fp8 K/V),
    # `kv-report check` runs the GPU tests and memcheck of the decode attention and the sparse
    # attention (both merges). No argument runs both.
    part=${1:-all}
    if [ "$part" != check ]; then
      for length in 16k 128k; do
        step "merge-$length" "tune-attention-merge-$length.log" timeout 120 python3 -m msattn.bench.tune \
            attention --length $length --default-config --variants '[{"merge": true}]' --out "$OUT"
      done
      if [ -d .peers/msattn_base ]; then
        step tune-base tune-kv-base.log timeout 120 env PYTHONPATH=$PWD/.peers/msattn_base python3 -m \
            msattn.bench.tune decode --profile-only --shapes 32x8x64k \
            --index-dtypes bf16,fp8-kv,fp8+fp8-kv --out "$OUT/base"
      fi
      step tune tune-kv.log timeout 120 python3 -m msattn.bench.tune decode --profile-only \
          --shapes 32x8x64k --index-dtypes bf16,fp8-kv,fp8+fp8-kv --out "$OUT"
      step tune-att tune-kv-attention.log timeout 150 python3 -m msattn.bench.tune decode \
          --attention-only --shapes 32x8x64k --index-dtypes fp8-kv,fp8+fp8-kv --out "$OUT"
    fi
    if [ "$part" != ab ]; then
      step pytest pytest.log timeout 150 python3 -m pytest -q -rs tests/test_paged.py \
          -k "fp8_kv or decode_attention or shared_pages or gpu"
      step pytest-sparse pytest-sparse.log timeout 240 python3 -m pytest -q -rs tests/test_sparse_attention.py
      step memcheck memcheck.log timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 \
          python3 -m pytest -q -x tests/test_paged.py tests/test_sparse_attention.py \
          -k "not gpu and (fp8_kv or csr or order or shared_pages or matches_reference or same_bits or ignores or unwritten or shuffled)"
    fi
    ;;
  train-report)
    # The A/B of the float32 gradient reductions (the bulk TMA dQ against elementwise atomics,
    # 2 GiB dQ chunks) first (the lease may end early), then the GPU tests and memcheck of the
    # backward and loss kernels, then the training step. Together they can exceed one device
    # call (10 minutes): `train-report ab` runs the A/B and the GPU tests, `train-report check`
    # the memcheck and the training step; no argument runs both.
    part=${1:-all}
    if [ "$part" != check ]; then
      BWD_VARIANTS='[{"bulk_dq": false}, {"atomic_dq_chunk_bytes": 2147483648}]'
      for length in 512k 128k; do
        step "tune-$length" "tune-backward-$length.log" timeout 150 python3 -m msattn.bench.tune backward \
            --length $length --variants "$BWD_VARIANTS" --out "$OUT"
      done
      step pytest pytest.log timeout 200 python3 -m pytest -q -rs tests/test_sparse_attention_bwd.py \
          tests/test_indexer_loss.py
    fi
    if [ "$part" != ab ]; then
      step memcheck-bwd memcheck-bwd.log timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
          python3 -m pytest -q -x tests/test_sparse_attention_bwd.py tests/test_indexer_loss.py \
          -k "not gpu and (atomic or bulk or backward_matches_reference_fp32 or backward_16bit or split_buckets or exact_zeros or triton_matches_reference)"
      step train bench-train.log timeout 240 python3 -m msattn.bench.cli bench train --out "$OUT" \
          --lengths 32k,128k,512k --dense-kernels cudnn --time-budget 1
    fi
    ;;
  all)
    run_tests
    step prefill bench-prefill.log python3 -m msattn.bench.cli bench prefill --out "$OUT" "$@"
    step decode bench-decode.log python3 -m msattn.bench.cli bench decode --out "$OUT" "$@"
    ;;
  *)
    echo "unknown mode $mode (test, pytest, memcheck, bench, tune, ncu, decode-report, prefill-report, chunked-report, kv-report, train-report, all)" >&2
    exit 2
    ;;
esac
for log in "$OUT"/*.log; do  # the end of each log, then the summary
  echo "==> $(basename "$log") (last 25 lines)"
  tail -n 25 "$log"
done
echo "==> summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
