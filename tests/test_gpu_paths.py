"""GPU tests of the two forward paths side by side on Hopper: the wgmma path (TMA, warpgroups,
setmaxnreg; sm_90a) and the mma.sync path, each forced by a tile override, against the float64
reference (ARCHITECTURE.md criterion). The other GPU tests run whichever path the planner picks (wgmma for
head dims that are multiples of 32 on an H100/H200), so both stay covered."""

from __future__ import annotations

import numpy as np
import pytest

import attngen

from test_gpu_forward import check, poisoned, random_inputs
from test_gpu_sparse import element_mask, inputs, run_and_check

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

WGMMA_TILES = ({"block_m": 128, "block_n": 128, "warps": 12, "stages": 2, "path": "wgmma"},
               {"block_m": 128, "block_n": 64, "warps": 12, "stages": 3, "path": "wgmma"})
MMA_SYNC_TILE = {"block_m": 64, "block_n": 64, "warps": 4, "stages": 2, "path": "mma_sync"}
SEQLENS = ((1, 1), (17, 17), (113, 203), (203, 113), (1, 512), (300, 1), (1000, 1000), (2048, 2048), (1000, 2048))


@pytest.fixture(autouse=True, scope="module")
def hopper_only():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma path needs an sm_90 GPU (H100/H200)")


def tile_for(path, d, index=0):
    if path == "mma_sync":
        return MMA_SYNC_TILE
    tile = WGMMA_TILES[index]
    return tile | {"block_n": 64, "stages": 2} if d == 256 else tile    # d256 fits 2 stages of 64-key tiles


def run_case(seed, batch, sq, sk, hq, hkv, d, dtype, causal, tile, transposed=False):
    q, k, v = random_inputs(seed, batch, sq, sk, hq, hkv, d, d, dtype)
    if transposed:     # [b, h, s, d] storage seen as [b, s, h, d]: strided rows, no copy
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    kernel = attngen.build(attngen.Spec(head_dim=d, dtype=dtype, causal=causal, tile=tile))
    assert kernel.plan.path == tile["path"]
    out = poisoned((batch, sq, hq, d), q.dtype)
    lse = poisoned((batch, hq, sq), torch.float32)
    kernel(q, k, v, out=out, lse=lse)
    torch.cuda.synchronize()
    check(q, k, v, out, lse, causal, dtype)


def test_planner_picks_wgmma_on_hopper():
    for d in (64, 128, 256):
        kernel = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", causal=True))
        assert kernel.plan.path == "wgmma" and kernel.binary.arch == "sm_90a"
        assert kernel.resources.spill_bytes in (0, None) and kernel.resources.stack_frame == 0
    assert attngen.build(attngen.Spec(head_dim=80, dtype="bf16")).plan.path == "mma_sync"   # not a multiple of 32


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_both_paths_head_dims_and_tails(d, dtype, causal, path):
    for i, (sq, sk) in enumerate(SEQLENS):
        run_case(7000 + 100 * d + i, 2, sq, sk, 2, 2, d, dtype, causal, tile_for(path, d, i % 2))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", [(8, 1), (16, 2)], ids=["mqa", "gqa8"])
def test_wgmma_gqa_and_strided_inputs(hq, hkv, causal):
    for i, tile in enumerate(WGMMA_TILES):
        run_case(8000 + i, 2, 333, 517, hq, hkv, 128, "bf16", causal, tile, transposed=i == 1)


def test_wgmma_batch_and_heads_do_not_bleed():
    """Rows of one (batch, head) past seqlen must read as zeros, never the next head's rows."""
    run_case(8100, 3, 77, 130, 5, 5, 64, "fp16", False, WGMMA_TILES[0])
    run_case(8101, 3, 130, 77, 4, 2, 128, "bf16", True, WGMMA_TILES[1])


