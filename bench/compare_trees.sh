#!/usr/bin/env bash
# `attngen bench --suite flash` of several source trees in one device call, interleaved (A, B, C, A, B, C) so
# that clock and thermal drift fall on all of them. TREES lists folders holding attngen/ and templates/ (e.g.
# `git archive <commit> attngen templates | tar -x -C before_tree`, carried to the device); "." is this tree.
# The default, "$BEFORE .", is the two-tree A/B. The suite's kernels are compiled first, all trees in parallel,
# so that nothing compiles while the GPU is timed. Prints each tree's TFLOP/s per row and its ratio to the
# first tree.
# Env: TREES, BEFORE (default before_tree), SEQLENS (default 1024,4096,16384), PEERS (default sdpa_cudnn),
# ROUNDS (default 2), OUT (the rows and logs go to OUT/compare/), WARM=only|skip (compile without timing, e.g.
# beside a sanitizer run / time only, after such a run), EXTRA (more `attngen bench` options, e.g.
# "--no-backward" to time the forward only; the fp8 column comes with it on Hopper), CLOCKS=1 (sample the SM
# clock, power and clock-event reasons every 50 ms while each tree runs, and print their medians under load:
# whether a tree's kernels run slower clocks than another's).
set -o pipefail
export PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-/tmp/attngen-cache}
BEFORE=${BEFORE:-before_tree}; TREES=${TREES:-$BEFORE .}
SEQLENS=${SEQLENS:-1024,4096,16384}; PEERS=${PEERS:-sdpa_cudnn}; OUT=${OUT:-/tmp/out}
OUT=$OUT/compare; mkdir -p "$OUT"
label() { [ "$1" = . ] && echo this || basename "$1"; }
warm() {
  for d in 64 128; do for causal in False True; do
    PYTHONPATH=$1 python3 -c "import attngen; s = attngen.Spec(head_dim=$d, dtype='bf16', causal=$causal, backward=True); attngen.build(s); attngen.build_backward(s)" &
  done; done; wait
}
if [ "${WARM:-}" != skip ]; then
  for tree in $TREES; do warm "$tree" & done; wait
fi
[ "${WARM:-}" = only ] && exit 0
for round in $(seq 1 "${ROUNDS:-2}"); do
  for tree in $TREES; do
    name=$(label "$tree")
    if [ "${CLOCKS:-}" = 1 ]; then
      reasons=clocks_event_reasons.active
      nvidia-smi --query-gpu=$reasons --format=csv > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
      nvidia-smi --query-gpu=utilization.gpu,clocks.sm,power.draw,temperature.gpu,$reasons --format=csv,noheader,nounits \
        -lms 50 > "$OUT/${name}_$round.clocks" 2>/dev/null & sampler=$!
    fi
    PYTHONPATH=$tree python3 -m attngen bench --suite flash --dtype bf16 --seqlens "$SEQLENS" --peers "$PEERS" ${EXTRA:-} \
      --json "$OUT/${name}_$round.json" > "$OUT/${name}_$round.txt" 2>&1 || { echo "$name round $round failed"; tail "$OUT/${name}_$round.txt"; }
    [ "${CLOCKS:-}" = 1 ] && kill "$sampler" 2>/dev/null
  done
done
python3 - "$OUT" "${ROUNDS:-2}" $(for tree in $TREES; do label "$tree"; done) <<'PY'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(name):
    rows = {}
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{out}/{name}_{r}.json")):
            key = (row.get("mode"), row.get("head_dim"), row.get("causal"), row.get("seqlen"))
            rows.setdefault(key, []).append(row)
    return rows
trees = {name: load(name) for name in names}
first, others = names[0], names[1:]
def median(name, key, column):
    return statistics.median(r[column] for r in trees[name][key])
print(f"{'mode':8} {'d':>4} {'causal':>6} {'seqlen':>6} " + " ".join(f"{n[:10]:>10}" for n in names)
      + " " + " ".join(f"{(n + '/' + first)[:16]:>16}" for n in others) + f" {'cudnn':>8}")
ratios = {name: [] for name in others}
for key in sorted(trees[first], key=str):
    for column, mode in (("attngen", key[0]), ("attngen_fp8", "  fp8")):
        if not all(r.get(column) for name in names for r in trees[name][key]):
            continue                                   # the e4m3 column exists on Hopper only
        values = {name: median(name, key, column) for name in names}
        peer = statistics.median(r.get("sdpa_cudnn") or 0 for name in names for r in trees[name][key])
        line = f"{mode:8} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} " + " ".join(f"{values[n]:10.1f}" for n in names)
        for name in others:
            ratios[name].append(values[name] / values[first])
            line += f" {values[name] / values[first]:16.3f}"
        print(line + (f" {peer:8.1f}" if column == "attngen" else ""))
for name in others:
    r = ratios[name]
    print(f"{name}/{first}: median {statistics.median(r):.3f}, min {min(r):.3f}, max {max(r):.3f}")
import glob
for name in names:          # CLOCKS=1: the samples taken while the GPU was busy (utilization >= 90 %)
    busy = []
    for path in sorted(glob.glob(f"{out}/{name}_*.clocks")):
        for line in open(path):
            fields = [f.strip() for f in line.split(",")]
            try:
                if len(fields) == 5 and float(fields[0]) >= 90:
                    busy.append((float(fields[1]), float(fields[2]), float(fields[3]), int(fields[4], 16)))
            except ValueError:
                pass
    if busy:
        limited = sum(1 for b in busy if b[3] & ~0x1) / len(busy)      # any reason but "GPU idle"
        print(f"{name}: {len(busy)} busy samples, SM clock median {statistics.median(b[0] for b in busy):.0f} MHz "
              f"(min {min(b[0] for b in busy):.0f}), power median {statistics.median(b[1] for b in busy):.0f} W, "
              f"temperature max {max(b[2] for b in busy):.0f} C, clock-event reasons in {100 * limited:.0f} %")
PY
