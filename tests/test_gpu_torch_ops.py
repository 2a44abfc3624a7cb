"""GPU tests of attngen's torch custom operators (attngen.autograd): torch.library.opcheck on each op; a small
transformer calling attngen.attention (causal, window, softcap) compiled with fullgraph=True trains as the same
model run eagerly through attngen; a CUDA-graph replay gives the eager result bit for bit; a
torch.compile(mode="reduce-overhead") model and a compiled decode step over a paged KV cache match eager.
Skipped where no GPU is present (CI)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

import attngen  # noqa: E402
from attngen.autograd import attention_op, attention_with_kvcache_op  # noqa: E402


def randn(*shape, seed=0, dtype=torch.bfloat16, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype).requires_grad_(requires_grad)


def test_opcheck():
    q, k, v = (randn(2, 77, h, 64, seed=i, requires_grad=True) for i, h in enumerate((4, 2, 2)))
    torch.library.opcheck(attention_op, (q, k, v, None, None, True, None, [20, 0], 30.0, None, False, 0))
    torch.library.opcheck(attention_op, (q, k, v, None, None, True, None, None, None, None, False, -37))
    cu = torch.tensor([0, 30, 77, 154], dtype=torch.int32, device="cuda")
    packed = [x.detach().reshape(154, x.shape[2], 64).requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(attention_op, (*packed, cu, cu, False, 0.2, None, None, None, False, 0))
    pages = randn(12, 16, 2, 64, seed=5)
    table = torch.randperm(12, device="cuda").to(torch.int32).view(2, 6)
    lengths = torch.tensor([5, 40], dtype=torch.int32, device="cuda")
    torch.library.opcheck(attention_with_kvcache_op, (randn(2, 1, 4, 64, seed=6), pages, pages.clone(),
                                                      randn(2, 1, 2, 64, seed=7), randn(2, 1, 2, 64, seed=8), lengths,
                                                      table, True, None, None, None, None, 0))


class Block(torch.nn.Module):
    """Pre-norm attention + MLP, GQA 8:2, attngen attention with a causal window and softcap."""

    def __init__(self, dim=256, heads=8, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, s, self.heads + 2 * self.kv_heads, self.d)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        a = attngen.attention(q, k, v, causal=True, window=(48, 0), softcap=30.0)
        x = x + self.out(a.reshape(b, s, -1))
        return x + self.mlp(x)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(Block(), Block()).to("cuda", torch.bfloat16)


def train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        x = randn(2, 200, 256, seed=100 + step)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fullgraph_compiled_model_trains_as_eager():
    eager = make_model()
    compiled_model = make_model()
    compiled = torch.compile(compiled_model, fullgraph=True)
    eager_losses, compiled_losses = train(eager), train(compiled)
    for a, b in zip(eager_losses, compiled_losses):
        assert abs(a - b) <= 2e-2 * abs(a), (eager_losses, compiled_losses)
    for (name, p), (_, r) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        assert (p.float() - r.float()).abs().max().item() <= 2e-2 * (r.float().abs().max().item() + 1e-3), name


def test_cuda_graph_replay_is_bit_identical():
    q, k, v = (randn(2, 300, h, 128, seed=i) for i, h in enumerate((8, 2, 2)))
    for _ in range(2):                                     # built and remembered before the capture
        attngen.attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attngen.attention(q, k, v, causal=True)
    for seed in (10, 20):
        for i, x in enumerate((q, k, v)):
            x.copy_(randn(*x.shape, seed=seed + i))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, attngen.attention(q, k, v, causal=True))


def test_reduce_overhead_compile_matches_eager():
    # reduce-overhead replays the default mode's graph through CUDA graphs: bit for bit the same as it. Against
    # eager the model's layer norms and GELU are inductor's fused kernels, so only close.
    model = make_model(1).eval()
    replayed = torch.compile(make_model(1).eval(), mode="reduce-overhead")   # own modules: own dynamo caches
    compiled = torch.compile(make_model(1).eval())
    with torch.no_grad():
        for seed in (1, 2, 3):
            x = randn(2, 200, 256, seed=seed)
            out = replayed(x).clone()
            assert torch.equal(out, compiled(x)), seed
            torch.testing.assert_close(out, model(x), atol=3e-2, rtol=3e-2)


def test_compiled_decode_step_over_a_paged_cache():
    def step(q, k_pages, v_pages, k, v, lengths, table):
        return attngen.attention_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=lengths, block_table=table,
                                              causal=True)
    compiled = torch.compile(step, fullgraph=True)
    pages = randn(24, 16, 2, 128, seed=1)
    table = torch.randperm(24, device="cuda").to(torch.int32).view(3, 8)
    lengths = torch.tensor([0, 17, 100], dtype=torch.int32, device="cuda")
    q, k, v = randn(3, 1, 8, 128, seed=2), randn(3, 1, 2, 128, seed=3), randn(3, 1, 2, 128, seed=4)
    kp_eager, vp_eager, kp, vp = pages.clone(), pages.clone() * 2, pages.clone(), pages.clone() * 2
    eager = step(q, kp_eager, vp_eager, k, v, lengths, table)
    out = compiled(q, kp, vp, k, v, lengths, table)
    assert torch.equal(out, eager)
    assert torch.equal(kp, kp_eager) and torch.equal(vp, vp_eager)          # the append happened in place