def test_wgmma_repeated_calls_re_encode_the_tensor_maps():
    """The signature-cached launch swaps the tensor maps' addresses: new inputs give their own result."""
    spec = attngen.Spec(head_dim=128, dtype="bf16", causal=True)
    kernel = attngen.build(spec)
    assert kernel.plan.path == "wgmma"
    for seed in range(3):
        q, k, v = random_inputs(8200 + seed, 2, 256, 256, 4, 4, 128, 128, "bf16")
        out, lse = kernel(q, k, v)
        again = attngen.attention(q, k, v, causal=True)
        torch.cuda.synchronize()
        check(q, k, v, out, lse, True, "bf16")
        assert torch.equal(out, again)


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
def test_both_paths_sparse_and_modifiers(path):
    n = 700
    q, k, v = inputs(8300, 2, n, n, 4, 2, 128)
    window = {"kind": "sliding_window", "left": 200, "right": 0}
    spec = attngen.Spec(head_dim=128, dtype="bf16", mask=window, softcap=30.0, alibi=True, tile=tile_for(path, 128))
    kernel = attngen.build(spec)
    from attngen.tools.reference import alibi_slopes
    run_and_check(kernel, q, k, v, element_mask(spec.mask_pattern, 4, n, n), softcap=30.0,
                  alibi_slopes=alibi_slopes(4), lse_tol=5e-3)
    layout = np.random.default_rng(1).random((4, -(-n // 128), -(-n // 128))) < 0.4
    layout[:, :, 0] = True
    block_mask = attngen.BlockMask.from_dense(layout, n, n, block_size=(128, 128))
    runtime = attngen.build(attngen.Spec(head_dim=128, dtype="bf16", mask={"kind": "runtime", "block_size": 128},
                                         tile=tile_for(path, 128)))
    run_and_check(runtime, q, k, v, block_mask.element_mask(), block_mask=block_mask)


def test_build_path_keyword_and_expanded_kv():
    """build(path=...) forces a path; K/V expanded over heads (stride 0, which the copy engine may refuse)
    still give the right answer, through the mma.sync kernel if the tensor maps cannot be made."""
    spec = attngen.Spec(head_dim=128, dtype="bf16", causal=True)
    assert attngen.build(spec, path="mma_sync").plan.path == "mma_sync"
    assert attngen.build(spec, path="wgmma").plan.path == "wgmma"
    with pytest.raises(ValueError, match="path"):
        attngen.build(spec, path="tcgen05")
    for seed in (8400, 8401):     # again with a layout the kernel remembers as untileable (if TMA refused it)
        q, k, v = random_inputs(seed, 2, 300, 300, 4, 1, 128, 128, "bf16")
        k, v = k.expand(2, 300, 4, 128), v.expand(2, 300, 4, 128)
        assert k.stride(2) == 0
        out, lse = attngen.build(spec)(q, k, v)
        torch.cuda.synchronize()
        check(q, k.contiguous(), v.contiguous(), out, lse, True, "bf16")


# ---- the backward's two dK/dV paths (wgmma where it applies: head_dim = head_dim_v = 64 or 128) ----------

def check_backward_path(path, seed, batch, sq, sk, hq, hkv, d, dtype="bf16", causal=False, transposed=False,
                        block_mask=None, expand_kv=False):
    """build_backward(path=) gradients, written over NaN-poisoned buffers, against float64 with the ARCHITECTURE.md
    criterion (the same-dtype baseline is the framework's autograd of naive attention)."""
    from attngen.tools.checking import framework_attention
    from attngen.tools.reference import acceptance_check, attention_reference_backward
    from test_gpu_backward import to64

    q, k, v = random_inputs(seed, batch, sq, sk, hq, hkv, d, d, dtype)
    if transposed:     # [b, h, s, d] storage seen as [b, s, h, d]
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if expand_kv:      # stride-0 heads: the copy engine may refuse them, the mma.sync pass takes over
        k, v = k.expand(batch, sk, hq, d), v.expand(batch, sk, hq, d)
    mask = {"kind": "runtime", "block_size": 128} if block_mask is not None else None
    spec = attngen.Spec(head_dim=d, dtype=dtype, causal=causal, mask=mask, backward=True)
    kernels = attngen.build_backward(spec, path=path)
    assert kernels.plan.dkdv.path == path
    out, lse = attngen.build(spec)(q, k, v, block_mask=block_mask)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(batch, sq, hq, d, generator=gen, device="cuda", dtype=q.dtype)
    grads = [poisoned(shape, q.dtype) for shape in ((batch, sq, hq, d), (batch, sk, k.shape[2], d), (batch, sk, k.shape[2], d))]
    kernels(q, k, v, out, lse, dout, dq=grads[0], dk=grads[1], dv=grads[2], block_mask=block_mask)
    torch.cuda.synchronize()
    if expand_kv:      # the gradient of the expanded tensors is per query head; compare on contiguous copies
        k, v = k.contiguous(), v.contiguous()
    element = block_mask.element_mask() if block_mask is not None else None
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, causal, 1 / d ** 0.5, mask=element).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal, mask=element)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), grads, same, ref):
        ok, err, bound = acceptance_check(to64(mine), to64(theirs.grad), r)
        assert ok, f"{path} {name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"


