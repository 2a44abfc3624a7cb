"""Per-step and per-CTA cost of a runtime block layout as its density grows, on both forward paths.

    PYTHONPATH=. python3 bench/bench_sparse_density.py

bf16, head_dim 128, batch 4, seqlen 4096, 16 heads, 128x128 blocks (shared across heads): the dense
kernel, then random layouts of density 1/8 .. 1, a structured one (the first 8 blocks of every row),
for the wgmma and the mma.sync kernel. The last column is the time per CTA step and wave: its fall with
density shows the fixed cost of a CTA (prologue, pipeline fill, epilogue) being amortised.
"""
import numpy as np
import attngen
from attngen.tools.benchmark import make_inputs, time_ms
from attngen.masks import BlockMask
b, s, h, d = 4, 4096, 16, 128
inputs = make_inputs(b, s, h, h, d, "bf16")
nb = s // 128
rng = np.random.default_rng(0)
dense = attngen.build(attngen.Spec(head_dim=d, dtype="bf16"))
t = time_ms(lambda q, k, v: dense(q, k, v), inputs)
print(f"dense            tiles/cta {nb:5.1f}  {t*1e3:8.1f} us  {4*b*h*s*s*d/t/1e9:6.1f} TFLOP/s")
for path in ("wgmma", "mma_sync"):
    kern = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", mask={"kind": "runtime", "block_size": 128}), path=path)
    for name, layout in [("random 0.125", rng.random((1, nb, nb)) < 0.125), ("random 0.25", rng.random((1, nb, nb)) < 0.25),
                         ("first 8", np.arange(nb)[None, None, :] < 8 + 0 * np.arange(nb)[None, :, None]),
                         ("random 0.5", rng.random((1, nb, nb)) < 0.5), ("all", np.ones((1, nb, nb), bool))]:
        layout = np.broadcast_to(layout, (1, nb, nb)).copy()
        mask = BlockMask.from_dense(layout, s, s, block_size=(128, 128))
        t = time_ms(lambda q, k, v: kern(q, k, v, block_mask=mask), inputs)
        kept = layout.sum() / nb
        print(f"{path:8s} {name:14s} tiles/cta {kept:5.1f}  {t*1e3:8.1f} us  {4*b*h*s*128*kept*d/t/1e9:6.1f} TFLOP/s  us/cta-wave-step {t*1e3/(b*h*nb/132)/kept:6.3f}")
