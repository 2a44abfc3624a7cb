"""GPU tests of the FP8 (e4m3) forward on Hopper against the float64 reference.

Inputs are quantised as a user would: x8 = (x / descale) in e4m3 with descale = amax / 448 per tensor or per
(batch, KV head). The reference attends over the dequantised values (x8 * descale) in float64. The criterion is
FlashAttention's with the FP8 algorithm as the baseline, as FlashAttention-3 tests its FP8 path: max|out - ref64|
<= 2 * max|fp8_algorithm - ref64| + 1e-5, where fp8_algorithm (reference.attention_fp8_reference) rounds the
softmax weights through e4m3 as the kernel does and its output to bf16. Marked `gpu`; skipped without a Hopper."""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen.tools.benchmark import quantised_e4m3
from attngen.tools.reference import acceptance_check, attention_fp8_reference, attention_reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("FP8 attention runs on Hopper (sm_90)")


def per_query_head(descale, heads: int):
    """[batch, heads_kv] -> [batch, heads] (each head takes its KV head's factor)."""
    return descale.repeat_interleave(heads // descale.shape[1], dim=1)


def dequantised(x8, descale):
    x, d = x8.to(torch.float64), descale.to(torch.float64)
    scaled = x * (per_query_head(d, x.shape[2])[:, None, :, None] if d.dim() == 2 else d)
    return scaled.cpu().numpy()


def run(batch, sq, sk, hq, hkv, d, causal, per_head=False, magnitude=1.0, seed=0, strided=False, descaled=True,
        **mods):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, s, h, d, generator=gen, device="cuda") * magnitude
               for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    if descaled:
        (q8, qd), (k8, kd), (v8, vd) = (quantised_e4m3(x, hkv, per_head) for x in (q, k, v))
    else:            # N(0, 1) values fit e4m3 as they are: no factors given (1)
        (q8, k8, v8), qd = (x.to(torch.float8_e4m3fn) for x in (q, k, v)), torch.ones(1, device="cuda")
        kd = vd = qd
    if strided:      # k and v as views into wider buffers: their heads 2 apart, rows padded
        wide = [torch.zeros(batch, sk, 2 * hkv + 1, d, device="cuda").to(torch.float8_e4m3fn) for _ in range(2)]
        for buffer, x in zip(wide, (k8, v8)):
            buffer[:, :, 1::2][:, :, :hkv] = x
        k8, v8 = (buffer[:, :, 1::2][:, :, :hkv] for buffer in wide)
        assert not k8.is_contiguous()
    out = torch.full((batch, sq, hq, d), float("nan"), device="cuda", dtype=torch.bfloat16)      # poisoned
    lse = torch.full((batch, hq, sq), float("nan"), device="cuda")
    kernel = attngen.build(attngen.api.spec_for_inputs(q8, k8, v8, causal, softcap=mods.get("softcap"),
                                                       window=mods.get("window")))
    given = dict(q_descale=qd, k_descale=kd, v_descale=vd) if descaled else {}
    kernel(q8, k8, v8, out=out, lse=lse, **given)
    q64, k64, v64 = dequantised(q8, qd), dequantised(k8, kd), dequantised(v8, vd)
    keywords = reference_keywords(mods, causal, sq, sk)
    ref, ref_lse = attention_reference(q64, k64, v64, **keywords)
    alg, _ = attention_fp8_reference(q64, k64, v64, **keywords)
    ok, err, bound = acceptance_check(out.double().cpu().numpy(), alg, ref)
    assert ok, f"max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    got_lse = lse.double().cpu().numpy()
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse)), "LSE -inf pattern differs"
    lse_err = np.abs(got_lse[finite] - ref_lse[finite]) / np.maximum(1.0, np.abs(ref_lse[finite]))
    assert np.max(lse_err, initial=0.0) < 2e-3
    # the call users make: attention() allocates a bf16 out and gives the same values
    same = attngen.attention(q8, k8, v8, causal=causal, **given, **mods)
    assert same.dtype == torch.bfloat16 and torch.equal(same, out)


def reference_keywords(mods, causal, sq, sk):
    """The reference's keywords for attention()'s: a window (causal clips it right of the diagonal) becomes
    the sliding-window pattern's element mask, bottom-right aligned."""
    keywords = {k: v for k, v in mods.items() if k != "window"}
    if "window" not in mods:
        return dict(causal=causal, **keywords)
    from attngen.masks import SlidingWindow

    left, right = mods["window"]
    pattern = SlidingWindow(left, 0 if causal else right)
    mask = pattern.element(np.arange(1)[:, None, None], np.arange(sq)[None, :, None], np.arange(sk)[None, None, :], sq, sk)
    return dict(causal=False, mask=np.asarray(mask, dtype=bool), **keywords)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 203), (203, 113), (512, 512), (1000, 2048)])
def test_fp8_forward_matches_float64(d, causal, sq, sk):
    run(2, sq, sk, 4, 2, d, causal)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])
def test_fp8_gqa_with_factors_per_sequence_and_head(hq, hkv):
    run(2, 300, 700, hq, hkv, 128, True, per_head=True, seed=hq + hkv)
    run(2, 300, 700, hq, hkv, 256, False, per_head=True, seed=hq * hkv)


def test_fp8_without_factors_and_strided_kv():
    run(2, 203, 333, 4, 2, 128, True, descaled=False)
    run(2, 203, 333, 4, 2, 128, False, strided=True, seed=3)


def test_fp8_large_magnitudes():
    """Logits of tens (inputs x 6): the factors carry the inputs' range, the softmax its own. (Hopper's FP8
    wgmma accumulates with ~14 bits, DeepSeek-V3 reports: at logits of hundreds that, not e4m3's rounding of P,
    sets the error, and the exact-accumulation baseline no longer bounds it.)"""
    run(1, 256, 256, 4, 2, 128, False, magnitude=6.0)


