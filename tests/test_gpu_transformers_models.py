"""GPU tests of attn_implementation="attngen" across model families (attngen.integrations.transformers): Llama,
Mistral (a sliding window), Gemma 2 (softcap, alternating sliding and global layers, its own scaling) and Qwen 2
(GQA), tiny configs with random weights. Logits, a padded batch's logits (left padding, through varlen) and a
training step's gradients are checked against the same model's eager attention in float32, with the DESIGN
criterion: attngen's error at most twice that of eager attention in bf16, plus a small floor. Skipped where no
GPU or no transformers is present (CI)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=16),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=32, sliding_window=16, attn_logit_softcapping=20.0,
                                                final_logit_softcapping=30.0, query_pre_attn_scalar=24),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=False),
}


def model(family, implementation, dtype):
    config = FAMILIES[family]()
    config._attn_implementation = implementation
    torch.manual_seed(0)
    cls = transformers.AutoModelForCausalLM.from_config
    return cls(config).to("cuda", dtype)


def check(mine, ours_bf16_eager, reference, what):
    err = (mine.float() - reference).abs().max().item()
    bound = 2 * (ours_bf16_eager.float() - reference).abs().max().item() + 1e-3
    assert err <= bound, f"{what}: max|attngen - eager fp32| = {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module", autouse=True)
def registered():
    import attngen.integrations.transformers as attngen_hf

    attngen_hf.register()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_padded_batch(family):
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 256, (3, 40), generator=gen, device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :19] = 0, 0                               # left padding
    ours, eager, reference = (model(family, impl, dtype) for impl, dtype in
                              (("attngen", torch.bfloat16), ("eager", torch.bfloat16), ("eager", torch.float32)))
    with torch.no_grad():
        for attention_mask in (None, mask):
            got, base, ref = (m(input_ids=ids, attention_mask=attention_mask).logits for m in (ours, eager, reference))
            keep = slice(None) if attention_mask is None else mask.bool()
            check(got[keep], base[keep], ref[keep], f"{family} logits" + ("" if attention_mask is None else ", padded"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step(family):
    gen = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, 256, (2, 64), generator=gen, device="cuda")
    grads = {}
    for name, impl, dtype in (("ours", "attngen", torch.bfloat16), ("eager", "eager", torch.bfloat16),
                              ("reference", "eager", torch.float32)):
        m = model(family, impl, dtype)
        m(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    for n in grads["reference"]:
        check(grads["ours"][n], grads["eager"][n], grads["reference"][n], f"{family} grad {n}")
