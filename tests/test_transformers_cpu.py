"""The transformers client's host-side pieces (attngen.integrations.transformers), without a GPU: document
bounds from packed position_ids, the packing test, and the refusals. Needs torch (skipped without it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from attngen.integrations.transformers import (_packed, attention_forward, cu_seqlens_from_position_ids,  # noqa: E402
                                               unpadding)


def test_document_bounds_from_position_ids():
    row = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(row).tolist() == [0, 3, 4, 8]
    assert cu_seqlens_from_position_ids(torch.tensor([[3, 4, 0, 1]])).tolist() == [0, 2, 4]   # a continued first
    assert cu_seqlens_from_position_ids(row).dtype == torch.int32
    assert _packed(row, 1) and not _packed(torch.arange(6)[None], 1) and not _packed(row, 2)
    assert not _packed(None, 1)


def test_refusals_name_what_differs():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        attention_forward(None, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="batch of one row"):
        attention_forward(None, torch.zeros(2, 2, 4, 8), q, q, None, cu_seq_lens_q=torch.tensor([0, 4]))


def test_unpadding_left_and_right():
    """Rows holding tokens and each row's bounds; the queries are the mask's last columns (a decode step)."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    rows_q, rows_k, cu_q, cu_k = unpadding(mask, 5)
    assert rows_k.tolist() == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14] and rows_q.tolist() == rows_k.tolist()
    assert cu_k.tolist() == [0, 3, 7, 12] and cu_k.dtype == torch.int32
    rows_q, rows_k, cu_q, cu_k = unpadding(mask, 2)       # two new tokens per row against five keys
    assert rows_q.tolist() == [0, 1, 2, 4, 5] and cu_q.tolist() == [0, 2, 3, 5] and cu_k.tolist() == [0, 3, 7, 12]


def test_four_dim_masks_are_refused():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="2-D padding mask"):
        attention_forward(None, q, q, q, torch.zeros(1, 1, 4, 4, dtype=torch.bool))
