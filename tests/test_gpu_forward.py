"""GPU acceptance tests of the forward kernel (ARCHITECTURE.md criterion against the float64 reference).

Marked `gpu`: skipped where no GPU is present (CI), run on the lent H100/H200."""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen.tools.reference import acceptance_check, attention_reference, attention_same_dtype_reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (seqlen_q, seqlen_k): tails, unequal lengths both ways (causal rows that see no key), long rows.
SEQLENS = ((1, 1), (17, 17), (113, 203), (203, 113), (1, 512), (512, 512), (1000, 1000))
LONG_SEQLENS = ((2048, 2048), (1000, 2048))


def random_inputs(seed, batch, sq, sk, hq, hkv, d, dv, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, sq, hq, d, generator=gen, device="cuda", dtype=TORCH_DTYPES[dtype])
    k = torch.randn(batch, sk, hkv, d, generator=gen, device="cuda", dtype=TORCH_DTYPES[dtype])
    v = torch.randn(batch, sk, hkv, dv, generator=gen, device="cuda", dtype=TORCH_DTYPES[dtype])
    return q, k, v


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def check(q, k, v, out, lse, causal, dtype, scale=None):
    """ARCHITECTURE.md's criterion on out, and lse against the float64 LSE (-inf exactly where no key is seen)."""
    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, scale=scale)
    same, _ = attention_same_dtype_reference(q64, k64, v64, causal=causal, scale=scale, dtype=dtype)
    got = to64(out)
    ok, err, bound = acceptance_check(got, same, ref)
    assert ok, f"max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    got_lse = to64(lse)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse)), "LSE -inf pattern differs"
    finite = np.isfinite(ref_lse)
    assert np.all(np.isfinite(got_lse[finite]))
    if finite.any():
        assert np.max(np.abs(got_lse[finite] - ref_lse[finite])) < 2e-3


def run_case(seed, batch, sq, sk, hq, hkv, d, dv, dtype, causal):
    q, k, v = random_inputs(seed, batch, sq, sk, hq, hkv, d, dv, dtype)
    kernel = attngen.build(attngen.Spec(head_dim=d, head_dim_v=dv, dtype=dtype, causal=causal))
    out = poisoned((batch, sq, hq, dv), q.dtype)
    lse = poisoned((batch, hq, sq), torch.float32)
    kernel(q, k, v, out=out, lse=lse)
    torch.cuda.synchronize()
    check(q, k, v, out, lse, causal, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_and_tails(d, dtype, causal):
    seqlens = SEQLENS + (LONG_SEQLENS if d in (64, 128) else ())
    for i, (sq, sk) in enumerate(seqlens):
        run_case(1000 * d + i, 2, sq, sk, 2, 2, d, d, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", [(8, 1), (16, 2)], ids=["mqa", "gqa8"])
def test_gqa_mqa(hq, hkv, causal):
    for i, (sq, sk) in enumerate(((113, 203), (256, 256), (300, 77))):
        run_case(7 + i, 2, sq, sk, hq, hkv, 128, 128, "bf16", causal)


@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (40, 40), (8, 8), (24, 56)])
def test_uncommon_head_dims(d, dv):
    for causal in (False, True):
        run_case(d * dv, 1, 203, 113, 4, 2, d, dv, "bf16", causal)


def test_fully_masked_rows_give_zero_and_neg_inf():
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    q, k, v = random_inputs(3, 1, 300, 40, 2, 2, 64, 64, "fp16")
    out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    torch.cuda.synchronize()
    assert torch.all(out[:, :260] == 0) and torch.all(torch.isneginf(lse[:, :, :260]))
    assert not torch.isnan(out).any()
    check(q, k, v, out, lse, True, "fp16")


@pytest.mark.parametrize("d", [64, 128, 256])
def test_query_tiles_with_no_key_tile_repeatedly(d):
    # Whole query tiles that see no key skip the main loop; run many times so a missing barrier shows.
    kernel = attngen.build(attngen.Spec(head_dim=d, dtype="fp16", causal=True))
    q, k, v = random_inputs(d, 2, 700, 45, 4, 4, d, d, "fp16")
    for _ in range(25):
        out = poisoned((2, 700, 4, d), torch.float16)
        lse = poisoned((2, 4, 700), torch.float32)
        kernel(q, k, v, out=out, lse=lse)
        torch.cuda.synchronize()
        assert torch.all(out[:, :655] == 0) and torch.all(torch.isneginf(lse[:, :, :655]))
    check(q, k, v, out, lse, True, "fp16")


