"""GPU test of issue 15's client (attngen.integrations.paged_generate): greedy generation with a small
transformers Llama (random weights, GQA 4:2) whose attention runs through attngen over a paged KV cache of its
own (prefill, then one decode step per token, shuffled 16-token pages) gives exactly the tokens of
transformers' own generate with its default attention on the same weights and prompt. Skipped where no GPU or
no transformers is present (CI)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def small_llama(implementation):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      attention_dropout=0.0, initializer_range=0.1)
    # (weights 5x the default spread: decisive logits, so that fp16 rounding in the attention -- which two
    # implementations round differently -- cannot flip a near-tie argmax; at 0.02 one in ~30 tokens did)
    config._attn_implementation = implementation
    torch.manual_seed(0)                      # both models get the same weights
    return transformers.LlamaForCausalLM(config).to("cuda", torch.float16).eval()


@pytest.mark.parametrize("page_size", [16, 1])
def test_greedy_tokens_equal_transformers_generate(page_size):
    from attngen.integrations import paged_generate

    paged_generate.register()
    prompt = torch.randint(0, 512, (3, 21), generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
    reference = small_llama("sdpa").generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                             pad_token_id=0)
    ours = paged_generate.generate_greedy(small_llama(paged_generate.NAME), prompt, max_new_tokens=24,
                                          page_size=page_size)
    assert ours.shape == reference.shape
    differs = (ours != reference).any(dim=0).nonzero()
    assert differs.numel() == 0, f"first differing position {int(differs[0])}: {ours[:, int(differs[0])]} vs " \
                                 f"{reference[:, int(differs[0])]}"
