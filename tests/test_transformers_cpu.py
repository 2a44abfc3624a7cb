"""The transformers client's host-side pieces (attngen.integrations.transformers), without a GPU: document
bounds from packed position_ids, the packing test, and the refusals. Needs torch (skipped without it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from attngen.integrations.transformers import _packed, attention_forward, cu_seqlens_from_position_ids  # noqa: E402


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
