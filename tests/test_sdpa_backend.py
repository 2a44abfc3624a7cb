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
@pytest.mark.parametrize("causal,heads_kv", [(True, 8), (False, 2)])
def test_sdpa_flash_runs_attngen(causal, heads_kv):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attngen

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 300, 128, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, heads_kv, 300 if causal else 310, 128, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.randn(2, 8, 300, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    direct = attngen.attention(*(x.transpose(1, 2) for x in leaves), causal=causal, deterministic=True)
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
