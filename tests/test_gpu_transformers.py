"""GPU test of the transformers client (attngen.integrations.transformers): a small Llama trained on packed
documents (one row, position_ids restarting per document, as DataCollatorWithFlattening makes them) through
attn_implementation="attngen" gives the loss and gradients of transformers' eager attention run on each
document alone. Skipped where no GPU or no transformers is present (CI)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTHS = [37, 1, 120, 64, 9]


def small_llama(implementation):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      attention_dropout=0.0)
    config._attn_implementation = implementation
    torch.manual_seed(0)                      # both models get the same weights
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def test_padding_free_training_matches_eager_per_document():
    import attngen.integrations.transformers as attngen_hf

    attngen_hf.register()
    gen = torch.Generator(device="cuda").manual_seed(1)
    documents = [torch.randint(0, 512, (n,), generator=gen, device="cuda") for n in LENGTHS]
    packed = torch.cat(documents)[None]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in LENGTHS])[None]
    labels = packed.clone()
    starts = torch.cumsum(torch.tensor([0] + LENGTHS[:-1], device="cuda"), 0)
    labels[0, starts] = -100          # no token predicts the first of the next document

    ours = small_llama("attngen")
    logits = ours(input_ids=packed, position_ids=position_ids).logits.float()
    tokens = (labels[0, 1:] != -100).sum()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum") / tokens
    loss.backward()

    eager = small_llama("eager")
    total = 0.0
    for doc in documents:
        out = eager(input_ids=doc[None]).logits.float()
        total = total + torch.nn.functional.cross_entropy(out[0, :-1], doc[1:], reduction="sum")
    reference = total / tokens
    reference.backward()
    assert abs(loss.item() - reference.item()) < 2e-2 * abs(reference.item())
    for (name, a), (_, b) in zip(ours.named_parameters(), eager.named_parameters()):
        scale = b.grad.float().abs().max().item() + 1e-6
        assert (a.grad.float() - b.grad.float()).abs().max().item() <= 0.05 * scale, name