def test_backward_planner_picks_wgmma_on_hopper():
    for d, causal in ((64, False), (128, False), (128, True)):
        spec = attngen.Spec(head_dim=d, dtype="bf16", causal=causal, backward=True)
        assert attngen.build_backward(spec).plan.dkdv.path == "wgmma"
    wide = attngen.build_backward(attngen.Spec(head_dim=256, backward=True)).plan.dkdv    # keys as the wgmma N
    assert wide.path == "wgmma" and wide.keys_as_columns
    assert attngen.build_backward(attngen.Spec(head_dim=80, backward=True)).plan.dkdv.path == "mma_sync"
    with pytest.raises(ValueError, match="path"):
        attngen.build_backward(attngen.Spec(head_dim=128, backward=True), path="tcgen05")


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
@pytest.mark.parametrize("d,causal", [(64, False), (128, False), (128, True)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 203), (203, 113), (1, 300), (300, 17), (1000, 1000)])
def test_backward_paths_over_tails(path, d, causal, dtype, sq, sk):
    check_backward_path(path, sq * 7 + sk, 2, sq, sk, 4, 2, d, dtype, causal)


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
@pytest.mark.parametrize("hq,hkv", [(8, 1), (16, 2)], ids=["mqa", "gqa8"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_paths_gqa_and_strided_inputs(path, hq, hkv, causal):
    check_backward_path(path, 9100 + hq, 2, 517, 300, hq, hkv, 128, causal=causal, transposed=True)


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
def test_backward_paths_runtime_block_mask(path):
    sq, sk, hq = 600, 700, 4
    layout = np.random.default_rng(5).random((hq, -(-sq // 128), -(-sk // 128))) < 0.4
    layout[:, 0, :] = False     # a query block that sees nothing: its dQ rows are zero
    block_mask = attngen.BlockMask.from_dense(layout, sq, sk, block_size=(128, 128))
    check_backward_path(path, 9200, 2, sq, sk, hq, 2, 128, block_mask=block_mask)


def test_backward_wgmma_falls_back_for_expanded_kv():
    for seed in (9300, 9301):     # the second call meets a layout the kernels remember as untileable (if TMA refused it)
        check_backward_path("wgmma", seed, 2, 300, 300, 4, 1, 128, causal=True, expand_kv=True)


def test_backward_repeated_calls_reuse_tensor_maps():
    """Calls on one layout share their tensor-map encodings per address (the allocator hands addresses back):
    new inputs each time must still give their own gradients."""
    for seed in (9400, 9401, 9402):
        check_backward_path("wgmma", seed, 2, 257, 257, 4, 2, 64, causal=True)