def test_fp8_softcap_and_window():
    run(1, 300, 300, 4, 2, 128, True, softcap=30.0, seed=5)
    run(1, 300, 500, 4, 2, 128, True, window=(64, 0), seed=6)


def test_fp8_errors_name_the_argument():
    q = torch.zeros(1, 8, 2, 128, device="cuda").to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_descale"):
        attngen.attention(q, q, q, k_descale=torch.ones(3, device="cuda"))
    with pytest.raises(ValueError, match="q_descale"):
        attngen.attention(q.to(torch.bfloat16), q.to(torch.bfloat16), q.to(torch.bfloat16),
                          q_descale=torch.ones(1, device="cuda"))
    with pytest.raises(ValueError, match="head_dim"):
        small = torch.zeros(1, 8, 2, 64, device="cuda").to(torch.float8_e4m3fn)
        attngen.attention(small, small, small)


def test_attngen_check_on_the_fp8_example():
    """`attngen check` runs the FP8 example against the float64 reference with the FP8 algorithm as baseline."""
    from click.testing import CliRunner

    from attngen.tools.cli import main

    result = CliRunner().invoke(main, ["check", "examples/fp8_e4m3_d128_causal.yaml"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in result.output


@pytest.mark.parametrize("factors", ["per_tensor", "per_head", "none"])
def test_fp8_remembered_launch_swaps_every_pointer(factors):
    """Calls after the first with the same shapes take the remembered launch: each must get its own q, k, v,
    V^T, outputs and descale factors (or fresh ones for none), so every call matches its own reference, on
    values and factors that change from call to call. After each call the blocks it freed (V^T, the ones) are
    taken by poisoned tensors kept alive, so a pointer left unswapped would read poison. One remembered launch
    serves them all, and the V^T the transpose writes is the one the forward reads."""
    from attngen.runtime.fp8 import vt_shape

    kernel = attngen.build(attngen.Spec(head_dim=128, dtype="fp8_e4m3", causal=True))
    kernel._signatures.clear()
    poisoned = []
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(2, s, h, 128, generator=gen, device="cuda") * (1.0 + seed) for s, h in
                   ((113, 4), (203, 2), (203, 2)))
        if factors == "none":
            (q8, k8, v8), given = (x.to(torch.float8_e4m3fn) for x in (q, k, v)), {}
            descaled = [(x8, torch.ones(1, device="cuda")) for x8 in (q8, k8, v8)]
        else:
            descaled = [quantised_e4m3(x, 2, factors == "per_head") for x in (q, k, v)]
            (q8, qd), (k8, kd), (v8, vd) = descaled
            given = dict(q_descale=qd, k_descale=kd, v_descale=vd)
        out, lse = kernel(q8, k8, v8, **given)
        if seed:
            remembered = next(iter(kernel._signatures.values()))
            assert remembered.transposing.slots[1].value == remembered.forward.slots[2].value
        poisoned += [torch.full(vt_shape(kernel.spec, 2, 2, 203), 0x7E, dtype=torch.uint8, device="cuda")]
        poisoned += [torch.full((2, 2) if factors == "per_head" else (1,), 3.0, device="cuda") for _ in range(3)]
        q64, k64, v64 = (dequantised(x8, d) for x8, d in descaled)
        ref, ref_lse = attention_reference(q64, k64, v64, causal=True)
        alg, _ = attention_fp8_reference(q64, k64, v64, causal=True)
        ok, err, bound = acceptance_check(out.double().cpu().numpy(), alg, ref)
        assert ok, f"call {seed}: max|out - ref64| = {err:.3g} > bound {bound:.3g}"
        assert np.max(np.abs(lse.double().cpu().numpy() - ref_lse) / np.maximum(1.0, np.abs(ref_lse))) < 2e-3
    assert len(kernel._signatures) == 1


def test_fp8_remembered_launches_follow_the_given_factors():
    """Which factors are given is part of the remembered signature: the same q, k, v with all three, with
    q_descale only and with none are three launches, each correct (a missing factor is 1)."""
    kernel = attngen.build(attngen.Spec(head_dim=128, dtype="fp8_e4m3"))
    kernel._signatures.clear()
    gen = torch.Generator(device="cuda").manual_seed(7)
    # N(0, 1) values fit e4m3 as they are, so every set of factors below (any missing one is 1) keeps the logits
    # of order 1; factors from quantised_e4m3 without their scaled inputs would make them thousands.
    q8, k8, v8 = (torch.randn(1, 77, 2, 128, generator=gen, device="cuda").to(torch.float8_e4m3fn) for _ in range(3))
    qd, kd, vd = (torch.tensor([f], device="cuda") for f in (0.7, 1.3, 2.5))
    one = torch.ones(1, device="cuda")
    for given, used in ((dict(q_descale=qd, k_descale=kd, v_descale=vd), (qd, kd, vd)),
                        (dict(q_descale=qd), (qd, one, one)), ({}, (one, one, one))):
        for _ in range(2):                                   # the second call takes the remembered launch
            out, _ = kernel(q8, k8, v8, **given)
            q64, k64, v64 = (dequantised(x8, d) for x8, d in zip((q8, k8, v8), used))
            alg, ref = attention_fp8_reference(q64, k64, v64)[0], attention_reference(q64, k64, v64)[0]
            ok, err, bound = acceptance_check(out.double().cpu().numpy(), alg, ref)
            assert ok, f"{sorted(given)}: max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    assert len(kernel._signatures) == 3
