"""GPU tests of the head dims FlashAttention takes besides the multiples of 8 (any of 1..256, head_dim_v
likewise), forward and backward, against the float64 reference with ARCHITECTURE.md's criterion.

Such kernels load and store single elements up to the real head dim (shared memory stays padded to 16
columns, zero past the real ones), so they take rows at any 2-byte boundary. Inputs come contiguous, as
transposes of [b, h, s, d] tensors, or as slices of wider tensors whose other columns are NaN (a read past
the real head dim turns the result into NaN); outputs and gradients are poisoned with NaN (every element
must be written), and sliced ones are bordered by a sentinel that must survive (no write past the head dim).

Marked `gpu`: skipped where no GPU is present (CI)."""

from __future__ import annotations

import math

import pytest

import attngen
from attngen.tools.checking import framework_attention
from attngen.tools.reference import acceptance_check_gradient, attention_reference_backward
from test_gpu_backward import check_gradients, to64
from test_gpu_forward import check

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (head_dim, head_dim_v): odd, prime, one past a multiple of 16, just under 256, unequal, and one multiple
# of 8 beside an odd one (the whole kernel then moves elements)
HEAD_DIMS = [(1, 1), (7, 7), (33, 33), (59, 59), (111, 111), (255, 255), (59, 33), (33, 59), (64, 59)]
PADDED_HEAD_DIMS = [(32, 32), (96, 96), (96, 64), (160, 96), (224, 224)]   # wgmma: padded to 64-column chunks
SENTINEL = -3.0       # the border around sliced outputs: it must survive every call
BORDER = 3            # extra columns of a sliced tensor: one before the slice, two after


def layout_of(layout, d, dv):
    """Sliced rows need element accesses for every tensor of the call: a multiple of 8 among the head dims
    would give that tensor 16-byte rows in the backward's views, so those cases run transposed instead."""
    return "transposed" if layout == "sliced" and (d % 8 == 0 or dv % 8 == 0) else layout


def make(shape, dtype, layout, gen=None, border=float("nan")):
    """A [b, s, h, d] tensor: random (gen) or poisoned with NaN, laid out as `layout`. Returns (tensor,
    the storage a sliced tensor lives in, else None)."""
    b, s, h, d = shape
    torch_dtype = TORCH_DTYPES[dtype]
    wide = None
    if layout == "contiguous":
        x = torch.empty(b, s, h, d, device="cuda", dtype=torch_dtype)
    elif layout == "transposed":                           # strides (h*s*d, d, s*d, 1): no copy, odd for odd d
        x = torch.empty(b, h, s, d, device="cuda", dtype=torch_dtype).transpose(1, 2)
    else:                                                  # "sliced": 2 bytes past the storage's start
        wide = torch.full((b, s, h, d + BORDER), border, device="cuda", dtype=torch_dtype)
        x = wide[..., 1:d + 1]
    if gen is None:
        x.fill_(float("nan"))
    else:
        x.copy_(torch.randn(shape, generator=gen, device="cuda", dtype=torch_dtype))
    return x, wide


def assert_border_kept(wide, d, name):
    if wide is not None:
        border = torch.cat([wide[..., :1], wide[..., d + 1:]], dim=-1)
        assert torch.all(border == SENTINEL), f"{name}: written past its real head dim"


def case_inputs(seed, batch, sq, sk, hq, hkv, d, dv, dtype, layout):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [make(shape, dtype, layout, gen)[0]
            for shape in ((batch, sq, hq, d), (batch, sk, hkv, d), (batch, sk, hkv, dv))]


# ---- forward ----------------------------------------------------------------------------------------

FORWARD_CASES = [   # (seqlen_q, seqlen_k, heads_q, heads_kv, layout): tails, unequal lengths, GQA/MQA
    (17, 17, 2, 2, "contiguous"),
    (113, 203, 4, 2, "transposed"),
    (203, 113, 4, 1, "sliced"),                            # causal: the first 90 rows see no key
    (1, 1, 2, 2, "sliced"),
    (300, 77, 6, 2, "contiguous"),
]