def test_transposed_inputs_without_copy():
    base = [torch.randn(2, 4, 333, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)           # [b, s, h, d] views of [b, h, s, d] storage
    assert not q.is_contiguous()
    out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    torch.cuda.synchronize()
    check(q, k, v, out, lse, True, "bf16")


def test_explicit_scale_and_default_scale():
    q, k, v = random_inputs(5, 1, 129, 257, 2, 1, 96, 96, "bf16")
    out, lse = attngen.attention(q, k, v, scale=0.3, return_lse=True)
    torch.cuda.synchronize()
    check(q, k, v, out, lse, False, "bf16", scale=0.3)


def test_cupy_inputs_give_cupy_outputs():
    cupy = pytest.importorskip("cupy")
    rng = cupy.random.default_rng(11)
    full = rng.standard_normal((2, 3, 177, 64), dtype=cupy.float32).astype(cupy.float16)
    q = full.transpose(0, 2, 1, 3)                         # strided view, no copy
    k = rng.standard_normal((2, 150, 3, 64), dtype=cupy.float32).astype(cupy.float16)
    v = rng.standard_normal((2, 150, 3, 64), dtype=cupy.float32).astype(cupy.float16)
    out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float16 and lse.dtype == cupy.float32
    as_torch = [torch.from_dlpack(x) for x in (q, k, v, out, lse)]
    check(*as_torch, True, "fp16")


def test_runs_on_the_callers_stream():
    q, k, v = random_inputs(9, 4, 1024, 1024, 8, 8, 128, 128, "bf16")
    kernel = attngen.build(attngen.Spec(head_dim=128, dtype="bf16"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out, lse = kernel(q, k, v)
    stream.synchronize()
    check(q, k, v, out, lse, False, "bf16")


def test_bad_arguments_raise_before_launch():
    q, k, v = random_inputs(2, 1, 64, 64, 4, 2, 64, 64, "bf16")
    kernel = attngen.build(attngen.Spec(head_dim=64, dtype="bf16"))
    out = poisoned((1, 64, 4, 64), torch.bfloat16)
    cases = [
        ((q.float(), k, v), TypeError, "q: expected dtype bf16"),
        ((q, k[..., :32].contiguous(), v), ValueError, "k: expected shape"),
        ((q[..., :32].contiguous(), k[..., :32].contiguous(), v), ValueError, "q: head_dim 32 differs"),
        ((q, torch.randn_like(k[:, :, :1]).expand(-1, -1, 3, -1), torch.randn_like(v[:, :, :1]).expand(-1, -1, 3, -1)),
         ValueError, "heads_q=4 must be a multiple of heads_kv=3"),
        ((q.cpu(), k, v), ValueError, "q: expected a CUDA tensor"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            kernel(*args, out=out)
    assert torch.isnan(out).all(), "a rejected call must launch nothing"
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        attngen.attention(*(torch.randn(1, 8, 2, 128, device="cuda", dtype=torch.float16)[..., ::2]
                            for _ in range(3)))
    with pytest.raises(ValueError, match="head_dim"):
        attngen.attention(*(torch.randn(1, 8, 2, 300, device="cuda", dtype=torch.float16) for _ in range(3)))


def test_resource_report_survives_the_cuda_compute_cache():
    # With a driver present NVRTC may serve a repeated program from the compute cache and skip ptxas;
    # the report (registers, spills) must still be there on the second compile.
    from attngen.codegen.compile import nvrtc_compile
    from attngen.codegen.render import kernel_name

    spec = attngen.Spec(head_dim=72, dtype="fp16", causal=True)
    source = attngen.render(spec, attngen.plan(spec, arch="sm_90"))
    reports = [nvrtc_compile(source, spec.name, "sm_90", kernel_name(spec)).resources for _ in range(2)]
    assert reports[0].registers == reports[1].registers > 0
    assert reports[0].stack_frame == reports[1].stack_frame == 0
