"""The spec a call needs: head dims and dtype from the inputs, the modifiers and the layout from the keywords
(the API's entry points, the autograd Function and the torch custom ops all start here)."""

from __future__ import annotations

from .errors import SpecError
from .runtime.interop import _view
from .spec import Spec

UNBOUNDED_WINDOW = 1 << 30    # a window side of -1 (FlashAttention's "no limit") as a number


def spec_for_inputs(q, k, v, causal: bool, window=None, softcap=None, alibi: bool = False, block_mask=None,
                    deterministic: bool = False, layout: str = "batch", page_size: int | None = None) -> Spec:
    """The spec a call needs: head dims and dtype from the inputs, the modifiers from the keywords; heads,
    scale and ALiBi slopes stay run-time values. A window (left, right) becomes a sliding-window mask
    (causal clips right to 0), as FlashAttention's window_size does. layout "varlen": packed inputs;
    "kvcache": k and v are the caches (page_size: a paged one's rows per page)."""
    qv, kv, vv = _view("q", q), _view("k", k), _view("v", v)
    if len({qv.kind, kv.kind, vv.kind}) > 1:
        raise TypeError(f"q, k, v: expected one array library, got q {qv.kind}, k {kv.kind}, v {vv.kind}")
    dims = "[total_tokens, heads, head_dim]" if layout == "varlen" else "[batch, seqlen, heads, head_dim]"
    if len(qv.shape) != len(dims.split(",")) or len(vv.shape) != len(qv.shape):
        raise ValueError(f"q, v: expected {len(dims.split(','))} dims {dims}, got {qv.shape} and {vv.shape}")
    return spec_from(qv.dtype, qv.shape[-1], vv.shape[-1], causal, window=window, softcap=softcap, alibi=alibi,
                     block_mask=block_mask, deterministic=deterministic, layout=layout, page_size=page_size)


def spec_from(dtype: str, head_dim: int, head_dim_v: int, causal: bool, window=None, softcap=None, alibi: bool = False,
              block_mask=None, deterministic: bool = False, layout: str = "batch", page_size: int | None = None) -> Spec:
    """spec_for_inputs from the inputs' dtype and head dims alone (the torch ops' fake tensors have no data
    to view); errors name the call's argument."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected True or False, got {causal!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected True or False, got {deterministic!r}")
    extra = {"softcap": softcap, "alibi": alibi, "deterministic": deterministic, "layout": layout}
    if page_size is not None:
        extra["page_size"] = page_size
    if window is not None:
        ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
        if not ok:
            raise ValueError(f"window: expected (left, right) ints >= 0, or -1 for no limit; got {window!r}")
        left, right = (UNBOUNDED_WINDOW if w == -1 else w for w in window)
        extra["mask"] = {"kind": "sliding_window", "left": left, "right": 0 if causal else right}
        causal = False
    if block_mask is not None:
        _check_block_mask(block_mask)
        if window is not None or causal:
            raise ValueError("block_mask: give the whole mask in the BlockMask (causal/window as its pattern), "
                             "not together with causal=True or window=")
        rows, cols = block_mask.block_size
        extra["mask"] = {"kind": "runtime", "block_size": rows if rows == cols else [rows, cols]}
        element = block_mask.kernel_predicate()     # partial blocks evaluate it: exactly element_mask()
        if element is not None:
            extra["mask"]["element"] = element.to_dict()
    try:
        return Spec(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, causal=causal, **extra)
    except SpecError as exc:
        argument = {"head_dim": "q", "head_dim_v": "v", "dtype": "q"}.get(exc.field, exc.field)
        what = {"head_dim": "head_dim (last dim)", "head_dim_v": "head_dim_v (last dim)"}.get(exc.field, exc.field)
        raise (TypeError if exc.field == "dtype" else ValueError)(
            f"{argument}: {what} {exc.value!r} is not supported; allowed: {exc.allowed}") from None


def _check_block_mask(block_mask) -> None:
    from .masks import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected an attngen.BlockMask (BlockMask.from_dense / from_predicate / "
                        f"from_pattern), got {type(block_mask).__module__}.{type(block_mask).__name__}")


def position_shift(position_offsets, q, k) -> int:
    """The kernels' position_shift for attention's position_offsets=(q_start, kv_start): the global positions
    of q's first row and k's first row when both are shards of one longer sequence (context parallelism).
    Causal, windows and ALiBi then compare q_start + i with kv_start + j; the default alignment (None) is
    bottom-right, q_start - kv_start = seqlen_k - seqlen_q, a shift of 0."""
    if position_offsets is None:
        return 0
    if (not isinstance(position_offsets, (tuple, list)) or len(position_offsets) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in position_offsets)):
        raise ValueError(f"position_offsets: expected (q_start, kv_start), two ints >= 0 (the global positions of "
                         f"q's and k's first rows), got {position_offsets!r}")
    q_shape, k_shape = tuple(getattr(q, "shape", ())), tuple(getattr(k, "shape", ()))
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise ValueError(f"position_offsets: needs the batch layout q [batch, seqlen_q, heads, head_dim], got q "
                         f"{list(q_shape)}, k {list(k_shape)}")
    q_start, kv_start = position_offsets
    return (q_start - kv_start) - (k_shape[1] - q_shape[1])
