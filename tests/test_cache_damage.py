"""A damaged or unwritable cache never breaks a call (issue 12, finding 5): a damaged kernel entry (truncated,
garbage, swapped files) is a miss and is rebuilt; a cache folder that cannot be written falls back to
compiling in memory with one warning; the same for Jinja's bytecode cache. CPU only (NVRTC needs no GPU).

Running as root, chmod does not stop writes, so an unwritable folder is made by putting the cache under a
regular file (mkdir fails whoever runs it), by a folder in the way of a file (the rename fails), or by
making mkstemp refuse as it does in a read-only folder."""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
from pathlib import Path

import jinja2
import numpy as np
import pytest

import attngen
from attngen.codegen import compile as compile_mod
from attngen.codegen.compile import compile_cached, nvrtc_compile
from attngen.errors import CompileError

render_mod = importlib.import_module("attngen.codegen.render")   # `attngen.codegen.render` is the function of that name

SOURCE = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] = 2.0f * x[threadIdx.x]; }'
OTHER = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] = 3.0f * x[threadIdx.x]; }'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def unwritable_cache(tmp_path, monkeypatch):
    """A cache folder under a regular file: every mkdir fails, root or not."""
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "cache"
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def fresh_jinja():
    """The Jinja environment picks its bytecode folder when first made: make it again around the test."""
    render_mod.environment.cache_clear()
    yield
    render_mod.environment.cache_clear()


def entry(folder, source=SOURCE):
    key = compile_mod.cache_key(source, "sm_80", compile_mod.COMPILE_OPTIONS, compile_mod.nvrtc_version())
    return folder / "kernels" / f"{key}.cubin", folder / "kernels" / f"{key}.json"


def cache_warnings(record) -> list:
    return [w for w in record if "cannot write the cache folder" in str(w.message)]


# ---- the kernel cache --------------------------------------------------------------------------------

def test_entry_records_length_and_hash_of_the_cubin(cache):
    binary, path = compile_cached(SOURCE, "small", "sm_80", "k")
    meta = json.loads(entry(cache)[1].read_text())
    assert path == entry(cache)[0]
    assert meta["cubin_bytes"] == len(binary.cubin) == path.stat().st_size
    assert meta["cubin_sha256"] == hashlib.sha256(binary.cubin).hexdigest()


