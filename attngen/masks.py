"""Attention masks: element patterns and the block-sparse ``BlockMask`` built from them.

Semantics (as the kernel and FlexAttention): a mask says which (h, q_idx, kv_idx) pairs are
visible; invisible scores become -inf, and a query row that sees no key gives out 0 and lse -inf.
Positions are aligned bottom-right like attngen's causal: query row q_idx sits at key position
``q_idx + seqlen_k - seqlen_q`` (its *aligned position*, negative for the first rows when
seqlen_q > seqlen_k), and causal means kv_idx <= aligned position. In the kernels the shift is
``causal_offset`` (ModContext): seqlen_k - seqlen_q, plus the call's position shift when q and k are
shards of a longer sequence (attention's position_offsets), so the C predicates read it by that name.

A ``Pattern`` gives ``element(h, q_idx, kv_idx, seqlen_q, seqlen_k)`` (vectorised numpy) and
``cuda_expr()``, the same predicate as a C++ boolean expression over the ints h, q_idx, kv_idx,
seqlen_q, seqlen_k, and ``cuda_tile_expr()``, a pair (kept, full) of C++ expressions over a tile's
inclusive ranges q_lo..q_hi, kv_lo..kv_hi (and h, seqlen_q, seqlen_k): ``kept`` is true whenever
some element of the tile is visible (it may say true for a tile with none), ``full`` only when every
element is (it may say false for a full tile). The kernel builds its list of key tiles from these,
so a pattern known at build time needs no index tensor. Patterns backed by a block table (BigBird's
seeded random blocks, an explicit Layout) read it through ``block_bit(h, q_block, kv_block)``: one
bit per block, uploaded by the launcher per sequence length. ``BlockMask`` reduces a pattern, or any
vectorised predicate, to R x C blocks stored as block-CSR, with partial blocks (element masking
needed) apart from full blocks (every in-range element visible).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpecError

__all__ = [
    "Pattern", "Causal", "SlidingWindow", "Longformer", "BigBird", "Strided", "Fixed", "Dilated",
    "Document", "Layout", "And", "Or", "pattern_from_dict",
    "BlockMask", "KVMajorCSR", "aligned_position", "ALIGNED_EXPR", "DEFAULT_BLOCK_SIZE",
]

DEFAULT_BLOCK_SIZE = (128, 128)
# Elements of one predicate evaluation in BlockMask.from_predicate: bounds its memory (never Sq x Sk).
CHUNK_ELEMENTS = 1 << 18


# ----------------------------------------------------------------------------- causal alignment

ALIGNED_EXPR = "(q_idx + causal_offset)"          # causal_offset: seqlen_k - seqlen_q (+ shift)
_DISTANCE_EXPR = f"({ALIGNED_EXPR} - kv_idx)"
# Tile predicates: the aligned positions of a tile's first and last query rows, and the range of
# aligned distances (aligned position - kv_idx) over the tile.
ALIGNED_LO, ALIGNED_HI = "(q_lo + causal_offset)", "(q_hi + causal_offset)"
_DIST_MIN, _DIST_MAX = f"({ALIGNED_LO} - kv_hi)", f"({ALIGNED_HI} - kv_lo)"
ALWAYS = ("true", "true")
SPAN_MAX_VALUE = 2**31 - 1      # SPAN_MAX in the kernels: a bound no position reaches


def aligned_position(q_idx, seqlen_q: int, seqlen_k: int):
    """The key position query row q_idx sits at under bottom-right alignment (may be negative)."""
    return q_idx + (seqlen_k - seqlen_q)


def _in_window(q_idx, kv_idx, seqlen_q, seqlen_k, left: int, right: int):
    """kv_idx within [aligned - left, aligned + right] (full-size work: two compares)."""
    a = aligned_position(q_idx, seqlen_q, seqlen_k)
    return (kv_idx >= a - left) & (kv_idx <= a + right)


def _in_window_expr(left: int, right: int) -> str:
    """C form of _in_window (no division, no negative literal)."""
    return f"(kv_idx >= {ALIGNED_EXPR} - {left} && kv_idx <= {ALIGNED_EXPR} + {right})"


def _window_spans(left: int | None, right: int) -> tuple[str, str, str, str]:
    """cuda_spans of kv_idx - aligned in [-left, right] (left None: unbounded): the keys around the query's
    aligned position, and the queries whose aligned position lies in [kv_idx - right, kv_idx + left]."""
    aligned_query = "(kv_idx - causal_offset)"                   # the query row aligned at kv_idx

    def shift(x, n):                                              # no negative literal: x - 3, not x + -3
        return x if n == 0 else f"({x} {'-' if n > 0 else '+'} {abs(n)})"
    return ("SPAN_MIN" if left is None else shift(ALIGNED_EXPR, left), shift(ALIGNED_EXPR, -right),
            shift(aligned_query, right), "SPAN_MAX" if left is None else shift(aligned_query, -left))


def _in_window_tile_expr(left: int, right: int) -> tuple[str, str]:
    """(kept, full) of _in_window over a tile: the distance ranges overlap / lie inside [-right, left]."""
    plus = f" + {right}" if right else ""          # no negative literal: d >= -right as d + right >= 0
    kept = f"({_DIST_MAX}{plus} >= 0 && {_DIST_MIN} <= {left})"
    full = f"({_DIST_MIN}{plus} >= 0 && {_DIST_MAX} <= {left})"
    return kept, full


def _block_bounds(seqlen_q: int, seqlen_k: int, block_size) -> tuple[np.ndarray, ...]:
    """In-range bounds of every block: q_lo, q_hi [nQb, 1] and kv_lo, kv_hi [1, nKb] (int64, inclusive)."""
    rows, cols = _block_size(block_size)
    q_lo, kv_lo = np.arange(0, seqlen_q, rows, dtype=np.int64), np.arange(0, seqlen_k, cols, dtype=np.int64)
    q_hi, kv_hi = np.minimum(q_lo + rows, seqlen_q) - 1, np.minimum(kv_lo + cols, seqlen_k) - 1
    return q_lo[:, None], q_hi[:, None], kv_lo[None, :], kv_hi[None, :]


def _window_grid(seqlen_q, seqlen_k, block_size, left: int, right: int):
    """(kept, full) of kv_idx - aligned in [-left, right] (left/right None: unbounded): exact, because over
    a block the distance kv_idx - aligned takes every integer between its extremes."""
    q_lo, q_hi, kv_lo, kv_hi = _block_bounds(seqlen_q, seqlen_k, block_size)
    a_lo, a_hi = q_lo + (seqlen_k - seqlen_q), q_hi + (seqlen_k - seqlen_q)
    kept = np.ones((q_lo.size, kv_lo.size), dtype=bool)
    full = kept.copy()
    if right is not None:       # some distance <= right / every distance <= right
        kept &= kv_lo <= a_hi + right
        full &= kv_hi <= a_lo + right
    if left is not None:        # some distance >= -left / every distance >= -left
        kept &= kv_hi >= a_lo - left
        full &= kv_lo >= a_hi - left
    return kept[None], (full & kept)[None]


# Elements the exact refinement of a combination may evaluate (blocks two parts leave partial); past it
# such blocks stay partial (kept may then over-approximate, as the kernels' tile predicates do: a partial
# block evaluates the element predicate, so the result is exact either way).
REFINE_ELEMENTS = 1 << 20


def _window_rows(seqlen_q, seqlen_k, block_size, left, right):
    """Per query block, the kv blocks [k0, k1) kept and [f0, f1) full of kv_idx - aligned in [-left, right]
    (None: unbounded), from the blocks' bounds; exact as _window_grid."""
    q_lo, q_hi, kv_lo, kv_hi = (b.ravel() for b in _block_bounds(seqlen_q, seqlen_k, block_size))
    a_lo, a_hi = q_lo + (seqlen_k - seqlen_q), q_hi + (seqlen_k - seqlen_q)
    n = kv_lo.size
    k0 = np.zeros_like(a_lo) if left is None else np.searchsorted(kv_hi, a_lo - left, side="left")
    k1 = np.full_like(a_lo, n) if right is None else np.searchsorted(kv_lo, a_hi + right, side="right")
    f0 = np.zeros_like(a_lo) if left is None else np.searchsorted(kv_lo, a_hi - left, side="left")
    f1 = np.full_like(a_lo, n) if right is None else np.searchsorted(kv_hi, a_lo + right, side="right")
    return k0, k1, f0, f1


def _window_keys(seqlen_q, seqlen_k, left, right):
    """(lo, hi) per query row of kv_idx - aligned in [-left, right] (None: unbounded), clipped to the keys."""
    a = np.arange(seqlen_q, dtype=np.int64) + (seqlen_k - seqlen_q)
    lo = np.zeros_like(a) if left is None else np.clip(a - left, 0, seqlen_k)
    hi = np.full_like(a, seqlen_k) if right is None else np.clip(a + right + 1, 0, seqlen_k)
    return lo, hi


def _expand_ranges(starts, stops):
    """(row of each entry, its column) for the column ranges [starts[r], stops[r]) of every row r."""
    lengths = np.maximum(stops - starts, 0)
    rows = np.repeat(np.arange(lengths.size), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cols = np.arange(rows.size, dtype=np.int64) - first[rows] + starts[rows]
    return rows, cols


def _csr_of_entries(rows, cols, n_rows):
    """int32 (row_ptr, cols) of entries already in row-major order."""
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))]).astype(np.int32)
    cols = np.asarray(cols, dtype=np.int32)
    for arr in (row_ptr, cols):
        arr.setflags(write=False)
    return row_ptr, cols


