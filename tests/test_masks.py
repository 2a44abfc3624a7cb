"""CPU tests of attngen/masks.py (patterns, BlockMask) and of the references' mask= keyword."""

from __future__ import annotations

import ast
import functools
import math
import re
import time
import tracemalloc

import numpy as np
import pytest
from conftest import no_float_warnings

import attngen.masks as masks
import attngen.tools.reference as reference
from attngen.errors import SpecError
from attngen.masks import (
    And, BigBird, BlockMask, Causal, Dilated, Document, Fixed, Layout, Longformer, Or, SlidingWindow,
    Strided, cuda_helpers, helper_parts, pattern_from_dict, SPAN_MAX_VALUE,
)
from attngen.tools.reference import attention_reference, attention_same_dtype_reference, attention_tiled

SEQLEN_PAIRS = [(1, 1), (17, 17), (113, 113), (203, 203), (17, 203), (203, 17), (1, 113), (113, 1)]

GENERAL_PATTERNS = [
    Causal(),
    SlidingWindow(5), SlidingWindow(3, 7), SlidingWindow(40, 2),
    Longformer(8, (5, 0, 3, 4)), Longformer(31),
    BigBird(3, (0,), 2, 16, 0), BigBird(1, (), 3, 32, 7),
    Strided(4), Strided(16),
    Fixed(8, 2), Fixed(5, 5),
    Dilated(4, 3), Dilated(10),
    SlidingWindow(3, 7) & Strided(4),
    Fixed(8, 2) | Dilated(6, 5),
    Longformer(6, (1,)) | BigBird(1, (), 1, 16, 3),
]


def doc_lens(n: int, seed: int) -> tuple[int, ...]:
    """Random document lengths summing to n."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 4), replace=False)) if n > 1 else []
    return tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [n]])))


def random_layout(seed, heads, seqlen_q, seqlen_k, block_size=(16, 8), density=0.4) -> Layout:
    rng = np.random.default_rng(seed)
    shape = (heads, math.ceil(seqlen_q / block_size[0]), math.ceil(seqlen_k / block_size[1]))
    return Layout(rng.random(shape) < density, block_size)


def _cases():
    """(pattern, heads, seqlen_q, seqlen_k) for every pattern at every shape it allows."""
    cases = [pytest.param(p, 1, sq, sk, id=f"{p.name}-{sq}x{sk}")
             for p in GENERAL_PATTERNS for sq, sk in SEQLEN_PAIRS]
    cases += [pytest.param(Document(doc_lens(n, n)), 1, n, n, id=f"document-{n}")
              for n in (1, 17, 113, 203)]
    cases += [pytest.param(Document(doc_lens(n, n + 1)) & Causal(), 1, n, n, id=f"document_and_causal-{n}")
              for n in (17, 113, 203)]
    cases += [pytest.param(Document(doc_lens(n, n + 2)) & SlidingWindow(9, 3), 1, n, n,
                           id=f"document_and_window-{n}") for n in (113, 203)]
    cases += [pytest.param(SlidingWindow(30) & Causal() & SlidingWindow(50, 4), 1, sq, sk, id=f"windows-{sq}x{sk}")
              for sq, sk in ((203, 203), (17, 203), (203, 17))]
    cases += [pytest.param(random_layout(i, 3, sq, sk), 3, sq, sk, id=f"layout-{sq}x{sk}")
              for i, (sq, sk) in enumerate(SEQLEN_PAIRS)]
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------- brute force


@functools.lru_cache(maxsize=None)
def random_kv_blocks(seed, count, n_q_blocks, n_kv_blocks):
    """BigBird's documented draw: default_rng(seed); one rng.choice per query block, in order."""
    rng = np.random.default_rng(seed)
    return [set(rng.choice(n_kv_blocks, size=min(count, n_kv_blocks), replace=False).tolist())
            for _ in range(n_q_blocks)]


def document_of(seq_lens, position):
    end = 0
    for doc, length in enumerate(seq_lens):
        end += length
        if position < end:
            return doc
    raise AssertionError(position)


