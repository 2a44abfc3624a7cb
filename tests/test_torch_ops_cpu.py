"""CPU tests of attngen's torch custom operators (attngen.autograd): their fake implementations give the shapes
and dtypes of the real ones, and torch.compile(fullgraph=True) traces attngen.attention, attention_varlen and
attention_with_kvcache into single op nodes (no graph break), forward and backward, on fake CUDA tensors (no
GPU needed). Skipped where torch is not installed; the real ops run in tests/test_gpu_torch_ops.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import attngen  # noqa: E402
from attngen.autograd import attention_backward_op, attention_op, attention_with_kvcache_op  # noqa: E402

FakeTensorMode = pytest.importorskip("torch._subclasses.fake_tensor").FakeTensorMode


def fake(*shape, dtype=torch.bfloat16, requires_grad=False):
    return torch.empty(*shape, dtype=dtype, device="cuda", requires_grad=requires_grad)


def test_fake_shapes_and_dtypes():
    with FakeTensorMode():
        q, k, v = fake(2, 100, 8, 64), fake(2, 120, 2, 64), fake(2, 120, 2, 128)
        out, lse = attention_op(q, k, v, None, None, True, None, [10, -1], 30.0, None, False, 0)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 100, 8, 128), torch.bfloat16, (2, 8, 100),
                                                                torch.float32)
        dq, dk, dv = attention_backward_op(out, q, k, v, out, lse, None, None, True, None, None, None, None, False, 0)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        packed = fake(300, 8, 64, dtype=torch.float16), fake(310, 2, 64, dtype=torch.float16)
        out, lse = attention_op(packed[0], packed[1], packed[1], cu, cu, False, 0.1, None, None, None, True, 0)
        assert (out.shape, out.dtype, lse.shape) == ((300, 8, 64), torch.float16, (8, 300))
        pages = fake(40, 16, 2, 64)
        out, lse = attention_with_kvcache_op(fake(3, 1, 8, 64), pages, pages, None, None,
                                             torch.empty(3, dtype=torch.int32, device="cuda"),
                                             torch.empty(3, 5, dtype=torch.int32, device="cuda"), True, None, None,
                                             None, None, 0)
        assert (out.shape, lse.shape) == ((3, 1, 8, 64), (3, 8, 1))


def test_fake_refuses_what_the_spec_refuses():
    with FakeTensorMode():
        q = fake(2, 10, 4, 64, dtype=torch.float32)
        with pytest.raises(TypeError, match="q: dtype"):
            attention_op(q, q, q, None, None, False, None, None, None, None, False, 0)


def compile_capturing(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def test_fullgraph_traces_each_entry_point_into_one_op():
    def model(q, k, v, cu, q1, pages, lengths, table, packed_q, packed_k):
        a = attngen.attention(q, k, v, causal=True, window=(16, 0), softcap=20.0)
        b = attngen.attention_varlen(packed_q, packed_k, packed_k, cu, cu, causal=True)
        c = attngen.attention_with_kvcache(q1, pages, pages, cache_seqlens=lengths, block_table=table, causal=True)
        return a.sum() + b.sum() + c.sum()
    compiled, graphs = compile_capturing(model)
    with FakeTensorMode():
        q, k = fake(1, 64, 8, 64), fake(1, 64, 2, 64)
        compiled(q, k, k, torch.empty(3, dtype=torch.int32, device="cuda"), fake(2, 1, 8, 64), fake(9, 16, 2, 64),
                 torch.empty(2, dtype=torch.int32, device="cuda"), torch.empty(2, 4, dtype=torch.int32, device="cuda"),
                 fake(64, 8, 64), fake(64, 2, 64))
    assert len(graphs) == 1
    code = graphs[0].code
    assert code.count("torch.ops.attngen.attention.default") == 2
    assert code.count("torch.ops.attngen.attention_with_kvcache.default") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autograd engine needs a CUDA device for CUDA "
                    "tensors, fake ones too (a CPU-only torch aborts)")
def test_backward_traces_into_the_backward_op():
    """AOT autograd puts attngen.attention_backward in the backward graph (registered autograd on the op)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    compiled = torch.compile(lambda q, k, v: attngen.attention(q, k, v, causal=True).float().sum(), fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    with FakeTensorMode():
        q = fake(2, 64, 4, 64, requires_grad=True)
        k, v = fake(2, 64, 2, 64, requires_grad=True), fake(2, 64, 2, 64, requires_grad=True)
        compiled(q, k, v).backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert any("attngen.attention_backward" in g.code for g in graphs)
    assert any("attngen.attention.default" in g.code for g in graphs)
