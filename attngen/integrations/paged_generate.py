"""Greedy generation with a transformers causal LM over a paged KV cache that attngen owns (issue 15's client).

    from attngen.integrations.paged_generate import generate_greedy
    tokens = generate_greedy(model, input_ids, max_new_tokens=32, page_size=16)

The model runs without transformers' own cache (use_cache=False): each forward sees only the new tokens, with
their position_ids for the rotary embedding, and every attention layer calls attngen.attention_with_kvcache,
which appends the layer's new keys and values to its pages of the cache and attends over everything cached
(prefill: the whole prompt, causal; then one token per step). The page table is shuffled, as a serving
engine's allocator leaves it. Prompts of equal length only (a batch without padding).
"""

from __future__ import annotations

from ..api import attention_with_kvcache

NAME = "attngen_paged"


class PagedKVCache:
    """K and V pages for every layer, one shuffled block table shared by the layers, and the tokens cached per
    sequence (advanced once per model forward, after every layer has appended)."""

    def __init__(self, layers: int, batch: int, heads_kv: int, head_dim: int, max_tokens: int, dtype, device,
                 page_size: int = 16, seed: int = 0):
        import torch

        per_sequence = -(-max_tokens // page_size)
        pages = batch * per_sequence
        order = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))
        self.block_table = order.to(torch.int32).view(batch, per_sequence).to(device)
        shape = (pages, page_size, heads_kv, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.capacity = per_sequence * page_size

    def advance(self, tokens: int) -> None:
        self.seqlens += tokens


def attention_over_cache(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         sliding_window=None, softcap=None, attngen_cache: PagedKVCache | None = None, **kwargs):
    """transformers' attention function: the new tokens' keys and values into this layer's pages, then the
    queries over the layer's cache (out [batch, new, heads, head_dim], no weights)."""
    if attngen_cache is None:
        raise ValueError("attngen_cache: this attention implementation runs inside generate_greedy (it needs the "
                         "paged cache)")
    if dropout:
        raise ValueError(f"dropout: attngen has no attention dropout (got {dropout})")
    layer = module.layer_idx
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = attention_with_kvcache(q, attngen_cache.k[layer], attngen_cache.v[layer], k, v,
                                 cache_seqlens=attngen_cache.seqlens, block_table=attngen_cache.block_table,
                                 causal=True, scale=scaling, window=window, softcap=softcap)
    return out, None


def register(name: str = NAME) -> None:
    """attention_over_cache under `name` in transformers' AttentionInterface (masks: FlashAttention's way)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_over_cache)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    except ImportError:
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


def generate_greedy(model, input_ids, max_new_tokens: int, page_size: int = 16):
    """input_ids [batch, prompt] -> [batch, prompt + max_new_tokens]: the model's argmax token at every step,
    attention through attngen over a paged cache. The model must use attn_implementation=NAME (register())."""
    import torch

    config = model.config
    if config._attn_implementation != NAME:
        raise ValueError(f"model: expected attn_implementation={NAME!r} (attngen.integrations.paged_generate."
                         f"register(), then build the model with it), got {config._attn_implementation!r}")
    batch, prompt = input_ids.shape
    heads_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = PagedKVCache(config.num_hidden_layers, batch, heads_kv, head_dim, prompt + max_new_tokens,
                         next(model.parameters()).dtype, input_ids.device, page_size)
    tokens, new = input_ids, input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            start = tokens.shape[1] - new.shape[1]
            positions = torch.arange(start, tokens.shape[1], device=input_ids.device).expand(batch, -1)
            logits = model(input_ids=new, position_ids=positions, use_cache=False, attngen_cache=cache).logits
            cache.advance(new.shape[1])
            new = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, new], dim=1)
    return tokens
