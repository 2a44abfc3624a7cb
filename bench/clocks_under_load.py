"""The SM clock, power and clock-event reasons while one kernel runs back to back: attngen's forward beside SDPA
cuDNN's (and flash's) on the same shape, each alone on the GPU for --seconds.

    PYTHONPATH=. python3 bench/clocks_under_load.py [--dims 64,128] [--seqlens 1024,16384] [--seconds 3] [--fp8]

Why: the same attngen kernels ran d128 dense 16384 at 584 TFLOP/s on one H200 and 665 on another while cuDNN
ran 612 and 609 (BENCHMARKS.md, issue 17 round 5). If attngen's instruction mix draws more power, the card's
power cap lowers its clock more than cuDNN's: that shows here as a lower median clock with the SW power cap
reason (0x4) set. nvidia-smi samples every 50 ms; the first half second of each run (clock ramp) is dropped.
--fp8 adds attngen's e4m3 forward on the same shapes (issue 17 item 4: whether FP8's rate is held by the cap).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

import attngen
from attngen.tools.benchmark import flash_shapes, flops, fp8_function, fp8_inputs, make_inputs, sdpa

FIELDS = "clocks.sm,power.draw,temperature.gpu"
REASONS = {0x1: "idle", 0x2: "app clocks", 0x4: "SW power cap", 0x8: "HW slowdown", 0x20: "sync boost",
           0x40: "SW thermal", 0x80: "HW thermal", 0x100: "HW power brake"}


def reasons_field() -> str:
    """The clock-event reasons' field under this driver's name for it."""
    probe = subprocess.run(["nvidia-smi", "--query-gpu=clocks_event_reasons.active", "--format=csv"],
                           capture_output=True)
    return "clocks_event_reasons.active" if probe.returncode == 0 else "clocks_throttle_reasons.active"


def under_load(fn, inputs, seconds: float, reasons: str) -> dict:
    """Runs fn over the input sets for `seconds` while nvidia-smi samples; the samples after the first 0.5 s."""
    sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS},{reasons}", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=subprocess.PIPE, text=True)
    start, calls = time.time(), 0
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    begin.record()
    while time.time() - start < seconds:
        for _ in range(10):
            fn(*inputs[calls % len(inputs)])
            calls += 1
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    sampler.terminate()
    lines = sampler.communicate()[0].splitlines()
    samples = []
    for line in lines[int(0.5 / 0.05):]:
        fields = [f.strip() for f in line.split(",")]
        try:
            samples.append((float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3], 16)))
        except (ValueError, IndexError):
            continue
    bits = 0
    for s in samples:
        bits |= s[3]
    return {"ms_per_call": begin.elapsed_time(end) / calls, "samples": len(samples),
            "clock": statistics.median(s[0] for s in samples) if samples else float("nan"),
            "power": statistics.median(s[1] for s in samples) if samples else float("nan"),
            "temperature": max((s[2] for s in samples), default=float("nan")),
            "reasons": ", ".join(name for bit, name in REASONS.items() if bits & bit) or "none"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,16384")
    ap.add_argument("--causal", default="false")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fp8", action="store_true", help="also attngen's fp8_e4m3 forward")
    args = ap.parse_args(argv)
    reasons = reasons_field()
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} {'kernel':>8} {'TFLOP/s':>8} {'SM MHz':>7} {'W':>5} {'C':>4}  reasons")
    for d, causal, seqlen, batch, heads in flash_shapes(args.dims, args.causal, args.seqlens):
        inputs = make_inputs(batch, seqlen, heads, heads, d, "bf16")
        spec = attngen.Spec(head_dim=d, dtype="bf16", causal=causal)
        kernel = attngen.build(spec)
        runs = [("attngen", lambda q, k, v: kernel(q, k, v), inputs),
                ("cudnn", sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION, causal), inputs),
                ("flash", sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION, causal), inputs)]
        if args.fp8:
            runs.append(("e4m3", fp8_function(spec), fp8_inputs(inputs)))
        for name, fn, sets in runs:
            fn(*sets[0])                                         # compile / pick the kernel first
            torch.cuda.synchronize()
            r = under_load(fn, sets, args.seconds, reasons)
            tflops = flops(batch, heads, seqlen, d, causal) / r["ms_per_call"] / 1e9
            print(f"{d:>4} {str(causal):>6} {seqlen:>6} {name:>8} {tflops:8.1f} {r['clock']:7.0f} "
                  f"{r['power']:5.0f} {r['temperature']:4.0f}  {r['reasons']} ({r['samples']} samples)")
            time.sleep(1.0)                                      # let the card settle between kernels


if __name__ == "__main__":
    main()
