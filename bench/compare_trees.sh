#!/usr/bin/env bash
# `attngen bench --suite flash` of two source trees in one device call, interleaved (before, after, before,
# after) so that clock and thermal drift fall on both: BEFORE is a folder holding another commit's attngen/
# and templates/ (e.g. `git archive <commit> attngen templates | tar -x -C before_tree`, carried to the
# device), the other tree is this one. The suite's kernels are compiled first, both trees in parallel, so
# that nothing compiles while the GPU is timed. Prints each tree's TFLOP/s per row and after / before.
# Env: BEFORE (default before_tree), SEQLENS (default 1024,4096,16384), PEERS (default sdpa_cudnn), ROUNDS
# (default 2), OUT (the
# rows and logs go to OUT/compare/), WARM=only|skip (compile without timing, e.g. beside a sanitizer run / time
# only, after such a run), EXTRA (more `attngen bench` options, e.g. "--no-backward" to time the forward only;
# the fp8 column comes with it on Hopper).
set -o pipefail
export PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-/tmp/attngen-cache}
BEFORE=${BEFORE:-before_tree}; SEQLENS=${SEQLENS:-1024,4096,16384}; PEERS=${PEERS:-sdpa_cudnn}; OUT=${OUT:-/tmp/out}
OUT=$OUT/compare; mkdir -p "$OUT"
warm() {
  for d in 64 128; do for causal in False True; do
    PYTHONPATH=$1 python3 -c "import attngen; s = attngen.Spec(head_dim=$d, dtype='bf16', causal=$causal, backward=True); attngen.build(s); attngen.build_backward(s)" &
  done; done; wait
}
[ "${WARM:-}" = skip ] || { warm "$BEFORE" & warm . & wait; }
[ "${WARM:-}" = only ] && exit 0
for round in $(seq 1 "${ROUNDS:-2}"); do
  for tree in before after; do
    root=$([ $tree = before ] && echo "$BEFORE" || echo .)
    PYTHONPATH=$root python3 -m attngen bench --suite flash --dtype bf16 --seqlens "$SEQLENS" --peers "$PEERS" ${EXTRA:-} \
      --json "$OUT/${tree}_$round.json" > "$OUT/${tree}_$round.txt" 2>&1 || { echo "$tree round $round failed"; tail "$OUT/${tree}_$round.txt"; }
  done
done
python3 - "$OUT" "${ROUNDS:-2}" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def load(tree):
    rows = {}
    for r in range(1, int(sys.argv[2]) + 1):
        for row in json.load(open(f"{out}/{tree}_{r}.json")):
            key = (row.get("mode"), row.get("head_dim"), row.get("causal"), row.get("seqlen"))
            rows.setdefault(key, []).append(row)
    return rows
before, after = load("before"), load("after")
print(f"{'mode':8} {'d':>4} {'causal':>6} {'seqlen':>6} {'before':>8} {'after':>8} {'after/before':>12} {'cudnn':>8}")
ratios = []
for key in sorted(before, key=str):
    b = statistics.median(r["attngen"] for r in before[key])
    a = statistics.median(r["attngen"] for r in after[key])
    peer = statistics.median(r.get("sdpa_cudnn") or 0 for r in before[key] + after[key])
    ratios.append(a / b)
    print(f"{key[0]:8} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} {b:8.1f} {a:8.1f} {a / b:12.3f} {peer:8.1f}")
    if all(r.get("attngen_fp8") for r in before[key] + after[key]):       # the e4m3 column, on Hopper
        b8 = statistics.median(r["attngen_fp8"] for r in before[key])
        a8 = statistics.median(r["attngen_fp8"] for r in after[key])
        print(f"{'  fp8':8} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} {b8:8.1f} {a8:8.1f} {a8 / b8:12.3f}")
print(f"after/before: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
PY
