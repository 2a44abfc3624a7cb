"""Compile and call overhead: cold NVRTC compile, warm start from the disk cache, Python time per call of
attngen.attention on a cached kernel (torch and CuPy inputs; on Hopper also the FP8 forward), through the
custom op torch.compile uses and inside a compiled function (beside SDPA's, compiled too), and a CUDA-graph
capture of a call.

    PYTHONPATH=. python3 bench/bench_overhead.py [--json FILE]

Cold compile and warm start run in fresh processes (CUDA context and imports excluded from the timed
part), each against its own cache directory. The per-call time is host time over many calls on a tiny
shape, so the GPU never holds the host back (the launches queue).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import cupy
cupy.cuda.Device(0).use(); cupy.zeros(1)                      # CUDA context, outside the timed part
import attngen
spec = attngen.Spec(head_dim=128, dtype="bf16", causal=True)
start = time.perf_counter()
if "--profile" in sys.argv:
    import cProfile, pstats
    profiler = cProfile.Profile()
    kernel = profiler.runcall(attngen.build, spec)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumtime").print_stats(25)
else:
    kernel = attngen.build(spec)
print(json.dumps({"seconds": time.perf_counter() - start, "registers": kernel.resources.registers}))
"""


def build_in_fresh_process(cache_dir: str, profile: bool = False) -> float:
    env = dict(os.environ, ATTNGEN_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD] + (["--profile"] if profile else []), env=env,
                         capture_output=True, text=True, check=True)
    if profile:
        print(out.stderr, file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def per_call_us(fn, calls=2000) -> float:
    import torch

    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", action="store_true", help="also print where a call's host time goes (cProfile)")
    args = ap.parse_args(argv)
    import cupy
    import torch

    import attngen

    row = {"gpu": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as cache:
        row["cold_compile_s"] = build_in_fresh_process(cache)
        row["warm_start_ms"] = build_in_fresh_process(cache) * 1e3
        if args.profile:
            build_in_fresh_process(cache, profile=True)

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    attngen.attention(q, k, v, causal=True)                          # compile once
    row["call_torch_us"] = per_call_us(lambda: attngen.attention(q, k, v, causal=True))
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(per_call_us, lambda: attngen.attention(q, k, v, causal=True), 2000)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    qc, kc, vc = (cupy.asarray(x.float()).astype(cupy.float16) for x in (q, k, v))
    attngen.attention(qc, kc, vc)
    row["call_cupy_us"] = per_call_us(lambda: attngen.attention(qc, kc, vc))
    kernel = attngen.build(attngen.api.spec_for_inputs(q, k, v, True))
    row["call_kernel_object_us"] = per_call_us(lambda: kernel(q, k, v))
    if torch.cuda.get_device_capability() == (9, 0):    # the FP8 forward: V's transpose and the forward per call
        q8, k8, v8 = (torch.randn(1, 128, 2, 128, device="cuda", generator=gen).to(torch.float8_e4m3fn)
                      for _ in range(3))
        factors = dict(zip(("q_descale", "k_descale", "v_descale"), (torch.ones(1, device="cuda") for _ in range(3))))
        attngen.attention(q8, k8, v8, causal=True, **factors)
        row["call_fp8_us"] = per_call_us(lambda: attngen.attention(q8, k8, v8, causal=True, **factors))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),  # noqa: E731
                                                                     v.transpose(1, 2), is_causal=True)
    row["call_sdpa_us"] = per_call_us(sdpa)
    # the custom op torch.compile puts in a graph, called as the graph calls it (dispatcher, then the launch)
    from attngen.autograd import attention_op

    op = lambda: attention_op(q, k, v, None, None, True, None, None, None, None, False, 0)  # noqa: E731
    row["call_custom_op_us"] = per_call_us(op)
    compiled = torch.compile(lambda q, k, v: attngen.attention(q, k, v, causal=True), fullgraph=True)
    compiled(q, k, v)
    row["call_compiled_us"] = per_call_us(lambda: compiled(q, k, v))
    compiled_sdpa = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True), fullgraph=True)
    compiled_sdpa(q, k, v)
    row["call_compiled_sdpa_us"] = per_call_us(lambda: compiled_sdpa(q, k, v))

    # CUDA graphs: capture one call on a side stream, replay it on new inputs copied into the same buffers
    static = [x.clone() for x in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attngen.attention(*static, causal=True)                      # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = attngen.attention(*static, causal=True)
    fresh = [torch.randn_like(x) for x in static]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = attngen.attention(*fresh, causal=True)
    row["graph_replay_matches_eager"] = bool(torch.equal(graph_out, eager))
    row["graph_replay_us"] = per_call_us(graph.replay)

    print(json.dumps(row, indent=1), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    print(f"{'cold compile (s)':>18} {'warm start (ms)':>16} {'call torch (us)':>16} {'call cupy (us)':>15} "
          f"{'Kernel() (us)':>14} {'SDPA (us)':>10} {'op (us)':>8} {'compiled (us)':>13} {'compiled SDPA (us)':>18} "
          f"{'graph ok':>8}")
    print(f"{row['cold_compile_s']:>18.2f} {row['warm_start_ms']:>16.1f} {row['call_torch_us']:>16.1f} "
          f"{row['call_cupy_us']:>15.1f} {row['call_kernel_object_us']:>14.1f} {row['call_sdpa_us']:>10.1f} "
          f"{row['call_custom_op_us']:>8.1f} {row['call_compiled_us']:>13.1f} {row['call_compiled_sdpa_us']:>18.1f} "
          f"{str(row['graph_replay_matches_eager']):>8}")
    if "call_fp8_us" in row:
        print(f"FP8 call (torch, descale factors given): {row['call_fp8_us']:.1f} us")
    print(f"# {row['gpu']}, torch {torch.__version__}, cupy {cupy.__version__}, attngen {attngen.__version__}")


if __name__ == "__main__":
    main()