def brute_visible(p, h, q, kv, sq, sk) -> bool:
    """One element, straight from each pattern's definition."""
    a = q + sk - sq           # the query's aligned position
    d = a - kv                # how far the key lies behind it
    if isinstance(p, Or):
        return any(brute_visible(part, h, q, kv, sq, sk) for part in p.parts)
    if isinstance(p, And):
        return all(brute_visible(part, h, q, kv, sq, sk) for part in p.parts)
    if isinstance(p, Causal):
        return kv <= a
    if isinstance(p, SlidingWindow):
        return -p.left <= kv - a <= p.right
    if isinstance(p, Longformer):
        return abs(d) <= p.window // 2 or a in p.global_tokens or kv in p.global_tokens
    if isinstance(p, BigBird):
        bs = p.block_size
        table = random_kv_blocks(p.seed, p.random_blocks, math.ceil(sq / bs), math.ceil(sk / bs))
        return (abs(a // bs - kv // bs) <= p.window // 2 or a in p.global_tokens
                or kv in p.global_tokens or kv // bs in table[q // bs])
    if isinstance(p, Strided):
        return d >= 0 and (d < p.stride or d % p.stride == 0)
    if isinstance(p, Fixed):
        s = p.stride
        return 0 <= kv <= a and (kv // s == a // s or kv % s >= s - p.summary)
    if isinstance(p, Dilated):
        return 0 <= d <= p.window * p.dilation and d % p.dilation == 0
    if isinstance(p, Document):
        return document_of(p.seq_lens, q) == document_of(p.seq_lens, kv)
    if isinstance(p, Layout):
        rows, cols = p.block_size
        return bool(p.blocks[h if p.blocks.shape[0] > 1 else 0, q // rows, kv // cols])
    raise AssertionError(p)


@functools.lru_cache(maxsize=None)
def brute_mask(p, heads, sq, sk) -> np.ndarray:
    out = np.array([[[brute_visible(p, h, q, kv, sq, sk) for kv in range(sk)] for q in range(sq)]
                    for h in range(heads)], dtype=bool).reshape(heads, sq, sk)
    out.setflags(write=False)
    return out


def brute_blocks(elements, block_size):
    """(kept, full) per block by slicing: any element visible / every in-range element visible."""
    (rows, cols), (heads, sq, sk) = block_size, elements.shape
    shape = (heads, math.ceil(sq / rows), math.ceil(sk / cols))
    kept, full = np.zeros(shape, bool), np.zeros(shape, bool)
    for h, i, j in np.ndindex(*shape):
        block = elements[h, i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
        kept[h, i, j], full[h, i, j] = block.any(), block.all()
    return kept, full


def grid(heads, sq, sk):
    """Index arrays h [H,1,1], q_idx [1,Sq,1], kv_idx [1,1,Sk]."""
    return np.arange(heads)[:, None, None], np.arange(sq)[None, :, None], np.arange(sk)[None, None, :]


def check_csr(mask: BlockMask):
    """Block-CSR invariants, and that the CSR arrays hold exactly kept_blocks / full_blocks."""
    heads, nq, nk = mask.num_heads, mask.n_q_blocks, mask.n_kv_blocks
    assert (nq, nk) == (math.ceil(mask.seqlen_q / mask.block_size[0]),
                        math.ceil(mask.seqlen_k / mask.block_size[1]))
    dense = []
    for ptr, cols in ((mask.partial_row_ptr, mask.partial_cols), (mask.full_row_ptr, mask.full_cols)):
        assert ptr.dtype == cols.dtype == np.int32
        assert ptr.shape == (heads * nq + 1,) and ptr[0] == 0 and ptr[-1] == cols.size
        assert np.all(np.diff(ptr) >= 0)
        blocks = np.zeros((heads * nq, nk), bool)
        for r in range(heads * nq):
            row = cols[ptr[r]:ptr[r + 1]]
            assert np.all(np.diff(row) > 0) and np.all((row >= 0) & (row < nk))
            blocks[r, row] = True
        dense.append(blocks.reshape(heads, nq, nk))
    partial, full = dense
    assert not (partial & full).any()
    np.testing.assert_array_equal(partial | full, mask.kept_blocks())
    np.testing.assert_array_equal(full, mask.full_blocks())
    c = mask.counts()
    assert (c["kept"], c["partial"], c["full"], c["total"]) == (
        (partial | full).sum(), partial.sum(), full.sum(), heads * nq * nk)
    kv_major = mask.transposed()          # the dK/dV pass's layout: per kv block, its query blocks ascending
    for ptr, rows, blocks in ((kv_major.partial_col_ptr, kv_major.partial_rows, partial),
                              (kv_major.full_col_ptr, kv_major.full_rows, full)):
        assert ptr.dtype == rows.dtype == np.int32 and ptr.shape == (heads * nk + 1,)
        for h in range(heads):
            for j in range(nk):
                column = rows[ptr[h * nk + j]:ptr[h * nk + j + 1]]
                np.testing.assert_array_equal(column, np.nonzero(blocks[h, :, j])[0])
    assert mask.density == pytest.approx(c["kept"] / c["total"])


# ----------------------------------------------------------------------------- C evaluator

_C_NAMES = ("h", "q_idx", "kv_idx", "seqlen_q", "seqlen_k")
_BINOPS = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply,
           ast.FloorDiv: np.floor_divide, ast.Mod: np.mod}
_COMPARE = {ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal,
            ast.Eq: np.equal}


def eval_c_expr(expr: str, env: dict, shape) -> np.ndarray:
    """Evaluate a C++ boolean expression vectorised over int arrays, with C semantics.

    Accepts only what masks.py emits: && || (short-circuit), + - * / %, < <= > >= ==, ints, true,
    false, the five names. && / || become Python and / or (same relative precedence, both below
    comparisons); a chained comparison (which C would not chain) is rejected. / and % must see a
    non-negative dividend and a positive divisor wherever short-circuiting lets them run, so
    floor division equals C's truncating division there.
    """
    assert re.fullmatch(r"[A-Za-z_0-9\s()+\-*/%<>=&|,]*", expr), expr
    py = expr.replace("&&", " and ").replace("||", " or ").replace("/", "//")
    env = dict(env, true=np.True_, false=np.False_)

    def ints(x):
        return np.asarray(x).astype(np.int64)

    def ev(node, active):
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            acc = np.full(shape, is_and)
            for value in node.values:
                runs = active & (acc if is_and else ~acc)        # short circuit
                result = np.broadcast_to(ev(value, runs) != 0, shape)
                acc = acc & result if is_and else acc | result
            return acc
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ints(ev(node.left, active)), ints(ev(node.right, active))
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)):
                ok = (left >= 0) & (right > 0)
                assert np.all(ok | ~active), f"/ or % on a negative operand in {expr}"
                right = np.where(right > 0, right, 1)
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            assert len(node.ops) == 1 and type(node.ops[0]) in _COMPARE, ast.dump(node)
            left, right = ints(ev(node.left, active)), ints(ev(node.comparators[0], active))
            return _COMPARE[type(node.ops[0])](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in env:
            args = [np.broadcast_to(ints(ev(a, active)), shape) for a in node.args]
            return env[node.func.id](active, *args)
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return np.int64(node.value)
        raise ValueError(f"unsupported C construct {ast.dump(node)} in {expr}")

    return np.broadcast_to(ev(ast.parse(py, mode="eval").body, np.ones(shape, bool)) != 0, shape)


def c_functions(pattern, sq, sk) -> dict:
    """The kernel's helper functions: floor_div, and block_bit over the pattern's block table."""
    def floor_div(active, a, b):
        return np.floor_divide(a, np.where(b > 0, b, 1))

    def block_bit(active, h, q_block, kv_block):
        table = pattern.block_table(sq, sk)
        assert np.all(~active | ((q_block >= 0) & (q_block < table.shape[1]) & (kv_block >= 0)
                                 & (kv_block < table.shape[2]))), "block_bit out of the table"
        head = h if table.shape[0] > 1 else np.zeros_like(h)
        clip = lambda x, n: np.clip(x, 0, n - 1)  # noqa: E731  (inactive lanes read nothing in C)
        return table[clip(head, table.shape[0]), clip(q_block, table.shape[1]), clip(kv_block, table.shape[2])]

    def document_of(starts):
        return lambda active, position: np.searchsorted(np.asarray(starts), position, side="right")

    def document_end(starts, last):
        bounds = np.concatenate([[0], starts, [SPAN_MAX_VALUE + 1]])
        return lambda active, position: bounds[np.searchsorted(bounds, position, side="right") - (0 if last else 1)] - last

    documents = {}
    for p in helper_parts(pattern) if pattern is not None else ():
        documents.update({p.helper_name: document_of(p._starts), p.helper_name + "_first": document_end(p._starts, 0),
                          p.helper_name + "_last": document_end(p._starts, 1)})
    return dict(floor_div=floor_div, block_bit=block_bit, SPAN_MIN=np.int64(-SPAN_MAX_VALUE - 1),
                SPAN_MAX=np.int64(SPAN_MAX_VALUE), max=lambda active, a, b: np.maximum(a, b),
                min=lambda active, a, b: np.minimum(a, b), **documents)


def c_mask(expr, heads, sq, sk, pattern=None, causal_offset=None):
    """causal_offset: the kernels' ModContext value (default seqlen_k - seqlen_q, bottom-right)."""
    h, q, kv = grid(heads, sq, sk)
    offset = sk - sq if causal_offset is None else causal_offset
    env = dict(h=h, q_idx=q, kv_idx=kv, seqlen_q=np.int64(sq), seqlen_k=np.int64(sk), causal_offset=np.int64(offset),
               **c_functions(pattern, sq, sk))
    return eval_c_expr(expr, env, (heads, sq, sk))


def c_tiles(exprs, pattern, heads, sq, sk, tile, causal_offset=None):
    """Evaluate (kept, full) tile expressions over every tile of a [heads, sq, sk] grid of tile x tile."""
    rows, cols = tile
    h = np.arange(heads)[:, None, None]
    q_lo = (np.arange(math.ceil(sq / rows)) * rows)[None, :, None]
    kv_lo = (np.arange(math.ceil(sk / cols)) * cols)[None, None, :]
    shape = (heads, q_lo.shape[1], kv_lo.shape[2])
    env = dict(h=h, q_lo=q_lo, q_hi=np.minimum(q_lo + rows, sq) - 1, kv_lo=kv_lo,
               kv_hi=np.minimum(kv_lo + cols, sk) - 1, seqlen_q=np.int64(sq), seqlen_k=np.int64(sk),
               causal_offset=np.int64(sk - sq if causal_offset is None else causal_offset),
               **c_functions(pattern, sq, sk))
    return tuple(eval_c_expr(e, env, shape) for e in exprs)


def test_c_evaluator_rejects_what_c_reads_differently():
    with pytest.raises(AssertionError, match="negative"):
        c_mask("(q_idx - kv_idx) % 3 == 0", 1, 4, 4)
    with pytest.raises(AssertionError):
        c_mask("q_idx < kv_idx < 3", 1, 4, 4)        # C: (q_idx < kv_idx) < 3
    with pytest.raises(AssertionError):
        c_mask("!(q_idx < 2)", 1, 4, 4)              # '!' is not emitted, so not accepted
    with pytest.raises(ValueError, match="unsupported"):
        c_mask("abs(q_idx) == 1", 1, 4, 4)
    # short circuit guards a division, as in C
    guarded = c_mask("(kv_idx <= q_idx && (q_idx - kv_idx) % 2 == 0)", 1, 4, 4)
    np.testing.assert_array_equal(guarded[0], np.tril(np.ones((4, 4), bool)) & (np.add.outer(
        np.arange(4), np.arange(4)) % 2 == 0))
    # a bool in arithmetic counts as 0/1 (C's int promotion), not as logical or
    np.testing.assert_array_equal(c_mask("(q_idx >= 1) + (q_idx >= 2) == 2", 1, 3, 1)[0, :, 0],
                                  [False, False, True])


# ----------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_element_matches_brute_force(pattern, heads, sq, sk):
    got = pattern.element(*grid(heads, sq, sk), sq, sk)
    assert got.dtype == bool and got.shape == (heads, sq, sk)
    np.testing.assert_array_equal(got, brute_mask(pattern, heads, sq, sk))


@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_cuda_expr_means_element(pattern, heads, sq, sk):
    np.testing.assert_array_equal(c_mask(pattern.cuda_expr(), heads, sq, sk, pattern),
                                  brute_mask(pattern, heads, sq, sk))


# Interval patterns: their spans must exist and mean the elements; every other pattern has none.
SPAN_KINDS = ("causal", "sliding_window", "document")


def _is_interval(pattern) -> bool:
    if isinstance(pattern, Or):
        return False
    if isinstance(pattern, And):
        return all(_is_interval(p) for p in pattern.parts)
    return pattern.kind in SPAN_KINDS


@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_cuda_spans_mean_the_elements(pattern, heads, sq, sk):
    """A query sees exactly the keys of its span, a key is seen by exactly the queries of its span (the
    kernels' row predicates); patterns that are no intervals have no spans."""
    spans = pattern.cuda_spans()
    assert (spans is not None) == _is_interval(pattern), pattern.name
    if spans is None:
        return
    key_lo, key_hi, query_lo, query_hi = spans
    elements = brute_mask(pattern, heads, sq, sk)
    np.testing.assert_array_equal(c_mask(f"(kv_idx >= {key_lo} && kv_idx <= {key_hi})", heads, sq, sk, pattern), elements)
    np.testing.assert_array_equal(c_mask(f"(q_idx >= {query_lo} && q_idx <= {query_hi})", heads, sq, sk, pattern), elements)


@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(50, 0), SlidingWindow(30, 20), SlidingWindow(1 << 30, 5)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("offset", [-150, 0, 37, 80, 400])
def test_c_predicates_follow_a_shifted_causal_offset(pattern, offset):
    """A call's position offsets move causal_offset away from seqlen_k - seqlen_q: the C element predicate, the
    spans and the tile predicates then mean the pattern aligned at that offset, i.e. its elements for a
    seqlen_q of seqlen_k - offset (these patterns read seqlen_q only through the alignment)."""
    sq, sk = 120, 200
    h, q, kv = grid(1, sq, sk)
    expected = np.broadcast_to(pattern.element(h, q, kv, sk - offset, sk), (1, sq, sk))
    np.testing.assert_array_equal(c_mask(pattern.cuda_expr(), 1, sq, sk, pattern, offset), expected)
    key_lo, key_hi, query_lo, query_hi = pattern.cuda_spans()
    for span in (f"(kv_idx >= {key_lo} && kv_idx <= {key_hi})", f"(q_idx >= {query_lo} && q_idx <= {query_hi})"):
        np.testing.assert_array_equal(c_mask(span, 1, sq, sk, pattern, offset), expected)
    tile = (32, 64)
    kept, full = c_tiles(pattern.cuda_tile_expr(), pattern, 1, sq, sk, tile, offset)
    for i in range(kept.shape[1]):
        for j in range(kept.shape[2]):
            block = expected[0, i * tile[0]:(i + 1) * tile[0], j * tile[1]:(j + 1) * tile[1]]
            assert kept[0, i, j] or not block.any(), (i, j)
            assert not full[0, i, j] or block.all(), (i, j)


# Patterns whose tile predicates are exact (kept iff some element is visible, full iff all are).
EXACT_TILE_KINDS = ("causal", "sliding_window", "longformer", "document", "layout")


@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_cuda_tile_expr_bounds_the_elements(pattern, heads, sq, sk):
    """kept holds for every tile with a visible element, full only for tiles with nothing hidden; both
    exact for the simple patterns. Tiles divide the block table's blocks (as the planner ensures)."""
    table = pattern.table_block_size
    tiles = [table, (table[0] // 2, table[1] // 2)] if table else [(16, 8), (32, 32), (1, 1), (64, 16)]
    elements = brute_mask(pattern, heads, sq, sk)
    for tile in tiles:
        kept, full = c_tiles(pattern.cuda_tile_expr(), pattern, heads, sq, sk, tile)
        any_visible, all_visible = brute_blocks(elements, tile)
        assert np.all(kept | ~any_visible), f"tile {tile}: a tile with visible elements is not kept"
        assert np.all(all_visible | ~full), f"tile {tile}: a tile with hidden elements is called full"
        if pattern.kind in EXACT_TILE_KINDS:
            np.testing.assert_array_equal(kept, any_visible)
            np.testing.assert_array_equal(full, all_visible)


@pytest.mark.parametrize("pattern", GENERAL_PATTERNS + [Document((3, 4, 5))], ids=lambda p: p.name)
def test_element_broadcasts_and_takes_int_head(pattern):
    rng = np.random.default_rng(0)
    q, kv = rng.integers(0, 12, 50), rng.integers(0, 12, 50)
    flat = pattern.element(0, q, kv, 12, 12)
    assert flat.shape == (50,)
    dense = pattern.element(np.arange(2)[:, None, None], np.arange(12)[:, None], np.arange(12), 12, 12)
    assert dense.shape == (2, 12, 12)
    np.testing.assert_array_equal(flat, dense[0, q, kv])


def test_document_needs_matching_lengths():
    doc = Document((3, 4))
    with pytest.raises(ValueError, match="sum\\(seq_lens\\) = 7"):
        doc.element(0, np.arange(7)[:, None], np.arange(8), 7, 8)
    with pytest.raises(ValueError, match="seqlen_q=6"):
        BlockMask.from_pattern(doc, 6, 6)
    assert Document((5,)).cuda_expr() == "true"


def test_pattern_semantics_spot_checks():
    """A few facts straight from the definitions, beyond the brute force."""
    assert SlidingWindow(2).element(0, 5, np.arange(8), 8, 8).tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    # bottom-right: with seqlen_q=2, seqlen_k=6, query 0 sits at key 4
    assert Causal().element(0, 0, np.arange(6), 2, 6).tolist() == [1, 1, 1, 1, 1, 0]
    assert np.flatnonzero(Dilated(3, 2).element(0, 9, np.arange(10), 10, 10)).tolist() == [3, 5, 7, 9]
    assert np.flatnonzero(Strided(3).element(0, 9, np.arange(10), 10, 10)).tolist() == [0, 3, 6, 7, 8, 9]
    assert np.flatnonzero(Fixed(4, 1).element(0, 9, np.arange(10), 10, 10)).tolist() == [3, 7, 8, 9]
    lf = Longformer(2, (0,)).element(0, np.arange(6)[:, None], np.arange(6), 6, 6)
    assert lf[0].all() and lf[:, 0].all() and lf[3].tolist() == [1, 0, 1, 1, 1, 0]
    big = BlockMask.from_pattern(BigBird(1, (), 2, 16, 5), 160, 160, block_size=16)
    assert np.all(big.kept_blocks().sum(-1) >= 2) and np.all(big.kept_blocks().sum(-1) <= 3)
    again = BlockMask.from_pattern(BigBird(1, (), 2, 16, 5), 160, 160, block_size=16)
    other = BlockMask.from_pattern(BigBird(1, (), 2, 16, 6), 160, 160, block_size=16)
    assert (big.kept_blocks() == again.kept_blocks()).all()
    assert (big.kept_blocks() != other.kept_blocks()).any()


def test_combinators_flatten_and_combine_exprs():
    p = Causal() & SlidingWindow(4) & Strided(2)
    assert isinstance(p, And) and len(p.parts) == 3
    q = Causal() | (Strided(2) | Dilated(2, 2))
    assert isinstance(q, Or) and len(q.parts) == 3
    assert (p | q).parts == (p,) + q.parts
    assert (p & q).cuda_expr() == f"({p.parts[0].cuda_expr()} && {p.parts[1].cuda_expr()} && "\
                                  f"{p.parts[2].cuda_expr()} && {q.cuda_expr()})"
    kept, full = (p & q).cuda_tile_expr()
    assert kept == "(" + " && ".join(x.cuda_tile_expr()[0] for x in p.parts + (q,)) + ")"
    assert full == "(" + " && ".join(x.cuda_tile_expr()[1] for x in p.parts + (q,)) + ")"
    assert "block_bit" in (p & BigBird(3, random_blocks=1)).cuda_expr()
    assert "block_bit" not in BigBird(3).cuda_expr()            # no random blocks: no table
    with pytest.raises(SpecError, match="at most one part backed by a block table"):
        BigBird(3, random_blocks=1) | random_layout(0, 1, 32, 32)
    assert p.name == "causal_and_sliding_window_4_0_and_strided_2"
    assert hash(p) == hash(Causal() & SlidingWindow(4) & Strided(2))
    with pytest.raises(TypeError):
        Causal() & 3
    with pytest.raises(SpecError, match="same number of heads"):
        random_layout(0, 2, 32, 32) & random_layout(1, 3, 32, 32)


def test_patterns_are_frozen_and_validated():
    with pytest.raises(AttributeError):
        Causal().kind2 = 1
    with pytest.raises(Exception):
        SlidingWindow(3).left = 4
    with pytest.raises(SpecError, match="'left'"):
        SlidingWindow(-1)
    with pytest.raises(SpecError, match="'summary'"):
        Fixed(4, 5)
    assert Longformer(4, [7, 1, 1]).global_tokens == (1, 7)


# ----------------------------------------------------------------------------- spec dicts

SPEC_EXAMPLES = [
    {"kind": "causal"},
    {"kind": "sliding_window", "left": 1024, "right": 0},
    {"kind": "sliding_window", "left": 64},
    {"kind": "longformer", "window": 512, "global_tokens": [0, 1]},
    {"kind": "bigbird", "window": 3, "global_tokens": [0], "random_blocks": 2, "block_size": 128, "seed": 0},
    {"kind": "strided", "stride": 128},
    {"kind": "fixed", "stride": 128, "summary": 8},
    {"kind": "dilated", "window": 64, "dilation": 4},
    {"kind": "document", "seq_lens": [100, 300]},
    {"kind": "and", "of": [{"kind": "causal"}, {"kind": "sliding_window", "left": 8}]},
    {"kind": "or", "of": [{"kind": "strided", "stride": 4}, {"kind": "and", "of": [{"kind": "causal"}]}]},
]


@pytest.mark.parametrize("data", SPEC_EXAMPLES, ids=lambda d: d["kind"])
def test_pattern_from_dict_round_trips(data):
    p = pattern_from_dict(data)
    assert p.kind == data["kind"]
    assert pattern_from_dict(p.to_dict()) == p
    assert re.fullmatch(r"[A-Za-z0-9_]+", p.name)


@pytest.mark.parametrize("pattern", GENERAL_PATTERNS, ids=lambda p: p.name)
def test_to_dict_round_trips(pattern):
    assert pattern_from_dict(pattern.to_dict()) == pattern


def test_layout_from_npy_path(tmp_path):
    blocks = np.random.default_rng(1).random((2, 3, 4)) < 0.5
    path = tmp_path / "layout.npy"
    np.save(path, blocks)
    p = pattern_from_dict({"kind": "layout", "path": str(path), "block_size": 64})
    assert p.block_size == (64, 64) and p.heads == 2 and p.path == str(path)
    np.testing.assert_array_equal(p.blocks, blocks)
    assert p.to_dict() == {"kind": "layout", "path": str(path), "block_size": 64}
    mask = BlockMask.from_pattern(p, 150, 200, block_size=64)
    np.testing.assert_array_equal(mask.kept_blocks(), blocks)
    np.testing.assert_array_equal(mask.full_blocks(), blocks)     # whole layout blocks are visible
    with pytest.raises(ValueError, match="does not cover"):
        p.element(0, 0, 0, 150, 300)
    with pytest.raises(ValueError, match="2 heads, num_heads=3"):
        BlockMask.from_pattern(p, 150, 200, num_heads=3, block_size=64)


@pytest.mark.parametrize("data,field", [
    ([], "mask"),
    ({}, "mask.kind"),
    ({"kind": "diagonal"}, "mask.kind"),
    ({"kind": "sliding_window"}, "mask.left"),
    ({"kind": "sliding_window", "left": -1}, "mask.left"),
    ({"kind": "sliding_window", "left": 1.5}, "mask.left"),
    ({"kind": "sliding_window", "left": True}, "mask.left"),
    ({"kind": "sliding_window", "left": 4, "width": 3}, "mask.width"),
    ({"kind": "bigbird", "window": 3, "block_size": 0}, "mask.block_size"),
    ({"kind": "bigbird", "window": 0}, "mask.window"),
    ({"kind": "longformer", "window": 4, "global_tokens": 0}, "mask.global_tokens"),
    ({"kind": "longformer", "window": 4, "global_tokens": [0, -1]}, "mask.global_tokens"),
    ({"kind": "document", "seq_lens": []}, "mask.seq_lens"),
    ({"kind": "document", "seq_lens": [3, 0]}, "mask.seq_lens"),
    ({"kind": "fixed", "stride": 4, "summary": 5}, "mask.summary"),
    ({"kind": "strided", "stride": 0}, "mask.stride"),
    ({"kind": "dilated", "window": 3, "dilation": 0}, "mask.dilation"),
    ({"kind": "layout"}, "mask.path"),
    ({"kind": "layout", "path": "/nonexistent/layout.npy"}, "mask.path"),
    ({"kind": "layout", "path": 3}, "mask.path"),
    ({"kind": "and", "of": []}, "mask.of"),
    ({"kind": "or", "of": {"kind": "causal"}}, "mask.of"),
    ({"kind": "and", "of": [{"kind": "causal"}], "extra": 1}, "mask.extra"),
    ({"kind": "and", "of": [{"kind": "causal"}, {"kind": "sliding_window", "left": -2}]}, "mask.of[1].left"),
    ({"kind": "or", "of": [{"kind": "and", "of": [{"kind": "strided"}]}]}, "mask.of[0].of[0].stride"),
])
def test_pattern_from_dict_errors_name_the_field(data, field):
    with pytest.raises(SpecError) as info:
        pattern_from_dict(data)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("array,block_size,field", [
    (np.zeros((2, 2), np.float32), 64, "mask.path"),
    (np.zeros((1, 1, 2, 2), bool), 64, "mask.path"),
    (np.zeros((2, 2), bool), [64, 0], "mask.block_size"),
])
def test_layout_file_errors(tmp_path, array, block_size, field):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(SpecError) as info:
        pattern_from_dict({"kind": "layout", "path": str(path), "block_size": block_size})
    assert info.value.field == field


# ----------------------------------------------------------------------------- BlockMask


@pytest.mark.parametrize("block_size", [(16, 16), (64, 128), (32, 8)])
@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_from_pattern_matches_brute_block_reduction(monkeypatch, pattern, heads, sq, sk, block_size):
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 3 * block_size[0] * block_size[1])  # several kv chunks
    mask = BlockMask.from_pattern(pattern, sq, sk, block_size=block_size)
    elements = brute_mask(pattern, heads, sq, sk)
    kept, full = brute_blocks(elements, block_size)
    assert mask.num_heads == heads and mask.pattern == pattern
    np.testing.assert_array_equal(mask.kept_blocks(), kept)
    np.testing.assert_array_equal(mask.full_blocks(), full)
    check_csr(mask)
    dense = BlockMask.from_dense(kept, sq, sk, block_size, full=full)
    for name in ("partial_row_ptr", "partial_cols", "full_row_ptr", "full_cols"):
        np.testing.assert_array_equal(getattr(mask, name), getattr(dense, name))
    np.testing.assert_array_equal(mask.element_mask(), elements)


@pytest.mark.parametrize("block_size", [(64, 64), (128, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("sq,sk", [(1000, 1000), (777, 1200), (1200, 300)])
def test_from_predicate_long_rows_and_chunks(sq, sk, block_size):
    """A per-head predicate at lengths that are not block multiples, against slicing its dense mask."""
    def fn(h, q_idx, kv_idx):
        a = q_idx + sk - sq
        return ((kv_idx <= a) & (kv_idx > a - 200 * (h + 1))) | (kv_idx % 500 < 3 * h)

    mask = BlockMask.from_predicate(fn, sq, sk, num_heads=3, block_size=block_size)
    elements = np.stack([np.broadcast_to(fn(h, np.arange(sq)[:, None], np.arange(sk)), (sq, sk))
                         for h in range(3)])
    kept, full = brute_blocks(elements, block_size)
    np.testing.assert_array_equal(mask.kept_blocks(), kept)
    np.testing.assert_array_equal(mask.full_blocks(), full)
    check_csr(mask)
    np.testing.assert_array_equal(mask.element_mask(), elements)
    np.testing.assert_array_equal(mask.element_mask((100, 300), (250, 260)), elements[:, 100:300, 250:260])
    assert mask.pattern is None


def test_from_predicate_scalar_result_and_tail_blocks():
    everything = BlockMask.from_predicate(lambda h, q, kv: True, 130, 70, block_size=(64, 64))
    assert everything.counts() == dict(kept=6, partial=0, full=6, total=6)   # tails count as full
    nothing = BlockMask.from_predicate(lambda h, q, kv: np.False_, 130, 70, block_size=(64, 64))
    assert nothing.counts() == dict(kept=0, partial=0, full=0, total=6) and nothing.density == 0
    check_csr(nothing)


@pytest.mark.parametrize("documents", [64, 4096])
def test_document_masks_of_long_packed_rows_build_from_the_blocks_bounds(documents):
    """131072 tokens of documents, causal within each: the block CSR and its kv-major transpose come from
    the documents' bounds (no element, no dense block grid), for any number of documents."""
    rng = np.random.default_rng(documents)
    tokens = 131072
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=documents - 1, replace=False))
    lens = tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [tokens]])))
    start = time.perf_counter()
    mask = BlockMask.from_pattern(Document(lens) & Causal(), tokens, tokens)
    kv_major = mask.transposed()
    elapsed = time.perf_counter() - start
    assert mask._grids == {}                            # the 1024 x 1024 grids were never built
    assert elapsed < 5.0, f"{elapsed:.2f} s"           # ~0.1 s measured on a 2-core CI machine
    # spot checks against the elements: a full block, and every partial block's any/all on a sample of rows
    bounds = np.concatenate([[0], np.cumsum(lens)])
    doc = np.searchsorted(bounds, np.arange(tokens), side="right") - 1
    for r in rng.choice(mask.n_q_blocks, size=8, replace=False):
        q = np.arange(r * 128, (r + 1) * 128)[:, None]
        for kind, ptr, cols in (("partial", mask.partial_row_ptr, mask.partial_cols),
                                ("full", mask.full_row_ptr, mask.full_cols)):
            for j in cols[ptr[r]:ptr[r + 1]]:
                kv = np.arange(j * 128, (j + 1) * 128)[None, :]
                visible = (doc[q] == doc[kv]) & (kv <= q)
                assert visible.any() and (visible.all() == (kind == "full"))
        kept = np.concatenate([mask.partial_cols[mask.partial_row_ptr[r]:mask.partial_row_ptr[r + 1]],
                               mask.full_cols[mask.full_row_ptr[r]:mask.full_row_ptr[r + 1]]])
        for j in set(range(mask.n_kv_blocks)) - set(kept.tolist()):
            kv = np.arange(j * 128, (j + 1) * 128)[None, :]
            assert not ((doc[q] == doc[kv]) & (kv <= q)).any()
    assert kv_major.partial_col_ptr[-1] == len(mask.partial_cols)


@pytest.mark.parametrize("pattern", [SlidingWindow(1024), Causal()], ids=lambda p: p.name)
def test_from_pattern_long_sequence_is_fast_and_small(pattern):
    """16384 x 16384 would be 256 MiB of bool; the reduction must stay far below that."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        mask = BlockMask.from_pattern(pattern, 16384, 16384)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 5.0, f"{elapsed:.2f} s"
    n = 128
    if isinstance(pattern, Causal):
        assert mask.counts() == dict(kept=n * (n + 1) // 2, partial=n, full=n * (n - 1) // 2, total=n * n)
        assert mask.density == pytest.approx(0.5, abs=0.01)
    else:  # 1025 keys: the partial diagonal block, 7 full blocks behind it, one partial further back
        assert mask.counts()["kept"] == sum(min(i + 1, 9) for i in range(n))
        assert mask.counts()["full"] == sum(min(i, 7) for i in range(n))
    check_csr(mask)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("heads", [1, 4])
def test_random_dense_layouts(density, heads):
    rng = np.random.default_rng(int(density * 100) + heads)
    sq, sk, block = 1000, 1500, (128, 64)
    blocks = rng.random((heads, 8, 24)) < density
    full = blocks & (rng.random(blocks.shape) < 0.5)
    mask = BlockMask.from_dense(blocks, sq, sk, block, full=full)
    check_csr(mask)
    assert mask.density == pytest.approx(blocks.mean())
    assert mask.counts() == dict(kept=blocks.sum(), partial=(blocks & ~full).sum(), full=full.sum(),
                                 total=heads * 8 * 24)
    expanded = np.repeat(np.repeat(blocks, 128, axis=1), 64, axis=2)[:, :sq, :sk]
    np.testing.assert_array_equal(mask.element_mask(), expanded)   # dense partial blocks: all visible
    t = mask.transposed()
    for ptr, rows, grid_ in ((t.partial_col_ptr, t.partial_rows, blocks & ~full),
                             (t.full_col_ptr, t.full_rows, full)):
        assert ptr.shape == (heads * 24 + 1,) and ptr.dtype == rows.dtype == np.int32
        for c in range(heads * 24):
            np.testing.assert_array_equal(rows[ptr[c]:ptr[c + 1]], np.flatnonzero(grid_[c // 24, :, c % 24]))


def test_from_dense_checks():
    blocks = np.ones((3, 2), bool)
    mask = BlockMask.from_dense(blocks, 300, 200)      # 2-D: shared across heads
    assert mask.num_heads == 1 and mask.block_size == (128, 128) and mask.counts()["partial"] == 6
    with pytest.raises(ValueError, match=r"shape \[H or 1, 3, 3\]"):
        BlockMask.from_dense(blocks, 300, 300)
    with pytest.raises(TypeError, match="bool"):
        BlockMask.from_dense(blocks.astype(int), 300, 200)
    with pytest.raises(ValueError, match="full marks blocks"):
        BlockMask.from_dense(np.zeros((3, 2), bool), 300, 200, full=np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="full must have the shape"):
        BlockMask.from_dense(np.ones((1, 3, 2), bool), 300, 200, full=np.ones((2, 3, 2), bool))
    with pytest.raises(ValueError, match="seqlen_q"):
        BlockMask.from_dense(blocks, 0, 200)
    with pytest.raises(AttributeError, match="read-only"):
        mask.seqlen_q = 5
    with pytest.raises(ValueError):
        mask.partial_cols[0] = 1


def test_and_or_of_block_masks():
    sq, sk, block = 300, 260, (64, 64)
    a = BlockMask.from_pattern(SlidingWindow(70, 10), sq, sk, block_size=block)
    b = BlockMask.from_pattern(Strided(50), sq, sk, block_size=block)
    c = BlockMask.from_dense(np.random.default_rng(3).random((4, 5, 5)) < 0.5, sq, sk, block)
    for x, y in ((a, b), (a, c), (c, b)):
        for combined, op in ((x & y, np.logical_and), (x | y, np.logical_or)):
            check_csr(combined)
            np.testing.assert_array_equal(combined.kept_blocks(), op(x.kept_blocks(), y.kept_blocks()))
            # or: a block kept by a from_dense mask is visible everywhere, so it becomes full
            promote = lambda m: m.kept_blocks() if op is np.logical_or and m.partial_predicate is None else m.full_blocks()  # noqa: E731
            np.testing.assert_array_equal(combined.full_blocks(), op(promote(x), promote(y)))
            elements = op(x.element_mask(), y.element_mask())
            np.testing.assert_array_equal(combined.element_mask(), elements)
            # full blocks are truly full; every visible element lies in a kept block
            kept, full = brute_blocks(elements, block)
            assert not (combined.full_blocks() & ~full).any()
            assert not (kept & ~combined.kept_blocks()).any()
    assert (a & b).pattern == SlidingWindow(70, 10) & Strided(50)
    assert (a | b).pattern == SlidingWindow(70, 10) | Strided(50)
    assert (a & c).pattern is None and (a & c).num_heads == 4
    with pytest.raises(ValueError, match="cannot combine"):
        a & BlockMask.from_pattern(Causal(), sq, sk + 1, block_size=block)
    with pytest.raises(ValueError, match="cannot combine"):
        a & BlockMask.from_pattern(Causal(), sq, sk, block_size=(64, 32))
    with pytest.raises(ValueError, match="cannot combine"):
        c & BlockMask.from_dense(np.ones((3, 5, 5), bool), sq, sk, block)


def test_per_head_pattern_shared_across_heads():
    mask = BlockMask.from_pattern(Causal(), 200, 200, num_heads=3, block_size=64)
    assert mask.num_heads == 3 and mask.block_size == (64, 64)
    lower = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(mask.kept_blocks(), np.broadcast_to(lower, (3, 4, 4)))
    check_csr(mask)


def test_str_shows_density_counts_and_block_map():
    mask = BlockMask.from_pattern(Causal(), 1000, 1000)
    text = str(mask)
    assert "density 0.5625" in text and "kept 36 of 64" in text and "partial 8, full 28" in text
    assert text.endswith("+.......\n#+......\n##+.....\n###+....\n####+...\n#####+..\n######+.\n#######+")
    big = BlockMask.from_pattern(Causal(), 4096, 4096, block_size=64)
    assert big.block_map().count("\n") == 15 and len(big.block_map().splitlines()[0]) == 16
    assert "density=" in repr(big)


# ----------------------------------------------------------------------------- reference with mask=


def random_qkv(seed, *, batch=2, sq, sk, heads_q=2, heads_kv=2, head_dim=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, sq, heads_q, head_dim)),
            rng.standard_normal((batch, sk, heads_kv, head_dim)),
            rng.standard_normal((batch, sk, heads_kv, head_dim)))


def loop_attention(q, k, v, visible):
    """Per-element loops; visible [heads_q, Sq, Sk] bool."""
    batch, sq, heads_q, d = q.shape
    group = heads_q // k.shape[2]
    out, lse = np.zeros((batch, sq, heads_q, v.shape[3])), np.full((batch, heads_q, sq), -np.inf)
    for b, h, i in np.ndindex(batch, heads_q, sq):
        keys = [j for j in range(k.shape[1]) if visible[h, i, j]]
        if not keys:
            continue
        scores = [sum(q[b, i, h, x] * k[b, j, h // group, x] for x in range(d)) / math.sqrt(d) for j in keys]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        for j, w in zip(keys, weights):
            out[b, i, h] += w / sum(weights) * v[b, j, h // group]
        lse[b, h, i] = top + math.log(sum(weights))
    return out, lse




def assert_same_attention(a, b, atol=1e-12):
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=atol)
    assert np.array_equal(np.isneginf(a[1]), np.isneginf(b[1]))
    finite = np.isfinite(b[1])
    np.testing.assert_allclose(a[1][finite], b[1][finite], rtol=0, atol=atol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (9, 4)])
@pytest.mark.parametrize("mask_shape", ["full", "shared", "per_head_row"])
def test_reference_mask_matches_loops(sq, sk, causal, mask_shape):
    heads_q, heads_kv = 4, 2
    q, k, v = random_qkv(sq * 10 + sk, sq=sq, sk=sk, heads_q=heads_q, heads_kv=heads_kv, head_dim=4)
    rng = np.random.default_rng(sq + sk)
    shape = {"full": (heads_q, sq, sk), "shared": (sq, sk), "per_head_row": (heads_q, 1, sk)}[mask_shape]
    mask = rng.random(shape) < 0.6
    visible = np.broadcast_to(mask, (heads_q, sq, sk)).copy()
    if causal:
        visible &= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq
    expected = loop_attention(q, k, v, visible)
    with no_float_warnings():
        assert_same_attention(attention_reference(q, k, v, causal=causal, mask=mask), expected)
        tiled = attention_tiled(q, k, v, causal=causal, mask=mask, block_m=2, block_n=3)
        assert_same_attention(tiled, expected)
        low = attention_same_dtype_reference(q, k, v, causal=causal, mask=mask, dtype="bf16")
    assert_same_attention(low, expected, atol=5e-2)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda q, k, v, m: attention_reference(q, k, v, mask=m), id="naive"),
    pytest.param(lambda q, k, v, m: attention_tiled(q, k, v, mask=m, block_m=4, block_n=4), id="tiled"),
    pytest.param(lambda q, k, v, m: attention_same_dtype_reference(q, k, v, mask=m, dtype="fp16"),
                 id="same_dtype"),
])
def test_fully_masked_rows_give_zero_and_neg_inf(fn):
    q, k, v = random_qkv(5, sq=10, sk=12, heads_q=2, heads_kv=1)
    mask = np.random.default_rng(5).random((2, 10, 12)) < 0.5
    mask[0, 3] = False
    mask[1, 4:9] = False                     # a whole 4-row tile and more for head 1
    mask[:, 9] = True
    with no_float_warnings():
        out, lse = fn(q, k, v, mask)
        none_out, none_lse = fn(q, k, v, np.zeros((10, 12), bool))
    assert np.all(out[:, 3, 0] == 0) and np.all(out[:, 4:9, 1] == 0)
    assert np.all(np.isneginf(lse[:, 0, 3])) and np.all(np.isneginf(lse[:, 1, 4:9]))
    assert np.isfinite(lse[:, :, 9]).all() and np.isfinite(out).all()
    assert np.all(none_out == 0) and np.all(np.isneginf(none_lse))


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32), (32, 64)])
@pytest.mark.parametrize("mask_kind", ["bigbird", "document", "layout_per_head", "sliding_and_strided"])
def test_tiled_matches_naive_with_block_masks(mask_kind, block_m, block_n):
    sq, sk, heads_q, heads_kv = (203, 203, 4, 2) if mask_kind == "document" else (113, 203, 4, 2)
    mask = {
        "bigbird": lambda: BlockMask.from_pattern(BigBird(1, (3,), 1, 32, 1), sq, sk, block_size=64),
        "document": lambda: BlockMask.from_pattern(Document((50, 3, 100, 50)), sq, sk, block_size=64),
        "layout_per_head": lambda: BlockMask.from_pattern(random_layout(2, heads_q, sq, sk, (64, 64), 0.3),
                                                          sq, sk, block_size=64),
        "sliding_and_strided": lambda: BlockMask.from_pattern(SlidingWindow(20, 5), sq, sk, block_size=128)
        & BlockMask.from_pattern(Strided(7), sq, sk, block_size=128),
    }[mask_kind]()
    q, k, v = random_qkv(block_m + block_n, sq=sq, sk=sk, heads_q=heads_q, heads_kv=heads_kv)
    for causal in (False, True):
        with no_float_warnings():
            naive = attention_reference(q, k, v, causal=causal, mask=mask)
            tiled = attention_tiled(q, k, v, causal=causal, mask=mask, block_m=block_m, block_n=block_n)
        assert_same_attention(tiled, naive)
        as_array = attention_reference(q, k, v, causal=causal, mask=mask.element_mask())
        assert_same_attention(as_array, naive, atol=0)


def test_tiled_skips_key_tiles_with_no_visible_element(monkeypatch):
    q, k, v = random_qkv(9, sq=64, sk=96, heads_q=2, heads_kv=2)
    blocks = np.zeros((1, 4, 6), bool)
    blocks[0, :, 2] = True                       # only keys 32..47 visible
    mask = BlockMask.from_dense(blocks, 64, 96, block_size=16)
    calls = []
    real_scores = reference._scores
    monkeypatch.setattr(reference, "_scores", lambda *a: calls.append(1) or real_scores(*a))
    out = attention_tiled(q, k, v, mask=mask, block_m=16, block_n=16)
    assert len(calls) == 4                       # one key tile per query tile
    monkeypatch.undo()
    assert_same_attention(out, attention_reference(q, k, v, mask=mask))


def test_reference_mask_errors():
    q, k, v = random_qkv(1, sq=6, sk=8, heads_q=4, heads_kv=2)
    with pytest.raises(TypeError, match="mask must be a bool array"):
        attention_reference(q, k, v, mask=np.ones((6, 8)))
    with pytest.raises(ValueError, match=r"mask must be broadcastable .*\[4, 6, 8\]"):
        attention_tiled(q, k, v, mask=np.ones((3, 6, 8), bool), block_m=4, block_n=4)
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        attention_reference(q, k, v, mask=np.ones((1, 4, 6, 8), bool))
    with pytest.raises(ValueError, match="BlockMask"):
        attention_reference(q, k, v, mask=BlockMask.from_pattern(Causal(), 6, 9))
    with pytest.raises(ValueError, match="num_heads 1 or 4"):
        attention_reference(q, k, v, mask=BlockMask.from_dense(np.ones((2, 1, 1), bool), 6, 8))


def _kernel_view(mask: BlockMask) -> np.ndarray:
    """What a runtime-layout kernel computes from a mask: full blocks visible, partial blocks through
    kernel_predicate() (everything when None), other blocks hidden."""
    rows, cols = mask.block_size
    q_idx, kv_idx = np.arange(mask.seqlen_q)[:, None], np.arange(mask.seqlen_k)[None, :]
    predicate = mask.kernel_predicate()
    out = []
    for h in range(mask.num_heads):
        kept = mask.kept_blocks()[h][q_idx // rows, kv_idx // cols]
        full = mask.full_blocks()[h][q_idx // rows, kv_idx // cols]
        inside = True if predicate is None else predicate.element(h, q_idx, kv_idx, mask.seqlen_q, mask.seqlen_k)
        out.append(full | (kept & inside))
    return np.stack(out)


def test_kernel_predicate_is_exact_for_every_constructor_and_combination():
    """Issue 12 finding 2: a kernel given a BlockMask computes exactly element_mask(), or the mask is refused."""
    sq, sk, block = 300, 260, (64, 64)
    causal = BlockMask.from_pattern(Causal(), sq, sk, block_size=block)
    window = BlockMask.from_pattern(SlidingWindow(70, 10), sq, sk, block_size=block)
    dense_all = BlockMask.from_dense(np.ones((5, 5), bool), sq, sk, block)
    dense_some = BlockMask.from_dense(np.random.default_rng(3).random((5, 5)) < 0.5, sq, sk, block)
    aligned = BlockMask.from_predicate(lambda h, q, k: (q // 64) >= (k // 64), sq, sk, block_size=block)
    causal_fn = BlockMask.from_predicate(lambda h, q, k: k <= q + sk - sq, sq, sk, block_size=block)
    exact = [causal, window, dense_all, dense_some, aligned]
    for x in exact:
        for y in exact:
            for m in (x, x & y, x | y):
                np.testing.assert_array_equal(_kernel_view(m), m.element_mask())
    assert (causal & dense_all).kernel_predicate() == Causal()
    assert (dense_some | window).kernel_predicate() == SlidingWindow(70, 10)
    for opaque in (causal_fn, causal_fn & dense_all, dense_some | causal_fn, causal_fn & causal):
        with pytest.raises(ValueError, match="Python function"):
            opaque.kernel_predicate()


@pytest.mark.parametrize("pattern,heads,sq,sk", CASES)
def test_visible_pairs_and_key_ranges_match_the_elements(pattern, heads, sq, sk):
    """The benchmark's work count (visible pairs) and, for interval patterns, each row's key range, against
    the elements from each pattern's definition."""
    elements = brute_mask(pattern, heads, sq, sk)
    assert pattern.visible_pairs(sq, sk) == pytest.approx(elements.sum() / heads)
    ranges = pattern.key_ranges(sq, sk)
    if ranges is None:
        return
    lo, hi = ranges
    keys = np.arange(sk)[None, :]
    np.testing.assert_array_equal(elements[0], (keys >= lo[:, None]) & (keys < hi[:, None]))


def test_combining_long_masks_keeps_them_sparse():
    """& and | of two 131072-token masks work on the block CSR (sorted block keys), never on 1024 x 1024 grids,
    and give what the patterns' own combination gives."""
    tokens, lens = 131072, (40000, 1, 51071, 40000)
    doc, window = (BlockMask.from_pattern(p, tokens, tokens) for p in (Document(lens), SlidingWindow(5000, 0)))
    both, either = doc & window, doc | window
    for combined, pattern in ((both, Document(lens) & SlidingWindow(5000, 0)),
                              (either, Document(lens) | SlidingWindow(5000, 0))):
        assert combined._grids == {} and combined.pattern == pattern
        direct = BlockMask.from_pattern(pattern, tokens, tokens) if pattern.kind == "and" else None
        if direct is not None:
            for name in ("partial_row_ptr", "partial_cols", "full_row_ptr", "full_cols"):
                np.testing.assert_array_equal(getattr(combined, name), getattr(direct, name))
    assert both.counts()["kept"] < doc.counts()["kept"] < either.counts()["kept"]


@pytest.mark.parametrize("seq_lens", [(5,), (3, 4), (1, 1, 1), (7, 2, 9, 1, 4), tuple(range(1, 65)),
                                      tuple([256] * 1000)])
def test_document_index_is_a_table_search(seq_lens):
    """The document pattern's C: one helper per document lengths (a table and a binary search), the same
    source size for any number of documents but the table, and its index equal to the number of documents
    starting at or before each position."""
    doc = Document(seq_lens)
    helpers = cuda_helpers(doc & Causal())
    if len(seq_lens) == 1:
        assert helpers == "" and doc.cuda_expr() == "true"
        return
    assert helpers.count(f"int {doc.helper_name}(int position)") == 1
    base = cuda_helpers(Document((1, 1)))
    table = re.search(r"_starts\[\d+\] = \{([^}]*)\}", helpers).group(1).split(", ")
    assert table[:len(doc._starts)] == [str(x) for x in doc._starts] and len(table) < 2 * len(seq_lens)
    assert set(table[len(doc._starts):]) <= {str(SPAN_MAX_VALUE)}                    # padding no position reaches
    assert abs(len(helpers) - len(", ".join(table)) - (len(base) - 1)) < 16         # only the table grows
    # the C search, step by step: every read inside the table, the count of starts at or before position
    steps = int(re.search(r"for \(int step = (\d+);", helpers).group(1))
    starts = np.array(table, dtype=np.int64)
    for position in (0, 1, sum(seq_lens) - 1, *doc._starts, *(x - 1 for x in doc._starts)):
        before, step = 0, steps
        while step:
            assert before + step - 1 < starts.size
            before += step if starts[before + step - 1] <= position else 0
            step //= 2
        assert before == document_of(seq_lens, position)
    assert cuda_helpers(doc | Document(seq_lens)).count(f"int {doc.helper_name}(") == 1     # once per lengths
    total = sum(seq_lens)
    positions = np.arange(total) if total < 5000 else np.random.default_rng(0).integers(0, total, 3000)
    want = np.array([document_of(seq_lens, int(x)) for x in positions])
    got = eval_c_expr(f"{doc._doc_of('x')} == want", dict(x=positions, want=want, **c_functions(doc, total, total)),
                      positions.shape)
    assert got.all()