def run_forward(d, dv, dtype, causal, path):
    """The forward into sentinel-bordered outputs of each case's layout, against float64."""
    kernel = attngen.build(attngen.Spec(head_dim=d, head_dim_v=dv, dtype=dtype, causal=causal))
    assert kernel.plan.path == path
    for i, (sq, sk, hq, hkv, layout) in enumerate(FORWARD_CASES):
        layout = layout_of(layout, d, dv)
        q, k, v = case_inputs(100 * d + dv + i, 2, sq, sk, hq, hkv, d, dv, dtype, layout)
        out, out_storage = make((2, sq, hq, dv), dtype, layout, border=SENTINEL)
        lse = torch.full((2, hq, sq), float("nan"), device="cuda", dtype=torch.float32)
        kernel(q, k, v, out=out, lse=lse)
        torch.cuda.synchronize()
        assert_border_kept(out_storage, dv, "out")
        check(q, k, v, out, lse, causal, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d,dv", HEAD_DIMS, ids=lambda x: str(x))
def test_forward(d, dv, dtype, causal):
    run_forward(d, dv, dtype, causal, "mma_sync")


def hopper_or_skip():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma path needs an sm_90 GPU (H100/H200)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,dv", PADDED_HEAD_DIMS, ids=lambda x: str(x))
def test_padded_head_dims_on_the_wgmma_path(d, dv, causal):
    """Head dims that are multiples of 32, padded with zeros to 64-column chunks on Hopper: forward and backward
    over the same layouts (transposed, sliced with a border that must survive), tails, GQA/MQA."""
    hopper_or_skip()
    dtype = "bf16" if causal else "fp16"
    run_forward(d, dv, dtype, causal, "wgmma")
    for i, (sq, sk, hq, hkv, layout) in enumerate(BACKWARD_CASES):
        run_backward(13 * d + dv + i, 2, sq, sk, hq, hkv, d, dv, dtype, causal, False, layout_of(layout, d, dv),
                     path="wgmma")


def test_forward_through_attention_with_unaligned_rows_repeatedly():
    """attngen.attention builds the spec from the shapes; a repeated call takes the remembered-launch path,
    which re-checks only the pointers (2-byte aligned here)."""
    for d in (59, 111):
        q, k, v = case_inputs(d, 2, 77, 130, 4, 2, d, d, "bf16", "sliced")
        for _ in range(3):
            out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
            torch.cuda.synchronize()
            check(q, k, v, out, lse, True, "bf16")


def test_forward_cupy_strided_odd_head_dim():
    cupy = pytest.importorskip("cupy")
    rng = cupy.random.default_rng(59)
    q = rng.standard_normal((2, 3, 97, 59), dtype=cupy.float32).astype(cupy.float16).transpose(0, 2, 1, 3)
    k = rng.standard_normal((2, 150, 3, 59), dtype=cupy.float32).astype(cupy.float16)
    v = rng.standard_normal((2, 150, 3, 33), dtype=cupy.float32).astype(cupy.float16)
    out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.shape == (2, 97, 3, 33)
    check(*(torch.from_dlpack(x) for x in (q, k, v, out, lse)), True, "fp16")


def test_default_scale_uses_the_real_head_dim():
    q, k, v = case_inputs(5, 1, 64, 64, 2, 2, 59, 59, "fp16", "contiguous")
    default = attngen.attention(q, k, v)
    explicit = attngen.attention(q, k, v, scale=1 / math.sqrt(59))
    torch.cuda.synchronize()
    assert torch.equal(default, explicit)


# ---- backward ---------------------------------------------------------------------------------------

BACKWARD_CASES = [   # (seqlen_q, seqlen_k, heads_q, heads_kv, layout)
    (113, 203, 6, 2, "transposed"),
    (17, 17, 2, 1, "sliced"),
    (203, 113, 4, 4, "contiguous"),                        # causal: rows that see no key get dQ = 0
]


def run_backward(seed, batch, sq, sk, hq, hkv, d, dv, dtype, causal, deterministic, layout, path="mma_sync"):
    """Forward, then the backward kernels into poisoned gradient buffers of the same layout; every gradient
    against float64 with the same-dtype framework's error as the bound."""
    from attngen.api import build_backward

    spec = attngen.Spec(head_dim=d, head_dim_v=dv, dtype=dtype, causal=causal, deterministic=deterministic)
    q, k, v = case_inputs(seed, batch, sq, sk, hq, hkv, d, dv, dtype, layout)
    dout = make((batch, sq, hq, dv), dtype, layout, torch.Generator(device="cuda").manual_seed(seed + 1))[0]
    out, out_storage = make((batch, sq, hq, dv), dtype, layout, border=SENTINEL)
    lse = torch.empty(batch, hq, sq, device="cuda", dtype=torch.float32)
    attngen.build(spec)(q, k, v, out=out, lse=lse)
    grads = {name: make(shape, dtype, layout, border=SENTINEL) for name, shape in
             (("dq", q.shape), ("dk", k.shape), ("dv", v.shape))}
    backward = build_backward(spec)
    assert backward.plan.dkdv.path == path or (d, dv) == (64, 64)
    result = backward(q, k, v, out, lse, dout, dq=grads["dq"][0], dk=grads["dk"][0], dv=grads["dv"][0])
    torch.cuda.synchronize()
    assert_border_kept(out_storage, dv, "out")
    scale = 1 / math.sqrt(d)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, causal, scale).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal, scale=scale)
    # at head dims below 8 the algorithm itself (delta from the rounded O) may err past 2x the framework
    algorithm = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal, scale=scale,
                                             algorithm_dtype=dtype, out=to64(out))
    for (name, (given, storage)), mine, theirs, r, a in zip(grads.items(), result, same, ref, algorithm):
        assert mine is given
        assert_border_kept(storage, given.shape[-1], name)
        ok, err, bound = acceptance_check_gradient(to64(mine), to64(theirs.grad), a, r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g} ({sq}x{sk}, {layout})"
    if causal and sq > sk:
        assert torch.all(result[0][:, :sq - sk] == 0), "rows that see no key have dQ = 0"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d,dv", HEAD_DIMS, ids=lambda x: str(x))