def test_truncated_cubin_is_rebuilt(cache):
    first, path = compile_cached(SOURCE, "small", "sm_80", "k")
    path.write_bytes(first.cubin[: len(first.cubin) // 2])
    again, path2 = compile_cached(SOURCE, "small", "sm_80", "k")
    assert again.cubin == first.cubin and again.resources == first.resources
    assert path2.read_bytes() == first.cubin                     # overwritten whole


@pytest.mark.parametrize("damage", [
    b"",                                        # truncated to nothing
    b'{"log": "", "reso',                       # truncated JSON
    b"\xff\xfe\x00garbage",                     # not even UTF-8
    b"[1, 2, 3]",                               # JSON of the wrong shape
    b'{"log": "", "resources": {}}',            # a mapping without the fields
    b'{"log": "", "resources": {"registers": "many"}, "cubin_bytes": 1, "cubin_sha256": "x"}',
], ids=["empty", "truncated", "not-utf8", "list", "no-fields", "wrong-types"])
def test_damaged_meta_is_rebuilt(cache, damage):
    first, _ = compile_cached(SOURCE, "small", "sm_80", "k")
    cubin_path, meta_path = entry(cache)
    meta_path.write_bytes(damage)
    again, path = compile_cached(SOURCE, "small", "sm_80", "k")
    assert again.cubin == first.cubin and again.resources == first.resources and path == cubin_path
    meta = json.loads(meta_path.read_text())                     # rewritten
    assert meta["cubin_sha256"] == hashlib.sha256(first.cubin).hexdigest()


def test_swapped_cubins_fail_the_hash_and_are_rebuilt(cache):
    one, _ = compile_cached(SOURCE, "one", "sm_80", "k")
    two, _ = compile_cached(OTHER, "two", "sm_80", "k")
    assert one.cubin != two.cubin
    (p1, _), (p2, _) = entry(cache, SOURCE), entry(cache, OTHER)
    p1.write_bytes(two.cubin)
    p2.write_bytes(one.cubin)
    again_one, _ = compile_cached(SOURCE, "one", "sm_80", "k")
    again_two, _ = compile_cached(OTHER, "two", "sm_80", "k")
    assert again_one.cubin == one.cubin and again_two.cubin == two.cubin
    assert p1.read_bytes() == one.cubin and p2.read_bytes() == two.cubin


def test_cache_under_a_file_compiles_in_memory_with_one_warning(unwritable_cache):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        binary, path = compile_cached(SOURCE, "small", "sm_80", "k")
        other, other_path = compile_cached(OTHER, "other", "sm_80", "k")
    assert len(cache_warnings(record)) == 1, [str(w.message) for w in record]
    message = str(cache_warnings(record)[0].message)
    assert str(unwritable_cache) in message and "private temp folder" in message
    for b, p in ((binary, path), (other, other_path)):
        assert p.is_file() and p.read_bytes() == b.cubin          # CuPy can still load it from the path
        assert unwritable_cache not in p.parents
    assert binary.resources.registers > 0


def test_read_only_cache_folder_falls_back(cache, monkeypatch):
    # What a read-only folder does to mkstemp (chmod 0o555 does not stop root, who runs these tests).
    real = compile_mod.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if cache in Path(dir).parents or Path(dir) == cache:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(compile_mod.tempfile, "mkstemp", refuse)
    with pytest.warns(RuntimeWarning, match="cannot write the cache folder .*Permission denied"):
        binary, path = compile_cached(SOURCE, "small", "sm_80", "k")
    assert path.read_bytes() == binary.cubin and cache not in path.parents


def test_a_folder_in_the_way_of_the_entry_falls_back(cache):
    cubin_path, _ = entry(cache)
    cubin_path.mkdir(parents=True)                               # os.replace onto it fails
    with pytest.warns(RuntimeWarning, match="cannot write the cache folder"):
        binary, path = compile_cached(SOURCE, "small", "sm_80", "k")
    assert path != cubin_path and path.read_bytes() == binary.cubin


def test_failed_source_with_unwritable_cache_still_raises_the_compile_error(unwritable_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CompileError) as info:
            nvrtc_compile('extern "C" __global__ void k() { undefined_thing(); }', "broken", "sm_80", "k")
    assert "undefined_thing" in info.value.log
    saved = info.value.source_path
    assert saved is not None and unwritable_cache not in saved.parents
    assert "undefined_thing" in saved.read_text() and "undefined_thing" in saved.with_suffix(".log").read_text()


@pytest.mark.gpu
def test_kernel_from_the_in_memory_fallback_runs(unwritable_cache):
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        major, minor = divmod(int(cupy.cuda.Device().compute_capability), 10)
        binary, path = compile_cached(SOURCE, "small", f"sm_{major}{minor}", "k")
    x = cupy.arange(32, dtype=cupy.float32)
    cupy.RawModule(path=str(path)).get_function("k")((1,), (32,), (x,))
    assert np.array_equal(cupy.asnumpy(x), 2 * np.arange(32, dtype=np.float32))


# ---- Jinja's bytecode cache ----------------------------------------------------------------------------

def rendered():
    spec = attngen.Spec(head_dim=64, causal=True)
    return attngen.render(spec, attngen.plan(spec, arch="sm_80"))


def test_damaged_template_bytecode_is_ignored_and_rewritten(cache, fresh_jinja):
    expected = rendered()
    files = sorted((cache / "templates").iterdir())
    assert files, "the bytecode cache wrote nothing"
    sizes = {f: f.stat().st_size for f in files}
    keep = len(jinja2.bccache.bc_magic) + 4                      # Jinja's header survives, its pickle is cut
    for f in files:
        f.write_bytes(f.read_bytes()[:keep])
    render_mod.environment.cache_clear()
    assert rendered() == expected
    assert {f: f.stat().st_size for f in files} == sizes          # rewritten whole


def test_garbage_template_bytecode_is_ignored(cache, fresh_jinja):
    expected = rendered()
    for f in (cache / "templates").iterdir():
        f.write_bytes(jinja2.bccache.bc_magic + b"\x80\x02garbage" * 8)
    render_mod.environment.cache_clear()
    assert rendered() == expected


def test_unwritable_template_cache_renders_without_it_and_warns_once(unwritable_cache, fresh_jinja):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        source = rendered()
        render_mod.environment.cache_clear()
        assert rendered() == source
    assert "attn_d64_bf16_causal_fwd" in source
    assert len(cache_warnings(record)) == 1, [str(w.message) for w in record]
