"""attngen as torch's SDPA flash backend (attngen.integrations.sdpa). Without a GPU: registering it where torch
has the hook, a clear error where it has not. On a GPU (marked): F.scaled_dot_product_attention under the flash
backend, with attngen activated, equals attngen.attention called directly, forward and backward, bit for bit
(the backward under torch's deterministic switch, which selects attngen's deterministic dQ pass)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from attngen.integrations import sdpa  # noqa: E402


def test_register_or_say_why():
    if not sdpa.available():
        with pytest.raises(RuntimeError, match="register_flash_attention_impl"):
            sdpa.register()
        return
    sdpa.register()
    assert sdpa.NAME in torch.nn.attention.list_flash_attention_impls()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not sdpa.available(), reason="needs a GPU and torch's hook")
@pytest.mark.parametrize("causal,heads_kv,seqlen_k", [(True, 8, 300), (False, 2, 310), (True, 2, 300)])
def test_sdpa_flash_runs_attngen(causal, heads_kv, seqlen_k):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attngen

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 300, 128, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, heads_kv, seqlen_k, 128, generator=gen, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 8, 300, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    # SDPA's causal is top-left: query i sees keys 0..i, position offsets (0, 0)
    direct = attngen.attention(*(x.transpose(1, 2) for x in leaves), causal=causal, deterministic=True,
                               position_offsets=(0, 0) if causal else None)
    direct.transpose(1, 2).backward(dout)
    sdpa.register()
    torch.nn.attention.activate_flash_attention_impl(sdpa.NAME)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads_kv != 8)
        out.backward(dout)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.nn.attention.restore_flash_attention_impl()
    direct = direct.transpose(1, 2)
    assert torch.equal(out, direct)
    for mine, theirs in zip((q, k, v), leaves):
        assert torch.equal(mine.grad, theirs.grad)
    with sdpa_kernel(SDPBackend.MATH):      # torch's own meaning of the call, in float32
        math_out = F.scaled_dot_product_attention(*(x.detach().float() for x in (q, k, v)), is_causal=causal,
                                                  enable_gqa=heads_kv != 8)
    torch.testing.assert_close(out.float(), math_out, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not sdpa.available(), reason="needs a GPU and torch's hook")
def test_top_left_causal_when_called_with_seqlen_q_not_seqlen_k():
    """torch's selection keeps is_causal with seqlen_q != seqlen_k off the flash backend; called directly, the
    hook's entries keep SDPA's top-left meaning (position offsets (0, 0)), forward and backward."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attngen

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for n in (200, 330, 330))
    dout = torch.randn(1, 4, 200, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    out, lse, *_ = sdpa._forward(q, k, v, 0.0, True)
    direct, direct_lse = attngen.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True,
                                           position_offsets=(0, 0), return_lse=True)
    assert torch.equal(out, direct.transpose(1, 2)) and torch.equal(lse, direct_lse)
    with sdpa_kernel(SDPBackend.MATH):
        math_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), math_out, atol=2e-2, rtol=2e-2)
    grads = sdpa._backward(dout, q, k, v, out, lse, None, None, 200, 330, 0.0, True, None, None)
    expected = attngen.attention_backward(*(x.transpose(1, 2) for x in (q, k, v, out)), lse, dout.transpose(1, 2),
                                          causal=True, position_offsets=(0, 0))
    for mine, theirs in zip(grads, expected):
        torch.testing.assert_close(mine, theirs.transpose(1, 2), atol=2e-2, rtol=2e-2)
