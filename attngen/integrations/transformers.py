"""attngen as a transformers attention implementation: `attn_implementation="attngen"`.

    import attngen.integrations.transformers as attngen_hf
    attngen_hf.register()                         # once; then any model that supports the interface:
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attngen")

transformers hands the attention function q, k, v as [batch, heads, seqlen, head_dim]; attngen takes them as
[batch, seqlen, heads, head_dim] views (no copy). Padding-free training (documents packed into one row, as
transformers' DataCollatorWithFlattening makes them) arrives as a batch of one whose position_ids restart at
each document, or with cu_seq_lens_q/k already computed: attngen then runs attention_varlen, so no token sees
another document. Causal attention is aligned bottom-right, the module's scaling, sliding window and softcap
are passed on; anything attngen does not compute the same way (dropout, a padding mask) is refused by name.
"""

from __future__ import annotations

from ..api import attention, attention_varlen

NAME = "attngen"


def register(name: str = NAME) -> None:
    """Register attngen under `name` in transformers' AttentionInterface, and FlashAttention's way of
    passing masks (None, or a 2-D padding mask) in its AttentionMaskInterface where transformers has one."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    except ImportError:            # older transformers build masks by attn_implementation alone
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


def cu_seqlens_from_position_ids(position_ids):
    """int32 [documents + 1]: where each document of a packed row [1, total] starts (its position 0), and the
    end. (One copy to the host, as transformers' own FlashAttention path makes.)"""
    import torch

    row = position_ids.reshape(-1)
    starts = torch.nonzero(row == 0).reshape(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=row.device), starts])
    return torch.cat([starts, torch.tensor([row.numel()], dtype=torch.int32, device=row.device)])


def _packed(position_ids, batch: int) -> bool:
    """A batch of one row whose positions restart (several documents), as transformers detects it."""
    import torch

    if position_ids is None or batch != 1:
        return False
    row = position_ids.reshape(-1)
    return bool(torch.any(row[1:] != row[:-1] + 1))


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention function: (out [batch, seqlen, heads, head_dim_v], None: no weights)."""
    if dropout:
        raise ValueError(f"dropout: attngen has no attention dropout (got {dropout}); set the model's "
                         "attention_dropout to 0.0")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    # transformers' window counts the query itself: sliding_window=W sees the W - 1 keys before it
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and _packed(kwargs.get("position_ids"), q.shape[0]):
        cu_q = cu_k = cu_seqlens_from_position_ids(kwargs["position_ids"])
    if cu_q is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q: packed documents come as a batch of one row, got batch {q.shape[0]}")
        cu_k = cu_q if cu_k is None else cu_k
        import torch

        out = attention_varlen(q[0], k[0], v[0], cu_q.to(torch.int32), cu_k.to(torch.int32), causal=causal,
                               scale=scaling, window=window, softcap=softcap)
        return out[None], None
    if attention_mask is not None and not bool(attention_mask.all()):
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: expected transformers' 2-D padding mask [batch, keys] (register() "
                             f"asks for it), got shape {list(attention_mask.shape)}")
        return _padded(q, k, v, attention_mask, causal=causal, scale=scaling, window=window, softcap=softcap), None
    return attention(q, k, v, causal=causal, scale=scaling, window=window, softcap=softcap), None


def unpadding(padding_mask, seqlen_q: int):
    """A padded batch as packed sequences: padding_mask [batch, keys] (true: a token) whose last seqlen_q
    columns are the queries' -> (query rows, key rows) of the [batch * seqlen, ...] views that hold tokens,
    and cu_seqlens_q, cu_seqlens_k (int32, each row's tokens one sequence, in order)."""
    import torch

    keys = padding_mask.bool()
    queries = keys[:, keys.shape[1] - seqlen_q:]
    rows_q, rows_k = (m.reshape(-1).nonzero().reshape(-1) for m in (queries, keys))
    cu_q, cu_k = (torch.nn.functional.pad(m.sum(dim=1).cumsum(0), (1, 0)).to(torch.int32) for m in (queries, keys))
    return rows_q, rows_k, cu_q, cu_k


def _padded(q, k, v, padding_mask, **keywords):
    """Attention of a padded batch through attention_varlen on its tokens; padding rows of the output are 0.
    (Each row's tokens are one sequence, so left and right padding alike; causal stays bottom-right.)"""
    batch, seqlen_q = q.shape[:2]
    rows_q, rows_k, cu_q, cu_k = unpadding(padding_mask, seqlen_q)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    packed = attention_varlen(flat[0].index_select(0, rows_q), flat[1].index_select(0, rows_k),
                              flat[2].index_select(0, rows_k), cu_q, cu_k, **keywords)
    out = packed.new_zeros(batch * seqlen_q, *packed.shape[1:])
    out.index_copy_(0, rows_q, packed)
    return out.view(batch, seqlen_q, *packed.shape[1:])