def _block_elements(pattern, seqlen_q, seqlen_k, block_size, heads, q_blocks, kv_blocks):
    """(any visible, all visible) of the listed blocks (arrays of head, q block and kv block indices), by
    their elements, CHUNK_ELEMENTS at a time. A tail block repeats its last in-range row or key, which
    changes neither answer."""
    rows, cols = block_size
    per_chunk = max(1, CHUNK_ELEMENTS // (rows * cols))
    kept, full = np.zeros(heads.size, dtype=bool), np.zeros(heads.size, dtype=bool)
    for start in range(0, heads.size, per_chunk):
        part = slice(start, start + per_chunk)
        h = heads[part][:, None, None]
        q_idx = np.minimum(q_blocks[part][:, None, None] * rows + np.arange(rows)[None, :, None], seqlen_q - 1)
        kv_idx = np.minimum(kv_blocks[part][:, None, None] * cols + np.arange(cols)[None, None, :], seqlen_k - 1)
        visible = pattern.element(h, q_idx, kv_idx, seqlen_q, seqlen_k)
        kept[part], full[part] = visible.any(axis=(1, 2)), visible.all(axis=(1, 2))
    return kept, full


def _grid_point_in_distances(step: int, upper: str) -> str:
    """C: some multiple of step lies in [max(dist_min, 0), upper], given upper >= 0 (short-circuit)."""
    return f"({_DIST_MIN} <= 0 || {upper} / {step} * {step} >= {_DIST_MIN})"


def _on_grid(q_idx, kv_idx, seqlen_q, seqlen_k, step: int):
    """aligned - kv_idx is a multiple of step (residues of the small operands, then one compare)."""
    return kv_idx % step == aligned_position(q_idx, seqlen_q, seqlen_k) % step


def _on_grid_expr(step: int) -> str:
    """C form of _on_grid; valid only where kv_idx <= aligned (C's % on a non-negative operand)."""
    return f"{_DISTANCE_EXPR} % {step} == 0"


def _runs(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted distinct ints as inclusive runs of consecutive values."""
    runs, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append((start, v))
            start = None
    return runs


def _membership_expr(var: str, values: tuple[int, ...]) -> str:
    """C: var is one of the sorted distinct values (runs become ranges)."""
    runs = [f"{var} == {s}" if s == e else f"({var} >= {s} && {var} <= {e})" for s, e in _runs(values)]
    return "(" + " || ".join(runs) + ")" if runs else "false"


# ----------------------------------------------------------------------------- field checks


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int_at_least(field: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise SpecError(field, value, f"an int >= {minimum}")
    return int(value)


def _ints_at_least(field: str, value, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= minimum for v in value):
        raise SpecError(field, value, f"a list of ints >= {minimum}")
    return tuple(int(v) for v in value)


def _block_size(value, field: str = "block_size") -> tuple[int, int]:
    """An int R (square blocks) or a pair (R, C) of positive ints -> (R, C)."""
    pair = (value, value) if _is_int(value) else value
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_is_int(v) and v >= 1 for v in pair):
        raise SpecError(field, value, "a positive int or a pair [rows, cols] of positive ints")
    return int(pair[0]), int(pair[1])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- patterns


class Pattern:
    """Base of the mask patterns (frozen dataclasses). Subclasses define ``kind`` and ``_visible``.

    Int fields are checked against ``_MIN`` (default 0); ``tuple[int, ...]`` fields become tuples.
    """

    kind = "pattern"
    _MIN: dict = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, minimum = getattr(self, f.name), self._MIN.get(f.name, 0)
            if f.type == "int":
                object.__setattr__(self, f.name, _int_at_least(f.name, value, minimum))
            elif f.type == "tuple[int, ...]":
                object.__setattr__(self, f.name, _ints_at_least(f.name, value, minimum))
        self._check()

    def _check(self) -> None:
        """Checks that involve more than one field."""

    def element(self, h, q_idx, kv_idx, seqlen_q: int, seqlen_k: int) -> np.ndarray:
        """Bool array (broadcast shape of h, q_idx, kv_idx): True where the pair is visible."""
        h, q_idx, kv_idx = (np.asarray(x, dtype=np.int64) for x in (h, q_idx, kv_idx))
        shape = np.broadcast_shapes(h.shape, q_idx.shape, kv_idx.shape)
        return np.broadcast_to(self._visible(h, q_idx, kv_idx, int(seqlen_q), int(seqlen_k)), shape)

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k) -> np.ndarray:
        raise NotImplementedError

    def cuda_expr(self) -> str:
        """C++ boolean expression over ints h, q_idx, kv_idx, seqlen_q, seqlen_k."""
        raise NotImplementedError

    def cuda_tile_expr(self) -> tuple[str, str]:
        """(kept, full): C++ expressions over h, q_lo, q_hi, kv_lo, kv_hi, seqlen_q, seqlen_k (inclusive,
        in-range tile bounds). kept may over-approximate, full may under-approximate (module doc)."""
        raise NotImplementedError

    def cuda_spans(self) -> tuple[str, str, str, str] | None:
        """For an interval pattern (causal, sliding windows, documents, and `and`s of them) the C form of its
        spans, inclusive: query q_idx sees exactly the keys key_lo .. key_hi (expressions over h, q_idx,
        seqlen_q, seqlen_k) and key kv_idx is seen by exactly the queries query_lo .. query_hi (over h,
        kv_idx, ...). SPAN_MIN / SPAN_MAX stand for no bound. A tile row then tests its span, computed once,
        instead of the element predicate. None for any other pattern."""
        return None

    def block_table(self, seqlen_q: int, seqlen_k: int) -> np.ndarray | None:
        """Bool [H or 1, nQb, nKb] the expressions read through block_bit(), or None (closed form)."""
        return None

    def key_ranges(self, seqlen_q: int, seqlen_k: int):
        """For an interval pattern (causal, sliding windows, documents, and `and`s of them): int arrays
        (lo, hi) [seqlen_q], query row i seeing exactly the keys lo[i] .. hi[i] - 1 (none when hi <= lo).
        None for any other pattern."""
        return None

    def visible_pairs(self, seqlen_q: int, seqlen_k: int) -> float:
        """Visible (query, key) pairs, mean over the pattern's heads: from key_ranges in O(seqlen_q) where
        the pattern is an interval pattern, else by its elements."""
        ranges = self.key_ranges(seqlen_q, seqlen_k)
        if ranges is not None:
            return float(np.maximum(ranges[1] - ranges[0], 0).sum())
        total, rows = 0.0, max(1, CHUNK_ELEMENTS // max(1, seqlen_k))
        for h in range(self.heads):
            for start in range(0, seqlen_q, rows):
                q_idx = np.arange(start, min(seqlen_q, start + rows))[:, None]
                total += float(self.element(h, q_idx, np.arange(seqlen_k)[None, :], seqlen_q, seqlen_k).sum())
        return total / self.heads

    def row_ranges(self, seqlen_q: int, seqlen_k: int, block_size):
        """For a pattern whose kept kv blocks in every query block row form one range, and its full ones
        a sub-range (causal, sliding windows, documents): int arrays (k0, k1, f0, f1) [nQb], kept blocks
        [k0, k1) and full [f0, f1), exact. None for any other pattern."""
        return None

    def block_entries(self, seqlen_q: int, seqlen_k: int, block_size):
        """The exact block CSR (partial_row_ptr, partial_cols, full_row_ptr, full_cols) of a head-independent
        interval pattern or an `and` of them, in O(query blocks + kept blocks): no block grid, no element.
        None for any other pattern (BlockMask.from_pattern then reduces block_grid)."""
        block_size = _block_size(block_size)
        ranges = self.row_ranges(seqlen_q, seqlen_k, block_size)
        if ranges is None:
            return None
        k0, k1, f0, f1 = ranges
        rows, cols = _expand_ranges(k0, k1)
        full = (cols >= f0[rows]) & (cols < f1[rows])
        keep = np.ones(rows.size, dtype=bool)
        undecided = self._undecided(seqlen_q, seqlen_k, block_size, rows, cols, full)
        if undecided is not None and undecided.any():
            index = np.nonzero(undecided)[0]
            if index.size * block_size[0] * block_size[1] <= REFINE_ELEMENTS:
                keep[index], full[index] = _block_elements(self, seqlen_q, seqlen_k, block_size,
                                                           np.zeros_like(index), rows[index], cols[index])
        n_rows = k0.size
        return (*_csr_of_entries(rows[keep & ~full], cols[keep & ~full], n_rows),
                *_csr_of_entries(rows[keep & full], cols[keep & full], n_rows))

    def _undecided(self, seqlen_q, seqlen_k, block_size, rows, cols, full):
        """Entries whose kept/full the ranges do not settle (an `and`'s blocks that two parts leave partial)."""
        return None

    def block_grid(self, seqlen_q: int, seqlen_k: int, block_size) -> tuple[np.ndarray, np.ndarray]:
        """Exact (kept, full) bool [H or 1, nQb, nKb] at R x C blocks: kept where any element is visible,
        full where every in-range element is. This default reduces the elements (O(seqlen_q x seqlen_k));
        the interval patterns (causal, sliding window, document) and their combinations override it with a
        closed form over the blocks' bounds, O(blocks)."""
        return _reduce_blocks(lambda h, q, kv: self.element(h, q, kv, seqlen_q, seqlen_k), self.heads,
                              seqlen_q, seqlen_k, _block_size(block_size))

    @property
    def table_block_size(self) -> tuple[int, int] | None:
        """(R, C) of block_table's blocks; kernel tiles must divide them. None for closed forms."""
        return None

    @property
    def heads(self) -> int:
        """Heads the pattern distinguishes: 1 when it is the same for every head."""
        return 1

    def to_dict(self) -> dict:
        """The spec's ``mask:`` mapping; ``pattern_from_dict(p.to_dict()) == p``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @property
    def name(self) -> str:
        """An identifier: the kind and the scalar parameters (lists give their length)."""
        parts = [self.kind]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"n{len(value)}" if isinstance(value, tuple) else str(value))
        return "_".join(parts)

    def __and__(self, other: Pattern) -> Pattern:
        return And(_operands(And, self) + _operands(And, other))

    def __or__(self, other: Pattern) -> Pattern:
        return Or(_operands(Or, self) + _operands(Or, other))


class _Composite(Pattern):
    """A pattern defined as a combination of simpler ones (``_equivalent``)."""

    def _equivalent(self) -> Pattern:
        raise NotImplementedError

    def _visible(self, *args):
        return self._equivalent()._visible(*args)

    def cuda_expr(self):
        return self._equivalent().cuda_expr()

    def cuda_tile_expr(self):
        return self._equivalent().cuda_tile_expr()

    def cuda_spans(self):
        return self._equivalent().cuda_spans()

    def block_table(self, seqlen_q, seqlen_k):
        return self._equivalent().block_table(seqlen_q, seqlen_k)

    def block_grid(self, seqlen_q, seqlen_k, block_size):
        return self._equivalent().block_grid(seqlen_q, seqlen_k, block_size)

    def row_ranges(self, seqlen_q, seqlen_k, block_size):
        return self._equivalent().row_ranges(seqlen_q, seqlen_k, block_size)

    def key_ranges(self, seqlen_q, seqlen_k):
        return self._equivalent().key_ranges(seqlen_q, seqlen_k)

    def _undecided(self, *args):
        return self._equivalent()._undecided(*args)

    @property
    def table_block_size(self):
        return self._equivalent().table_block_size


@dataclass(frozen=True)
class Causal(Pattern):
    """Bottom-right causal: kv_idx <= q_idx + seqlen_k - seqlen_q (in C, q_idx + causal_offset)."""

    kind = "causal"

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        return kv_idx <= aligned_position(q_idx, seqlen_q, seqlen_k)

    def cuda_expr(self):
        return f"(kv_idx <= {ALIGNED_EXPR})"

    def cuda_tile_expr(self):
        return f"(kv_lo <= {ALIGNED_HI})", f"(kv_hi <= {ALIGNED_LO})"

    def cuda_spans(self):
        return _window_spans(None, 0)

    def block_grid(self, seqlen_q, seqlen_k, block_size):
        return _window_grid(seqlen_q, seqlen_k, block_size, None, 0)

    def row_ranges(self, seqlen_q, seqlen_k, block_size):
        return _window_rows(seqlen_q, seqlen_k, block_size, None, 0)

    def key_ranges(self, seqlen_q, seqlen_k):
        return _window_keys(seqlen_q, seqlen_k, None, 0)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """kv_idx - aligned position in [-left, right]; right=0 is a causal window of left+1 keys."""

    left: int
    right: int = 0
    kind = "sliding_window"

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        return _in_window(q_idx, kv_idx, seqlen_q, seqlen_k, self.left, self.right)

    def cuda_expr(self):
        return _in_window_expr(self.left, self.right)

    def cuda_tile_expr(self):
        return _in_window_tile_expr(self.left, self.right)

    def cuda_spans(self):
        return _window_spans(self.left, self.right)

    def block_grid(self, seqlen_q, seqlen_k, block_size):
        return _window_grid(seqlen_q, seqlen_k, block_size, self.left, self.right)

    def row_ranges(self, seqlen_q, seqlen_k, block_size):
        return _window_rows(seqlen_q, seqlen_k, block_size, self.left, self.right)

    def key_ranges(self, seqlen_q, seqlen_k):
        return _window_keys(seqlen_q, seqlen_k, self.left, self.right)


@dataclass(frozen=True)
class _GlobalTokens(Pattern):
    """Positions that see every key (query at that aligned position) and that every query sees."""

    tokens: tuple[int, ...]
    kind = "global_tokens"

    def _check(self):
        object.__setattr__(self, "tokens", tuple(sorted(set(self.tokens))))

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        tokens = np.asarray(self.tokens, dtype=np.int64)
        return np.isin(aligned_position(q_idx, seqlen_q, seqlen_k), tokens) | np.isin(kv_idx, tokens)

    def cuda_expr(self):
        a, kv = _membership_expr(ALIGNED_EXPR, self.tokens), _membership_expr("kv_idx", self.tokens)
        return f"({a} || {kv})"

    def cuda_tile_expr(self):
        # kept: a token run meets the rows' aligned range or the key range; full: one run covers either.
        runs = _runs(self.tokens)
        meets = lambda lo, hi: [f"({lo} <= {e} && {hi} >= {s})" for s, e in runs]  # noqa: E731
        covers = lambda lo, hi: [f"({lo} >= {s} && {hi} <= {e})" for s, e in runs]  # noqa: E731
        either = lambda parts: "(" + " || ".join(parts) + ")" if parts else "false"  # noqa: E731
        return (either(meets(ALIGNED_LO, ALIGNED_HI) + meets("kv_lo", "kv_hi")),
                either(covers(ALIGNED_LO, ALIGNED_HI) + covers("kv_lo", "kv_hi")))


@dataclass(frozen=True)
class Longformer(_Composite):
    """Sliding window of +-(window // 2) around the aligned position, plus global tokens.

    A global token position p: key p is seen by every query, and the query whose aligned position
    is p sees every key.
    """

    window: int
    global_tokens: tuple[int, ...] = ()
    kind = "longformer"

    def _check(self):
        object.__setattr__(self, "global_tokens", _GlobalTokens(self.global_tokens).tokens)

    def _equivalent(self):
        half = self.window // 2
        return SlidingWindow(half, half) | _GlobalTokens(self.global_tokens)


@dataclass(frozen=True)
class _BlockBand(Pattern):
    """|aligned // block_size - kv_idx // block_size| <= half (floor division)."""

    half: int
    block_size: int
    kind = "block_band"
    _MIN = {"block_size": 1}

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        q_block = aligned_position(q_idx, seqlen_q, seqlen_k) // self.block_size
        kv_block = kv_idx // self.block_size
        return (kv_block >= q_block - self.half) & (kv_block <= q_block + self.half)

    def _band(self, q_block_lo: str, q_block_hi: str, kv_block_lo: str, kv_block_hi: str, full: bool) -> str:
        """The kv block range [kv_block_lo, kv_block_hi] meets (full: lies inside) every query's band."""
        if full:
            return f"({kv_block_hi} <= {q_block_lo} + {self.half} && {kv_block_lo} >= {q_block_hi} - {self.half})"
        return f"({kv_block_lo} <= {q_block_hi} + {self.half} && {kv_block_hi} >= {q_block_lo} - {self.half})"

    def cuda_expr(self):
        # The aligned position may be negative: floor_div, not C's truncating division.
        q_block, kv_block = f"floor_div({ALIGNED_EXPR}, {self.block_size})", f"kv_idx / {self.block_size}"
        return self._band(q_block, q_block, kv_block, kv_block, full=False)

    def cuda_tile_expr(self):
        bs = self.block_size
        q_lo, q_hi = f"floor_div({ALIGNED_LO}, {bs})", f"floor_div({ALIGNED_HI}, {bs})"
        kv_lo, kv_hi = f"kv_lo / {bs}", f"kv_hi / {bs}"
        return self._band(q_lo, q_hi, kv_lo, kv_hi, full=False), self._band(q_lo, q_hi, kv_lo, kv_hi, full=True)


@functools.lru_cache(maxsize=32)
def _random_block_table(seed: int, count: int, n_q_blocks: int, n_kv_blocks: int) -> np.ndarray:
    """Bool [n_q_blocks, n_kv_blocks]: rng = default_rng(seed); query block i, in order, keeps
    rng.choice(n_kv_blocks, min(count, n_kv_blocks), replace=False)."""
    rng = np.random.default_rng(seed)
    table = np.zeros((n_q_blocks, n_kv_blocks), dtype=bool)
    for i in range(n_q_blocks):
        table[i, rng.choice(n_kv_blocks, size=min(count, n_kv_blocks), replace=False)] = True
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class _RandomBlocks(Pattern):
    """Query block q_idx // block_size sees ``count`` seeded random kv blocks (same for all heads)."""

    count: int
    block_size: int
    seed: int
    kind = "random_blocks"
    _MIN = {"block_size": 1}

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        bs = self.block_size
        table = _random_block_table(self.seed, self.count, _cdiv(seqlen_q, bs), _cdiv(seqlen_k, bs))
        return table[q_idx // bs, kv_idx // bs]

    def cuda_expr(self):
        return f"block_bit(h, q_idx / {self.block_size}, kv_idx / {self.block_size})"

    def cuda_tile_expr(self):
        # Tiles lie inside one block (the planner makes them divide table_block_size).
        bit = f"block_bit(h, q_lo / {self.block_size}, kv_lo / {self.block_size})"
        return bit, bit

    def block_table(self, seqlen_q, seqlen_k):
        bs = self.block_size
        return _random_block_table(self.seed, self.count, _cdiv(seqlen_q, bs), _cdiv(seqlen_k, bs))[None]

    @property
    def table_block_size(self):
        return (self.block_size, self.block_size)


@dataclass(frozen=True)
class BigBird(_Composite):
    """BigBird: a band of ``window`` blocks, global tokens, and seeded random blocks (a block table).

    With blocks of block_size positions: the band keeps kv block kb for a query whose aligned
    position lies in block qb iff |qb - kb| <= window // 2 (window=3: the block and one each side);
    global tokens as in Longformer; query block q_idx // block_size also sees ``random_blocks``
    distinct kv blocks drawn as in ``_random_block_table`` (numpy default_rng(seed)).
    """

    window: int
    global_tokens: tuple[int, ...] = ()
    random_blocks: int = 0
    block_size: int = 128
    seed: int = 0
    kind = "bigbird"
    _MIN = {"window": 1, "block_size": 1}

    def _check(self):
        object.__setattr__(self, "global_tokens", _GlobalTokens(self.global_tokens).tokens)

    def _equivalent(self):
        parts = _BlockBand(self.window // 2, self.block_size) | _GlobalTokens(self.global_tokens)
        if self.random_blocks == 0:           # no table to read
            return parts
        return parts | _RandomBlocks(self.random_blocks, self.block_size, self.seed)


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer 'strided' (Child et al. 2019), causal-aligned.

    With d = aligned position - kv_idx: visible iff d >= 0 and (d < stride or d % stride == 0).
    """

    stride: int
    kind = "strided"
    _MIN = {"stride": 1}

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        args = (q_idx, kv_idx, seqlen_q, seqlen_k)
        local = _in_window(*args, self.stride - 1, 0)
        return local | (Causal()._visible(h, *args) & _on_grid(*args, self.stride))

    def cuda_expr(self):
        local = _in_window_expr(self.stride - 1, 0)
        return f"({local} || ({Causal().cuda_expr()} && {_on_grid_expr(self.stride)}))"

    def cuda_tile_expr(self):
        s = self.stride
        kept = f"({_DIST_MAX} >= 0 && ({_DIST_MIN} <= {s - 1} || {_grid_point_in_distances(s, _DIST_MAX)}))"
        full = f"({_DIST_MIN} >= 0 && {_DIST_MAX} <= {s - 1})" if s > 1 else f"({_DIST_MIN} >= 0)"
        return kept, full


@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer 'fixed' (Child et al. 2019), causal-aligned.

    With a = aligned position: visible iff kv_idx <= a and (kv_idx // stride == a // stride, the
    same stride-long chunk, or kv_idx % stride >= stride - summary, the chunk's last ``summary``
    keys). 1 <= summary <= stride.
    """

    stride: int
    summary: int = 1
    kind = "fixed"
    _MIN = {"stride": 1, "summary": 1}

    def _check(self):
        if self.summary > self.stride:
            raise SpecError("summary", self.summary, f"an int in 1..stride={self.stride}")

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        a, s = aligned_position(q_idx, seqlen_q, seqlen_k), self.stride
        same_chunk = np.floor_divide(kv_idx, s) == np.floor_divide(a, s)
        return (kv_idx <= a) & (same_chunk | (kv_idx % s >= s - self.summary))

    def cuda_expr(self):
        a, s = ALIGNED_EXPR, self.stride   # a >= kv_idx >= 0 whenever a / s is evaluated
        return f"(kv_idx <= {a} && (kv_idx / {s} == {a} / {s} || kv_idx % {s} >= {s - self.summary}))"

    def cuda_tile_expr(self):
        # kept: causal kept (every chunk ends in summary keys, so little is lost); full: causal full and
        # the keys lie in one chunk that is either every row's own chunk or its summary part.
        s, a_lo, a_hi = self.stride, ALIGNED_LO, ALIGNED_HI
        one_chunk = f"kv_lo / {s} == kv_hi / {s}"
        own_chunk = f"{a_lo} / {s} == kv_lo / {s} && {a_hi} / {s} == kv_lo / {s}"
        full = f"(kv_hi <= {a_lo} && {one_chunk} && ({own_chunk} || kv_lo % {s} >= {s - self.summary}))"
        return Causal().cuda_tile_expr()[0], full


@dataclass(frozen=True)
class Dilated(Pattern):
    """Causal-aligned dilated window: keys at distances 0, d, 2d, ..., window*d behind the
    aligned position (window + 1 keys; d = dilation)."""

    window: int
    dilation: int = 1
    kind = "dilated"
    _MIN = {"dilation": 1}

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        args = (q_idx, kv_idx, seqlen_q, seqlen_k)
        return _in_window(*args, self.window * self.dilation, 0) & _on_grid(*args, self.dilation)

    def cuda_expr(self):
        return f"({_in_window_expr(self.window * self.dilation, 0)} && {_on_grid_expr(self.dilation)})"

    def cuda_tile_expr(self):
        reach, step = self.window * self.dilation, self.dilation
        kept, full = _in_window_tile_expr(reach, 0)
        if step == 1:
            return kept, full
        # a multiple of step in [max(dist_min, 0), min(dist_max, reach)]
        below = f"({_DIST_MAX} <= {reach} && {_grid_point_in_distances(step, _DIST_MAX)})"
        beyond = f"({_DIST_MAX} > {reach} && {_grid_point_in_distances(step, str(reach))})"
        return f"({kept} && ({below} || {beyond}))", "false"


@dataclass(frozen=True)
class Document(Pattern):
    """Block-diagonal masking of packed sequences: visible iff q_idx and kv_idx lie in the same
    document. Evaluation requires seqlen_q == seqlen_k == sum(seq_lens) (else ValueError)."""

    seq_lens: tuple[int, ...]
    kind = "document"
    _MIN = {"seq_lens": 1}

    def _check(self):
        if not self.seq_lens:
            raise SpecError("seq_lens", list(self.seq_lens), "a non-empty list of ints >= 1")

    @property
    def _starts(self) -> tuple[int, ...]:
        """First position of every document but the first."""
        return tuple(int(s) for s in np.cumsum(self.seq_lens)[:-1])

    def _check_lengths(self, seqlen_q, seqlen_k):
        total = sum(self.seq_lens)
        if not seqlen_q == seqlen_k == total:
            raise ValueError(f"Document mask needs seqlen_q == seqlen_k == sum(seq_lens) = {total}, "
                             f"got seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        self._check_lengths(seqlen_q, seqlen_k)
        starts = np.asarray(self._starts, dtype=np.int64)
        return np.searchsorted(starts, q_idx, side="right") == np.searchsorted(starts, kv_idx, side="right")

    def block_grid(self, seqlen_q, seqlen_k, block_size):
        """Exact: documents are contiguous, so a block's rows (keys) meet every document between those of
        its first and last row (key); kept iff the two document ranges meet, full iff both are one and the
        same document. O(blocks + documents), for any number of documents."""
        self._check_lengths(seqlen_q, seqlen_k)
        starts = np.asarray(self._starts, dtype=np.int64)
        q_lo, q_hi, kv_lo, kv_hi = (np.searchsorted(starts, b, side="right")
                                    for b in _block_bounds(seqlen_q, seqlen_k, block_size))
        kept = (q_lo <= kv_hi) & (kv_lo <= q_hi)
        full = (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
        return kept[None], full[None]

    def row_ranges(self, seqlen_q, seqlen_k, block_size):
        """Kept: the kv blocks from the first document's start to the last one's end; full: those inside the
        one document of a query block that lies in one."""
        self._check_lengths(seqlen_q, seqlen_k)
        bounds = np.concatenate([[0], np.cumsum(self.seq_lens)]).astype(np.int64)     # document d: [b[d], b[d+1])
        q_lo, q_hi, kv_lo, kv_hi = (b.ravel() for b in _block_bounds(seqlen_q, seqlen_k, block_size))
        first, last = (np.searchsorted(bounds, x, side="right") - 1 for x in (q_lo, q_hi))
        start, end = bounds[first], bounds[last + 1] - 1
        k0, k1 = np.searchsorted(kv_hi, start, side="left"), np.searchsorted(kv_lo, end, side="right")
        f0, f1 = np.searchsorted(kv_lo, start, side="left"), np.searchsorted(kv_hi, end, side="right")
        one = first == last
        return k0, k1, np.where(one, f0, 0), np.where(one, f1, 0)

    def key_ranges(self, seqlen_q, seqlen_k):
        self._check_lengths(seqlen_q, seqlen_k)
        bounds = np.concatenate([[0], np.cumsum(self.seq_lens)]).astype(np.int64)
        doc = np.searchsorted(bounds, np.arange(seqlen_q), side="right") - 1
        return bounds[doc], bounds[doc + 1]

    @property
    def helper_name(self) -> str:
        """The C function cuda_helper() defines (named by the lengths: two documents patterns may meet)."""
        return "document_of_" + format(zlib.crc32(np.asarray(self.seq_lens, dtype=np.int64).tobytes()), "08x")

    def cuda_helper(self) -> str:
        """C: the document starts as a table and a binary search over it, log2(documents) reads per position
        (a sum of one comparison per start cost 64 per element at 64 documents, and its source grew with
        every use). The search runs a fixed number of steps without a branch: code inside a wgmma's flight
        must not diverge, or ptxas serialises the wgmma (C7519)."""
        name, starts = self.helper_name, self._starts
        n = len(starts)
        steps = 1 << (n.bit_length() - 1)     # the search's largest step; its table reads stay below 2 * steps - 1
        padding = [SPAN_MAX_VALUE] * (2 * steps - 1 - n)
        return (f"// {n + 1} documents: a position's document is the number of documents after the first that\n"
                f"// start at or before it. The table is padded with starts no position reaches.\n"
                f"__device__ const int {name}_starts[{n + len(padding)}] = {{{', '.join(map(str, list(starts) + padding))}}};\n"
                f"__device__ __forceinline__ int {name}(int position) {{\n"
                f"    int before = 0;                  // starts known to be at or before position\n"
                f"#pragma unroll\n"
                f"    for (int step = {steps}; step > 0; step /= 2) {{\n"
                f"        if (__ldg(&{name}_starts[before + step - 1]) <= position) before += step;\n"
                f"    }}\n"
                f"    return before;\n"
                f"}}\n"
                f"// The first and the last position of position's document (the last document has no end).\n"
                f"__device__ __forceinline__ int {name}_first(int position) {{\n"
                f"    const int doc = {name}(position);\n"
                f"    return doc == 0 ? 0 : __ldg(&{name}_starts[doc - 1]);\n"
                f"}}\n"
                f"__device__ __forceinline__ int {name}_last(int position) {{\n"
                f"    const int doc = {name}(position);\n"
                f"    return doc == {n} ? SPAN_MAX : __ldg(&{name}_starts[doc]) - 1;\n"
                f"}}\n")

    def _doc_of(self, var: str) -> str:
        """C: the document index of position var (its helper function)."""
        return f"{self.helper_name}({var})"

    def cuda_expr(self):
        if not self._starts:
            return "true"
        return f"({self._doc_of('q_idx')} == {self._doc_of('kv_idx')})"

    def cuda_tile_expr(self):
        if not self._starts:
            return ALWAYS
        doc = self._doc_of
        kept = f"({doc('q_lo')} <= {doc('kv_hi')} && {doc('kv_lo')} <= {doc('q_hi')})"
        full = f"({doc('q_lo')} == {doc('q_hi')} && {doc('kv_lo')} == {doc('kv_hi')} && {doc('q_lo')} == {doc('kv_lo')})"
        return kept, full

    def cuda_spans(self):
        """A position sees its own document, queries and keys alike."""
        if not self._starts:
            return "SPAN_MIN", "SPAN_MAX", "SPAN_MIN", "SPAN_MAX"
        first, last = (f"{self.helper_name}_{end}" for end in ("first", "last"))
        return f"{first}(q_idx)", f"{last}(q_idx)", f"{first}(kv_idx)", f"{last}(kv_idx)"


def _load_layout(source, field: str) -> np.ndarray:
    """A read-only bool [H or 1, nQb, nKb] array from an array or an .npy path."""
    if isinstance(source, (str, Path)):
        path = str(source)
        try:
            source = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty or truncated file
            reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {str(exc)[:100]}"
            raise SpecError(field, path, f"a readable .npy file (reading it failed: {reason})") from None
        if not isinstance(source, np.ndarray):          # an .npz archive opens as a mapping of arrays
            source.close()
            raise SpecError(field, path, "a .npy file holding one array (not an .npz archive)")
    blocks = np.asarray(source)
    zero_one = np.issubdtype(blocks.dtype, np.integer) and np.isin(blocks, (0, 1)).all()
    if blocks.dtype != bool and not zero_one:
        raise SpecError(field, f"array of dtype {blocks.dtype}", "a bool (or 0/1) array")
    if blocks.ndim == 2:
        blocks = blocks[None]
    if blocks.ndim != 3 or 0 in blocks.shape:
        raise SpecError(field, f"array of shape {blocks.shape}", "a non-empty array [H or 1, nQb, nKb]")
    blocks = blocks.astype(bool)
    blocks.setflags(write=False)
    return blocks


@dataclass(frozen=True, eq=False, repr=False, init=False)
class Layout(Pattern):
    """Explicit block layout [H or 1, nQb, nKb] (an array or an .npy path): element visible iff
    its block blocks[h, q_idx // R, kv_idx // C] is kept. Needs nQb = ceil(seqlen_q / R) and
    nKb = ceil(seqlen_k / C). No cuda_expr (the layout is data)."""

    blocks: np.ndarray
    block_size: tuple[int, int]
    path: str | None
    kind = "layout"

    def __init__(self, source, block_size=DEFAULT_BLOCK_SIZE):
        is_path = isinstance(source, (str, Path))
        object.__setattr__(self, "blocks", _load_layout(source, "path" if is_path else "blocks"))
        object.__setattr__(self, "block_size", _block_size(block_size))
        object.__setattr__(self, "path", str(source) if is_path else None)

    @property
    def heads(self):
        return self.blocks.shape[0]

    def _visible(self, h, q_idx, kv_idx, seqlen_q, seqlen_k):
        (rows, cols), (heads, n_q, n_kv) = self.block_size, self.blocks.shape
        if (n_q, n_kv) != (_cdiv(seqlen_q, rows), _cdiv(seqlen_k, cols)):
            raise ValueError(f"layout of {n_q}x{n_kv} blocks of {rows}x{cols} does not cover "
                             f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")
        return self.blocks[h if heads > 1 else 0, q_idx // rows, kv_idx // cols]

    def cuda_expr(self):
        rows, cols = self.block_size
        return f"block_bit(h, q_idx / {rows}, kv_idx / {cols})"

    def cuda_tile_expr(self):
        rows, cols = self.block_size
        bit = f"block_bit(h, q_lo / {rows}, kv_lo / {cols})"
        return bit, bit

    def block_table(self, seqlen_q, seqlen_k):
        (rows, cols), (_, n_q, n_kv) = self.block_size, self.blocks.shape
        if (n_q, n_kv) != (_cdiv(seqlen_q, rows), _cdiv(seqlen_k, cols)):
            raise ValueError(f"layout of {n_q}x{n_kv} blocks of {rows}x{cols} does not cover "
                             f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")
        return self.blocks

    @property
    def table_block_size(self):
        return self.block_size

    def to_dict(self):
        rows, cols = self.block_size
        source = {"path": self.path} if self.path else {"blocks": self.blocks.tolist()}
        return {"kind": self.kind, **source, "block_size": rows if rows == cols else [rows, cols]}

    @property
    def name(self):
        return f"layout_{self.blocks.shape[0]}x{self.blocks.shape[1]}x{self.blocks.shape[2]}"

    def __repr__(self):
        return f"Layout({self.path or 'array'}, shape={self.blocks.shape}, block_size={self.block_size})"


@dataclass(frozen=True)
class And(Pattern):
    """Visible where every part is visible."""

    parts: tuple[Pattern, ...]
    kind = "and"
    _reduce = staticmethod(np.logical_and)
    _c_op = " && "

    def _check(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts or not all(isinstance(p, Pattern) for p in self.parts):
            raise SpecError("of", self.parts, "a non-empty list of patterns")
        if len({p.heads for p in self.parts} - {1}) > 1:
            raise SpecError("of", [p.heads for p in self.parts], "parts with the same number of heads (or 1)")
        tabled = [p.name for p in self.parts if table_parts(p)]
        if len(tabled) > 1 or any(len(table_parts(p)) > 1 for p in self.parts):
            raise SpecError("of", tabled, "at most one part backed by a block table (a layout or BigBird): "
                            "combine such masks as attngen.BlockMask objects instead")

    @property
    def heads(self):
        return max(p.heads for p in self.parts)

    def _visible(self, *args):
        return functools.reduce(self._reduce, (p._visible(*args) for p in self.parts))

    def cuda_expr(self):
        return "(" + self._c_op.join(p.cuda_expr() for p in self.parts) + ")"

    def cuda_tile_expr(self):
        # and: kept if every part may be kept, full if every part is full; or: either, either.
        kept, full = zip(*(p.cuda_tile_expr() for p in self.parts))
        return "(" + self._c_op.join(kept) + ")", "(" + self._c_op.join(full) + ")"

    def cuda_spans(self):
        """An `and` of interval patterns: the intersection of their spans (an `or` has none)."""
        spans = [p.cuda_spans() for p in self.parts]
        if self.kind != "and" or any(s is None for s in spans):
            return None

        def fold(fn, exprs):
            exprs = [e for e in exprs if e not in ("SPAN_MIN", "SPAN_MAX")] or [exprs[0]]
            return functools.reduce(lambda a, b: f"{fn}({a}, {b})", exprs)
        key_lo, key_hi, query_lo, query_hi = zip(*spans)
        return fold("max", key_lo), fold("min", key_hi), fold("max", query_lo), fold("min", query_hi)

    def block_table(self, seqlen_q, seqlen_k):
        tables = [t for t in (p.block_table(seqlen_q, seqlen_k) for p in self.parts) if t is not None]
        return tables[0] if tables else None

    def row_ranges(self, seqlen_q, seqlen_k, block_size):
        """An `and` of interval patterns: the intersection of the kept ranges, and of the full ones (an
        `or` is no range: None)."""
        if self.kind != "and":
            return None
        ranges = [p.row_ranges(seqlen_q, seqlen_k, block_size) for p in self.parts]
        if any(r is None for r in ranges) or self.heads != 1:
            return None
        k0, k1, f0, f1 = (np.stack(a) for a in zip(*ranges))
        k0, k1 = k0.max(axis=0), k1.min(axis=0)
        f0, f1 = np.maximum(f0.max(axis=0), k0), np.minimum(f1.min(axis=0), k1)
        return k0, k1, f0, np.maximum(f1, f0)

    def key_ranges(self, seqlen_q, seqlen_k):
        if self.kind != "and":
            return None
        ranges = [p.key_ranges(seqlen_q, seqlen_k) for p in self.parts]
        if any(r is None for r in ranges):
            return None
        return np.max([r[0] for r in ranges], axis=0), np.min([r[1] for r in ranges], axis=0)

    def _undecided(self, seqlen_q, seqlen_k, block_size, rows, cols, full):
        """Partial entries that two or more parts leave partial (one partial part among full ones decides)."""
        partial_parts = np.zeros(rows.size, dtype=np.int8)
        for part in self.parts:
            _, _, f0, f1 = part.row_ranges(seqlen_q, seqlen_k, block_size)
            partial_parts += ~((cols >= f0[rows]) & (cols < f1[rows]))
        return ~full & (partial_parts >= 2)

    def block_grid(self, seqlen_q, seqlen_k, block_size):
        """From the parts' exact grids: and is empty where a part is, full where all are, and where all but
        one part are full it is that part; or the mirror image. Only blocks that two or more parts leave
        partial are decided by their elements (few: where two boundaries cross)."""
        block_size = _block_size(block_size)
        grids = [p.block_grid(seqlen_q, seqlen_k, block_size) for p in self.parts]
        shape = (self.heads,) + grids[0][0].shape[1:]
        kept = [np.broadcast_to(k, shape) for k, _ in grids]
        full = [np.broadcast_to(f, shape) for _, f in grids]
        partial_count = sum((k & ~f).astype(np.int8) for k, f in zip(kept, full))
        if self.kind == "and":
            result_kept, result_full = np.logical_and.reduce(kept), np.logical_and.reduce(full)
        else:
            result_kept, result_full = np.logical_or.reduce(kept), np.logical_or.reduce(full)
        # and: a full part does not change the rest; or: an empty part does not.
        undecided = (partial_count >= 2) & (result_kept & ~result_full)
        if undecided.any():
            result_kept, result_full = result_kept.copy(), result_full.copy()
            heads, i, j = np.nonzero(undecided)
            result_kept[heads, i, j], result_full[heads, i, j] = _block_elements(
                self, seqlen_q, seqlen_k, block_size, heads, i, j)
        return result_kept, result_full

    @property
    def table_block_size(self):
        sizes = [p.table_block_size for p in self.parts if p.table_block_size is not None]
        return sizes[0] if sizes else None

    def to_dict(self):
        return {"kind": self.kind, "of": [p.to_dict() for p in self.parts]}

    @property
    def name(self):
        return f"_{self.kind}_".join(p.name for p in self.parts)


@dataclass(frozen=True)
class Or(And):
    """Visible where any part is visible."""

    kind = "or"
    _reduce = staticmethod(np.logical_or)
    _c_op = " || "


def helper_parts(pattern: Pattern | None) -> list[Pattern]:
    """The parts of a pattern whose expressions call a helper of their own (cuda_helper: the documents),
    each once."""
    found = {}

    def visit(p):
        if isinstance(p, _Composite):
            visit(p._equivalent())
        elif isinstance(p, And):                          # and Or
            for part in p.parts:
                visit(part)
        elif isinstance(p, Document) and p._starts:
            found.setdefault(p.helper_name, p)
    if pattern is not None:
        visit(pattern)
    return list(found.values())


def cuda_helpers(pattern: Pattern | None) -> str:
    """The C definitions a pattern's expressions call besides the kernel's own, each once; "" for none."""
    return "\n".join(p.cuda_helper() for p in helper_parts(pattern))


def table_parts(pattern: Pattern) -> list[Pattern]:
    """The parts of a pattern backed by a block table (Layout, BigBird's random blocks)."""
    if isinstance(pattern, _Composite):
        return table_parts(pattern._equivalent())
    if isinstance(pattern, And):
        return [t for p in pattern.parts for t in table_parts(p)]
    return [pattern] if isinstance(pattern, (Layout, _RandomBlocks)) else []


def _operands(cls, pattern) -> tuple[Pattern, ...]:
    """The parts to join: a pattern of the same combinator is flattened."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"cannot combine a Pattern with {type(pattern).__name__}")
    return pattern.parts if type(pattern) is cls else (pattern,)


PATTERNS = {cls.kind: cls for cls in
            (Causal, SlidingWindow, Longformer, BigBird, Strided, Fixed, Dilated, Document, Layout, And, Or)}


def pattern_from_dict(data, field: str = "mask") -> Pattern:
    """Build a pattern from the spec's ``mask:`` mapping; SpecError names e.g. 'mask.left'."""
    if not isinstance(data, dict):
        raise SpecError(field, data, "a mapping with a 'kind' key")
    kind = data.get("kind")
    if kind not in PATTERNS:
        raise SpecError(f"{field}.kind", kind, " | ".join(PATTERNS))
    cls, params = PATTERNS[kind], {k: v for k, v in data.items() if k != "kind"}
    if cls in (And, Or):
        keys, required = {"of"}, {"of"}
    elif cls is Layout:
        keys, required = {"path", "block_size"}, {"path"}
    else:
        fields = dataclasses.fields(cls)
        keys = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
    for key in params:
        if key not in keys:
            allowed = f"a key of kind {kind}: " + ", ".join(sorted(keys))
            raise SpecError(f"{field}.{key}", params[key], allowed)
    for key in sorted(required - set(params)):
        raise SpecError(f"{field}.{key}", None, f"required for kind {kind}")
    if cls in (And, Or):
        parts = params["of"]
        if not isinstance(parts, list) or not parts:
            raise SpecError(f"{field}.of", parts, "a non-empty list of mask mappings")
        return cls(tuple(pattern_from_dict(p, f"{field}.of[{i}]") for i, p in enumerate(parts)))
    if cls is Layout:
        params["source"] = params.pop("path")
        if not isinstance(params["source"], str):
            raise SpecError(f"{field}.path", params["source"], "a path to an .npy file")
    try:
        return cls(**params)
    except SpecError as exc:
        raise SpecError(f"{field}.{exc.field}", exc.value, exc.allowed) from None


# ----------------------------------------------------------------------------- block masks


def _csr(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 (row_ptr [H*rows + 1], cols ascending within a row) of a bool [H, rows, cols] grid."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    row_ptr = np.concatenate([[0], np.cumsum(flat.sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(flat)[1].astype(np.int32)
    for arr in (row_ptr, cols):
        arr.setflags(write=False)
    return row_ptr, cols


def _repeat_csr(row_ptr, cols, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """One head's CSR repeated for num_heads heads (rows h * nQb + i)."""
    if num_heads == 1:
        return row_ptr, cols
    nnz = int(row_ptr[-1])
    ptr = np.concatenate([[0]] + [row_ptr[1:] + h * nnz for h in range(num_heads)]).astype(np.int32)
    cols = np.tile(cols, num_heads).astype(np.int32)
    for arr in (ptr, cols):
        arr.setflags(write=False)
    return ptr, cols


def _transpose_csr(row_ptr, cols, shape) -> tuple[np.ndarray, np.ndarray]:
    """kv-major (col_ptr [H*nKb + 1], rows ascending per column) of a query-major block CSR, sparse."""
    heads, n_q, n_kv = shape
    rows = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
    head, q_block = rows // n_q, rows % n_q
    column = head * n_kv + np.asarray(cols, dtype=np.int64)
    order = np.lexsort((q_block, column))
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(column, minlength=heads * n_kv))]).astype(np.int32)
    q_rows = q_block[order].astype(np.int32)
    for arr in (col_ptr, q_rows):
        arr.setflags(write=False)
    return col_ptr, q_rows


def _reduce_blocks(fn, num_heads, seqlen_q, seqlen_k, block_size):
    """Bool (kept, full) [H, nQb, nKb] of a predicate fn(h, q_idx, kv_idx): kept where any element
    is visible, full where every in-range element is. Evaluates CHUNK_ELEMENTS at a time."""
    rows, cols = block_size
    shape = (num_heads, _cdiv(seqlen_q, rows), _cdiv(seqlen_k, cols))
    kept, full = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    span = max(1, CHUNK_ELEMENTS // (rows * cols)) * cols   # kv columns per evaluation: whole blocks
    for h in range(num_heads):
        for i in range(shape[1]):
            q_idx = np.arange(i * rows, min((i + 1) * rows, seqlen_q))[:, None]
            for k0 in range(0, seqlen_k, span):
                kv_idx = np.arange(k0, min(k0 + span, seqlen_k))[None, :]
                result = np.asarray(fn(h, q_idx, kv_idx))
                if result.dtype != np.bool_:   # e.g. q_idx - kv_idx: nonzero reads as True, keeping every block
                    raise TypeError(f"fn: the predicate returned dtype {result.dtype}; allowed: bool (write it as "
                                    "a comparison, e.g. q_idx >= kv_idx)")
                visible = np.broadcast_to(result, (q_idx.size, kv_idx.size))
                starts = np.arange(0, kv_idx.size, cols)
                blocks = slice(k0 // cols, k0 // cols + starts.size)
                kept[h, i, blocks] = np.logical_or.reduceat(visible.any(axis=0), starts)
                full[h, i, blocks] = np.logical_and.reduceat(visible.all(axis=0), starts)
    return kept, full


@dataclass(frozen=True)
class KVMajorCSR:
    """Block-CSR by kv block (for the backward): entry h * n_kv_blocks + j of the col_ptr arrays
    bounds the query blocks (ascending) of kv block j of head h."""

    partial_col_ptr: np.ndarray
    partial_rows: np.ndarray
    full_col_ptr: np.ndarray
    full_rows: np.ndarray


class BlockMask:
    """A mask at R x C block granularity, as block-CSR with partial and full blocks apart.

    Read-only attributes: block_size (R, C); seqlen_q, seqlen_k; num_heads (H, or 1 shared across
    heads); pattern (the Pattern it came from, or None); int32 partial_row_ptr [H*nQb + 1] and
    partial_cols, full_row_ptr and full_cols: row h*nQb + i lists the kv blocks of query block i of
    head h, ascending. Full blocks have every in-range element visible (no element masking: a kernel
    with a mask_mod skips it there, as FlexAttention does); partial blocks need the element predicate,
    which the mask remembers (see element_mask()), and a kernel's mask_mod if it has one.
    partial_predicate says what decides visibility inside partial blocks: None (every element of a kept
    block is visible: from_dense), a Pattern (a kernel evaluates it as code) or a Python function
    (from_predicate: no kernel can evaluate it; see kernel_predicate()).
    Build with from_dense, from_predicate or from_pattern; combine with & and |.
    """

    def __init__(self, kept, full, *, seqlen_q, seqlen_k, block_size=DEFAULT_BLOCK_SIZE,
                 element=None, pattern=None, partial_predicate=None, csr=None):
        """kept, full: bool [H, nQb, nKb] with full implying kept; or kept = full = None and
        csr = (partial_row_ptr, partial_cols, full_row_ptr, full_cols, (H, nQb, nKb)), in which case the
        block grids are only built if something asks for them (a long sequence's grid is large; the CSR
        holds only the kept blocks). element(h, q_idx, kv_idx) -> bool (default: every element of a kept
        block is visible); partial_predicate: the Pattern or Python function `element` amounts to inside
        partial blocks (None: the default element)."""
        self.block_size = _block_size(block_size)
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k
        self.pattern = pattern
        self.partial_predicate = partial_predicate
        self._grids = {}                   # "kept" / "full": the dense block grids, built on first use
        if csr is None:
            kept, full = np.array(kept, dtype=bool), np.array(full, dtype=bool)
            for arr in (kept, full):
                arr.setflags(write=False)
            self._grids.update(kept=kept, full=full)
            self._shape = kept.shape
            self.partial_row_ptr, self.partial_cols = _csr(kept & ~full)
            self.full_row_ptr, self.full_cols = _csr(full)
        else:
            self.partial_row_ptr, self.partial_cols, self.full_row_ptr, self.full_cols, self._shape = csr
        self.num_heads = self._shape[0]
        if not len(self.partial_cols):     # no partial blocks: the element is the block lookup itself
            self.partial_predicate = None
        self._element = element or self._block_lookup
        self._frozen = True

    @property
    def _kept(self) -> np.ndarray:
        if "kept" not in self._grids:
            self._grids["kept"] = self._grid(self.partial_row_ptr, self.partial_cols) | self._full
        return self._grids["kept"]

    @property
    def _full(self) -> np.ndarray:
        if "full" not in self._grids:
            self._grids["full"] = self._grid(self.full_row_ptr, self.full_cols)
        return self._grids["full"]

    def _grid(self, row_ptr, cols) -> np.ndarray:
        grid = np.zeros(self._shape, dtype=bool)
        rows = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
        grid.reshape(-1, self._shape[2])[rows, cols] = True
        grid.setflags(write=False)
        return grid

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"BlockMask is read-only; cannot set {name!r}")
        super().__setattr__(name, value)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, blocks, seqlen_q: int, seqlen_k: int, block_size=DEFAULT_BLOCK_SIZE,
                   full=None) -> BlockMask:
        """Kept blocks from bool [H or 1, nQb, nKb] (or [nQb, nKb]); partial unless ``full`` marks them.
        A partial block of a dense mask is visible everywhere inside (the kernel masks only tails)."""
        seqlen_q, seqlen_k = _seqlens(seqlen_q, seqlen_k)
        block_size = _block_size(block_size)
        kept = _dense_blocks(blocks, "blocks", seqlen_q, seqlen_k, block_size)
        if full is None:
            full = np.zeros_like(kept)
        full = _dense_blocks(full, "full", seqlen_q, seqlen_k, block_size)
        try:
            full = np.broadcast_to(full, kept.shape)
        except ValueError:
            raise ValueError(f"full must have the shape of blocks {kept.shape}, got {full.shape}") from None
        if (full & ~kept).any():
            raise ValueError("full marks blocks that blocks does not keep")
        return cls(kept, full, seqlen_q=seqlen_q, seqlen_k=seqlen_k, block_size=block_size)

    @classmethod
    def from_predicate(cls, fn, seqlen_q: int, seqlen_k: int, num_heads: int = 1,
                       block_size=DEFAULT_BLOCK_SIZE) -> BlockMask:
        """Reduce a vectorised predicate fn(h, q_idx, kv_idx) -> bool to blocks: kept where any
        element is visible, full where every in-range element is. Evaluated on at most one block row
        and a few thousand keys at a time, never Sq x Sk."""
        seqlen_q, seqlen_k = _seqlens(seqlen_q, seqlen_k)
        num_heads = _int_at_least("num_heads", num_heads, 1)
        block_size = _block_size(block_size)
        kept, full = _reduce_blocks(fn, num_heads, seqlen_q, seqlen_k, block_size)
        element = lambda h, q_idx, kv_idx: np.broadcast_to(  # noqa: E731
            fn(h, q_idx, kv_idx), np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))
        return cls(kept, full, seqlen_q=seqlen_q, seqlen_k=seqlen_k, block_size=block_size, element=element,
                   partial_predicate=fn)

    @classmethod
    def from_pattern(cls, pattern: Pattern, seqlen_q: int, seqlen_k: int, num_heads: int | None = None,
                     block_size=DEFAULT_BLOCK_SIZE) -> BlockMask:
        """A pattern's block mask; num_heads defaults to pattern.heads. A head-independent pattern is
        evaluated once and shared by every head."""
        num_heads = pattern.heads if num_heads is None else num_heads
        if pattern.heads not in (1, num_heads):
            raise ValueError(f"pattern {pattern.name} has {pattern.heads} heads, num_heads={num_heads}")
        seqlen_q, seqlen_k = _seqlens(seqlen_q, seqlen_k)
        block_size = _block_size(block_size)
        element = lambda h, q_idx, kv_idx: pattern.element(h, q_idx, kv_idx, seqlen_q, seqlen_k)  # noqa: E731
        common = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k, block_size=block_size, element=element,
                      pattern=pattern, partial_predicate=pattern)
        entries = pattern.block_entries(seqlen_q, seqlen_k, block_size)   # causal, windows, documents, and of them
        if entries is not None:
            shape = (num_heads, _cdiv(seqlen_q, block_size[0]), _cdiv(seqlen_k, block_size[1]))
            csr = tuple(x for ptr, cols in zip(entries[::2], entries[1::2]) for x in _repeat_csr(ptr, cols, num_heads))
            return cls(None, None, csr=(*csr, shape), **common)
        kept, full = pattern.block_grid(seqlen_q, seqlen_k, block_size)     # closed form where there is one
        kept, full = (np.broadcast_to(a, (num_heads,) + a.shape[1:]) for a in (kept, full))
        return cls(kept, full, **common)

    # ---- combination --------------------------------------------------------------------------------
    def _combine(self, other: BlockMask, op) -> BlockMask:
        if not isinstance(other, BlockMask):
            return NotImplemented
        mine = (self.seqlen_q, self.seqlen_k, self.block_size)
        theirs = (other.seqlen_q, other.seqlen_k, other.block_size)
        if mine != theirs or len({self.num_heads, other.num_heads} - {1}) > 1:
            raise ValueError(f"cannot combine masks of (seqlen_q, seqlen_k, block_size, heads) "
                             f"{mine + (self.num_heads,)} and {theirs + (other.num_heads,)}")
        # and: kept if both kept, full if both full; or: kept if either kept, full if either full.
        element = lambda h, q_idx, kv_idx: op(self._head_element(h, q_idx, kv_idx),  # noqa: E731
                                              other._head_element(h, q_idx, kv_idx))
        pattern = op(self.pattern, other.pattern) if self.pattern and other.pattern else None
        mine, theirs = self.partial_predicate, other.partial_predicate
        heads = max(self.num_heads, other.num_heads)
        full_self, full_other = self._block_keys("full", heads), other._block_keys("full", heads)
        if mine is None and theirs is None:
            predicate = None
        elif mine is None or theirs is None:
            # One side's kept blocks are visible everywhere: inside them the result is the other side's
            # predicate (and), or everything (or: those blocks become full, so no predicate runs there).
            predicate = theirs if mine is None else mine
            if op is operator.or_:
                if mine is None:
                    full_self = self._block_keys("kept", heads)
                else:
                    full_other = other._block_keys("kept", heads)
        elif isinstance(mine, Pattern) and isinstance(theirs, Pattern):
            predicate = op(mine, theirs)
        else:
            predicate = element          # a Python function on either side: so is the result
        # the block sets as sorted keys (h * nQb + i) * nKb + j: no block grid, however long the sequences
        merge = np.intersect1d if op is operator.and_ else np.union1d
        kept = merge(self._block_keys("kept", heads), other._block_keys("kept", heads))
        full = merge(full_self, full_other)
        shape = (heads,) + self._shape[1:]
        csr = tuple(x for keys in (np.setdiff1d(kept, full), full)
                    for x in _csr_of_entries(keys // shape[2], keys % shape[2], heads * shape[1]))
        return BlockMask(None, None, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, block_size=self.block_size,
                         element=element, pattern=pattern, partial_predicate=predicate, csr=(*csr, shape))

    def _block_keys(self, which: str, heads: int) -> np.ndarray:
        """Sorted int64 keys (h * nQb + i) * nKb + j of the kept ("kept") or full ("full") blocks, a
        one-head mask repeated for `heads` heads."""
        pairs = [(self.full_row_ptr, self.full_cols)]
        if which == "kept":
            pairs.append((self.partial_row_ptr, self.partial_cols))
        keys = np.concatenate([np.repeat(np.arange(ptr.size - 1, dtype=np.int64), np.diff(ptr)) * self.n_kv_blocks
                               + cols for ptr, cols in pairs])
        if self.num_heads == 1 and heads > 1:
            per_head = self.n_q_blocks * self.n_kv_blocks
            keys = np.concatenate([keys + h * per_head for h in range(heads)])
        return np.sort(keys)

    def __and__(self, other):
        return self._combine(other, operator.and_)

    def __or__(self, other):
        return self._combine(other, operator.or_)

    # ---- queries ------------------------------------------------------------------------------------
    @property
    def n_q_blocks(self) -> int:
        return self._shape[1]

    @property
    def n_kv_blocks(self) -> int:
        return self._shape[2]

    def kept_blocks(self) -> np.ndarray:
        """Bool [H, nQb, nKb]: blocks with any visible element (partial or full)."""
        return self._kept.copy()

    def full_blocks(self) -> np.ndarray:
        """Bool [H, nQb, nKb]: blocks whose in-range elements are all visible."""
        return self._full.copy()

    def counts(self) -> dict:
        partial, full = len(self.partial_cols), len(self.full_cols)
        return dict(kept=partial + full, partial=partial, full=full, total=int(np.prod(self._shape)))

    @property
    def density(self) -> float:
        """Kept blocks over all blocks of the grid (H * nQb * nKb)."""
        c = self.counts()
        return c["kept"] / c["total"]

    def element_mask(self, q_range=None, kv_range=None) -> np.ndarray:
        """Bool [H, Sq, Sk] of visible elements, or the [H, q_stop - q_start, kv_stop - kv_start]
        region given by q_range=(q_start, q_stop) and kv_range."""
        q0, q1 = q_range or (0, self.seqlen_q)
        k0, k1 = kv_range or (0, self.seqlen_k)
        q_idx, kv_idx = np.arange(q0, q1)[:, None], np.arange(k0, k1)[None, :]
        return np.stack([np.broadcast_to(self._element(h, q_idx, kv_idx), (q1 - q0, k1 - k0))
                         for h in range(self.num_heads)])

    def kernel_predicate(self):
        """The Pattern a kernel must evaluate inside this mask's partial blocks to compute exactly
        element_mask(), or None when no element predicate is needed (no partial blocks, or partial blocks
        visible everywhere). ValueError when the predicate cannot become code (a Python function, or a
        pattern backed by a block table), saying how to express the mask instead."""
        predicate = self.partial_predicate       # None already when there is no partial block (__init__)
        if predicate is None:
            return None
        if not isinstance(predicate, Pattern):
            raise ValueError(
                "block_mask: its partial blocks need the element predicate of a Python function "
                "(BlockMask.from_predicate), which a kernel cannot evaluate; build the mask with "
                "BlockMask.from_pattern (patterns combine with & and |), or build a spec with "
                "mask: {kind: runtime} and the predicate as its mask_mod")
        if table_parts(predicate):
            raise ValueError(f"block_mask: its partial blocks need the element predicate of {predicate.name}, "
                             "which reads a block table; build a spec with that pattern as its mask instead")
        return predicate

    def transposed(self) -> KVMajorCSR:
        """The same blocks as kv-major CSR (per head, per kv block: query blocks ascending)."""
        partial_ptr, partial_rows = _transpose_csr(self.partial_row_ptr, self.partial_cols, self._shape)
        full_ptr, full_rows = _transpose_csr(self.full_row_ptr, self.full_cols, self._shape)
        return KVMajorCSR(partial_ptr, partial_rows, full_ptr, full_rows)

    def _head_element(self, h, q_idx, kv_idx):
        return self._element(h if self.num_heads > 1 else 0, q_idx, kv_idx)

    def _block_lookup(self, h, q_idx, kv_idx):
        rows, cols = self.block_size
        return self._kept[h, q_idx // rows, kv_idx // cols]

    def block_map(self, head: int = 0, size: int = 16) -> str:
        """The first size x size blocks of a head: '#' full, '+' partial, '.' empty."""
        corner = slice(head * self.n_q_blocks, head * self.n_q_blocks + min(size, self.n_q_blocks))
        kept, full = (self._grid_rows(ptr, cols, corner)[:, :size] for ptr, cols in (
            (self.partial_row_ptr, self.partial_cols), (self.full_row_ptr, self.full_cols)))
        kept = kept | full
        chars = np.where(full, "#", np.where(kept, "+", "."))
        return "\n".join("".join(row) for row in chars)

    def _grid_rows(self, row_ptr, cols, rows: slice) -> np.ndarray:
        """Bool [rows, nKb] of some CSR rows, without the whole grid."""
        out = np.zeros((rows.stop - rows.start, self.n_kv_blocks), dtype=bool)
        for r in range(rows.start, rows.stop):
            out[r - rows.start, cols[row_ptr[r]:row_ptr[r + 1]]] = True
        return out

    def __str__(self):
        c, (rows, cols) = self.counts(), self.block_size
        source = self.pattern.name if self.pattern else "explicit"
        return (f"BlockMask {source}: {self.num_heads} head(s), seqlen_q={self.seqlen_q}, "
                f"seqlen_k={self.seqlen_k}, blocks {rows}x{cols} ({self.n_q_blocks}x{self.n_kv_blocks})\n"
                f"density {self.density:.4f}: kept {c['kept']} of {c['total']} blocks "
                f"(partial {c['partial']}, full {c['full']})\n"
                f"head 0, first blocks ('#' full, '+' partial, '.' empty):\n{self.block_map()}")

    def __repr__(self):
        return (f"BlockMask(num_heads={self.num_heads}, seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
                f"block_size={self.block_size}, density={self.density:.4f})")


def _seqlens(seqlen_q, seqlen_k) -> tuple[int, int]:
    return _int_at_least("seqlen_q", seqlen_q, 1), _int_at_least("seqlen_k", seqlen_k, 1)


def _dense_blocks(blocks, name, seqlen_q, seqlen_k, block_size) -> np.ndarray:
    """Validate a bool block grid [H or 1, nQb, nKb] (a 2-D grid gets H = 1)."""
    arr = np.asarray(blocks)
    if arr.dtype != bool:
        raise TypeError(f"{name} must be a bool array, got dtype {arr.dtype}")
    arr = arr[None] if arr.ndim == 2 else arr
    expected = (_cdiv(seqlen_q, block_size[0]), _cdiv(seqlen_k, block_size[1]))
    if arr.ndim != 3 or arr.shape[1:] != expected or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape [H or 1, {expected[0]}, {expected[1]}] for seqlen_q="
                         f"{seqlen_q}, seqlen_k={seqlen_k}, block_size={block_size}, got {arr.shape}")
    return arr


def check_kernel_pattern(pattern: Pattern, block_size) -> None:
    """SpecError unless the kernel can evaluate the pattern on tiles dividing ``block_size``: a part
    backed by a block table must use the mask's block size (the planner then makes the kernel's tiles
    divide it, so a tile lies inside one table block)."""
    size = pattern.table_block_size
    if size is not None and tuple(size) != tuple(_block_size(block_size)):
        raise SpecError("mask.block_size", list(block_size), f"the block size of the mask's block table, {list(size)}")
