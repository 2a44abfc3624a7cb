"""attngen as torch's SDPA flash backend: F.scaled_dot_product_attention runs attngen's kernels.

    import attngen.integrations.sdpa as attngen_sdpa
    attngen_sdpa.register()                                      # once: makes "attngen" a flash implementation
    torch.nn.attention.activate_flash_attention_impl("attngen")  # the user's opt-in (FlashAttention-4's hook)
    torch.nn.attention.restore_flash_attention_impl()            # back to torch's own

Activated, the flash backend's two dispatcher entries on CUDA, aten::_scaled_dot_product_flash_attention and
its backward, run attngen.attention's forward and backward kernels (scale, GQA, causal). SDPA aligns its causal
mask top-left and attngen bottom-right; torch's backend selection keeps is_causal with seqlen_q != seqlen_k away
from the flash backend (so from attngen), and should a call arrive, the kernels take SDPA's alignment as a
position shift (query i sees keys 0..i, attention's position_offsets=(0, 0)). SDPA lays q, k, v out as [batch, heads, seqlen, head_dim]; attngen
takes the transposed views (no copy) and returns its output in the layout SDPA's flash returns (a [batch,
seqlen, heads, head_dim] buffer seen as [batch, heads, seqlen, head_dim]). Under torch.use_deterministic_algorithms(True) the backward
computes dQ in its own pass (attngen's deterministic=True), bit-identical run to run; otherwise dQ is summed
with fp32 atomics, as torch's own flash backward does. Dropout is refused by name. Where the installed torch has no
register_flash_attention_impl (torch.nn.attention), register() says so and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

NAME = "attngen"


def available() -> bool:
    """Whether this torch offers the flash-implementation hook (register_flash_attention_impl)."""
    import torch.nn.attention as attention

    return hasattr(attention, "register_flash_attention_impl") and hasattr(attention, "activate_flash_attention_impl")


def register(name: str = NAME) -> None:
    """Make attngen a flash implementation under `name` (activate it with activate_flash_attention_impl)."""
    import torch

    if not available():
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.register_flash_attention_impl "
                           "(the hook FlashAttention-4 uses): SDPA cannot be routed to attngen here; call "
                           "attngen.attention, or torch.compile a model that calls it")
    torch.nn.attention.register_flash_attention_impl(name, register_fn=_install)


@dataclass
class _Handle:
    """Keeps the dispatcher registrations alive while the implementation is active."""

    library: object

    def remove(self) -> None:
        self.library = None


def _install() -> _Handle:
    import torch

    library = torch.library.Library("aten", "IMPL", "CUDA")
    library.impl("_scaled_dot_product_flash_attention", _forward, "CUDA")
    library.impl("_scaled_dot_product_flash_attention_backward", _backward, "CUDA")
    return _Handle(library)


def _spec(query, key, value, is_causal: bool, dropout_p: float):
    from ..calls import spec_for_inputs

    if dropout_p:
        raise RuntimeError(f"dropout_p: attngen has no attention dropout (got {dropout_p}); restore torch's flash "
                           "implementation (restore_flash_attention_impl) for training with dropout")
    import torch

    return spec_for_inputs(*(x.transpose(1, 2) for x in (query, key, value)), bool(is_causal),
                           deterministic=torch.are_deterministic_algorithms_enabled())


def _top_left(query, key, is_causal: bool) -> int:
    """The position shift that turns attngen's bottom-right causal into SDPA's top-left one."""
    return query.shape[2] - key.shape[2] if is_causal else 0


def _forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    import torch

    from ..build import build

    spec = _spec(query, key, value, is_causal, dropout_p)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = build(spec, query.device.index)(q, k, v, scale=scale, position_shift=_top_left(query, key, is_causal))
    empty = torch.empty(0, device=query.device)
    rng = torch.zeros(2, dtype=torch.uint64, device=query.device)
    return (out.transpose(1, 2), lse, empty, empty, query.shape[2], key.shape[2], rng,
            torch.zeros((), dtype=torch.uint64, device=query.device), torch.empty(0, dtype=query.dtype, device=query.device))


def _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
              philox_seed, philox_offset, *, scale=None):
    from ..build import build_backward

    spec = _spec(query, key, value, is_causal, dropout_p)
    q, k, v, o, dout = (x.transpose(1, 2) for x in (query, key, value, out, grad_out))
    if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]) or dout.data_ptr() % 16:
        dout = dout.contiguous()
    dq, dk, dv = build_backward(spec, query.device.index)(q, k, v, o, logsumexp, dout, scale=scale,
                                                          position_shift=_top_left(query, key, is_causal))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
