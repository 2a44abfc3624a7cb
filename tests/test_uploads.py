"""CPU tests of the per-call upload cache's rules (issue 12, finding 1): copies are per stream, a launch
holds its buffers until it is queued, and eviction never reuses an entry across streams."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from attngen.runtime import uploads
from attngen.runtime.launch import TensorView


class FakeBuffer:
    def __init__(self, words, stream):
        self.words, self.stream = words, stream


@pytest.fixture
def fake_device(monkeypatch):
    """upload() records which stream each copy was written on; stream_handle() reads a settable stream."""
    state = {"stream": 1, "uploads": []}

    def fake_upload(host_arrays, kind, device, torch_device=None):
        words = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.int32) for a in host_arrays])
        buffer = FakeBuffer(words, state["stream"])
        state["uploads"].append(weakref.ref(buffer))
        return buffer, tuple(range(len(host_arrays)))

    monkeypatch.setattr(uploads, "upload", fake_upload)
    monkeypatch.setattr(uploads, "stream_handle", lambda kind, device: state["stream"])
    return state


def view():
    return TensorView("cupy", 0, (1,), (1,), "bf16", 0, None)


def test_copies_are_per_stream_and_reused_on_their_stream(fake_device):
    cache, owner = uploads.UploadCache(), object()
    arrays = lambda: [np.arange(4, dtype=np.int32)]  # noqa: E731
    keep_a, keep_b, keep_c = [], [], []
    cache.pointers(("csr", id(owner)), owner, arrays, view(), keep_a)
    fake_device["stream"] = 2
    cache.pointers(("csr", id(owner)), owner, arrays, view(), keep_b)
    assert [b.stream for b in keep_a + keep_b] == [1, 2]      # never a copy written on another stream
    fake_device["stream"] = 1
    cache.pointers(("csr", id(owner)), owner, arrays, view(), keep_c)
    assert keep_c[0] is keep_a[0] and len(fake_device["uploads"]) == 2


def test_a_new_owner_is_uploaded_again(fake_device):
    cache = uploads.UploadCache()
    first, second = [], []
    cache.pointers(("alibi", 8), 8, lambda: [np.ones(8, np.float32)], view(), first)
    cache.pointers(("alibi", 8), 8, lambda: [np.ones(8, np.float32)], view(), second)
    assert second[0] is first[0]                             # an equal value is the same data
    owner_a, owner_b = object(), object()
    cache.pointers(("table",), owner_a, lambda: [np.zeros(2, np.uint32)], view(), [])
    cache.pointers(("table",), owner_b, lambda: [np.zeros(2, np.uint32)], view(), [])
    assert len(fake_device["uploads"]) == 3


def test_eviction_leaves_held_buffers_alive(fake_device):
    """An entry evicted by another caller between lookup and launch stays alive in the caller's keep list."""
    cache = uploads.UploadCache(capacity=2)
    keep = []
    owner = object()
    cache.pointers(("csr", 0), owner, lambda: [np.arange(3, dtype=np.int32)], view(), keep)
    for i in range(5):                                       # other masks push it out of the cache
        cache.pointers(("csr", i + 1), object(), lambda: [np.arange(3, dtype=np.int32)], view(), [])
    gc.collect()
    assert len(cache) == 2
    assert fake_device["uploads"][0]() is keep[0]            # still alive: held by the launch
    del keep
    gc.collect()
    assert fake_device["uploads"][0]() is None               # released once the launch let go


def test_upload_refuses_arrays_that_are_not_words():
    with pytest.raises(TypeError, match="4-byte words"):
        uploads.upload([np.zeros(3, np.int64)], "cupy", 0)
