#!/usr/bin/env bash
# One device call: GPU facts, the GPU tests, `attngen check` on every example, then the benchmarks.
# Logs under $OUT. Usage: bash bench/gpu_session.sh [pytest args...]
# Env: SKIP_TESTS=1, TEST_TIMEOUT, BENCH_TIMEOUT, BENCH_ARGS (bench_forward), SPARSE_ARGS (bench_sparse),
#      SKIP_FORWARD=1 / SKIP_SPARSE=1 to leave a benchmark out.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-/tmp/attngen-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion(), 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/test_gpu_forward.py tests/test_gpu_sparse.py tests/test_gpu_mods.py \
    -q -rf "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
for spec in examples/*.yaml; do
  timeout 120 python3 -m attngen check "$spec" 2>&1 | tee -a "$OUT/check.log" | tail -2
done
if [ "${SKIP_FORWARD:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_forward.py ${BENCH_ARGS:-} --json "$OUT/bench.json" 2> "$OUT/bench.log"
  tail -5 "$OUT/bench.log"
fi
if [ "${SKIP_SPARSE:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_sparse.py ${SPARSE_ARGS:-} --json "$OUT/sparse.json" 2> "$OUT/sparse.log"
  tail -5 "$OUT/sparse.log"
fi