def test_backward_atomic_dq(d, dv, dtype, causal):
    """The dK/dV pass adding dQ with atomics, its delta kernel and the dQ conversion."""
    for i, (sq, sk, hq, hkv, layout) in enumerate(BACKWARD_CASES):
        run_backward(7 * d + dv + i, 2, sq, sk, hq, hkv, d, dv, dtype, causal, False, layout_of(layout, d, dv))


@pytest.mark.parametrize("d,dv", HEAD_DIMS, ids=lambda x: str(x))
def test_backward_deterministic(d, dv):
    """The separate dQ pass (no atomics) and the dK/dV pass without dQ."""
    dtype = "bf16" if d % 2 else "fp16"
    for i, (sq, sk, hq, hkv, layout) in enumerate(BACKWARD_CASES):
        run_backward(11 * d + dv + i, 2, sq, sk, hq, hkv, d, dv, dtype, True, True, layout_of(layout, d, dv))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d", [7, 59, 255])
def test_autograd_with_transposed_inputs(d, dtype):
    """attngen.attention + out.backward (autograd hands over its own dout) on transposes of [b, h, s, d]."""
    gen = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(2, h, s, d, generator=gen, device="cuda", dtype=TORCH_DTYPES[dtype]).transpose(1, 2)
               for h, s in ((4, 113), (2, 77), (2, 77)))
    assert not q.is_contiguous()
    for causal in (False, True):
        check_gradients(q, k, v, causal, seed=d)
