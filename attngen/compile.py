"""Binary: NVRTC compilation through CuPy's NVRTC binding, the ptxas resource report, the disk cache.

CuPy's high-level compiler asks the CUDA driver for the architecture, so it fails on a machine with no
GPU. The low-level binding (cupy_backends.cuda.libs.nvrtc) needs neither a GPU nor a driver when it is
given an explicit -arch, so attngen compiles through it everywhere and loads the cubin with CuPy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CompileError

COMPILE_OPTIONS = ("-std=c++17", "--use_fast_math", "--ptxas-options=-v", "-lineinfo")


@dataclass(frozen=True)
class Resources:
    """What ptxas reported for one kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class Binary:
    arch: str
    cubin: bytes
    ptx: str
    log: str
    resources: Resources
    nvrtc_version: str
    cache_key: str

    def report(self) -> dict:
        return asdict(self.resources) | {"spill_bytes": self.resources.spill_bytes, "arch": self.arch,
                                         "nvrtc_version": self.nvrtc_version, "cache_key": self.cache_key}


def nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


_REPORT = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_report(log: str, kernel_name: str) -> Resources:
    """Pick the block of the ptxas -v log that belongs to `kernel_name`."""
    start = log.find(f"Function properties for {kernel_name}")
    if start < 0:
        start = log.find(f"Compiling entry function '{kernel_name}'")
    if start < 0:
        raise CompileError(f"no ptxas report for kernel '{kernel_name}' in the NVRTC log:\n{log}")
    section = log[start:]
    values = {}
    for field, pattern in _REPORT.items():
        match = pattern.search(section)
        values[field] = int(match.group(1)) if match else 0
    return Resources(**values)


def cache_dir() -> Path:
    root = os.environ.get("ATTNGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attngen")
    return Path(root)


def cache_key(source: str, arch: str, options: tuple[str, ...], version: str) -> str:
    h = hashlib.sha256()
    for part in (source, arch, "\0".join(options), version):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def ptxas_always_runs():
    """Where a driver is present, NVRTC serves repeated programs from the CUDA compute cache and then
    skips ptxas, so the log lacks the resource report. CUDA_CACHE_DISABLE=1 turns that off; it is set
    only around our own compile so the caller's JIT caching is left alone."""
    previous = os.environ.get("CUDA_CACHE_DISABLE")
    os.environ["CUDA_CACHE_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CUDA_CACHE_DISABLE"]
        else:
            os.environ["CUDA_CACHE_DISABLE"] = previous


def nvrtc_compile(source: str, name: str, arch: str, kernel_name: str,
                  options: tuple[str, ...] = COMPILE_OPTIONS) -> Binary:
    """Compile with NVRTC for an explicit arch (no GPU or driver needed). No cache."""
    from cupy_backends.cuda.libs import nvrtc

    version = nvrtc_version()
    key = cache_key(source, arch, options, version)
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            with ptxas_always_runs():
                nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            src_path = _dump_failed_source(source, name, key)
            raise CompileError(f"NVRTC failed to compile {name} for {arch} ({exc}); source: {src_path}\n{log}") from None
        log = nvrtc.getProgramLog(prog)
        cubin = nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    return Binary(arch, _complete_elf(bytes(cubin)), ptx.rstrip("\0"), log, parse_ptxas_report(log, kernel_name), version, key)


def _complete_elf(cubin: bytes) -> bytes:
    """CuPy's getCUBIN drops the last byte of the image (it treats it as a C string's NUL); put back the
    zero bytes up to the end the ELF header declares, so cuobjdump and other tools can read the file."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF":
        return cubin
    e_phoff, e_shoff = struct.unpack_from("<QQ", cubin, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    return cubin + b"\0" * max(0, end - len(cubin))


def _dump_failed_source(source: str, name: str, key: str) -> Path:
    path = cache_dir() / "failed" / f"{name}-{key}.cu"
    atomic_write(path, source.encode())
    return path


def compile_cached(source: str, name: str, arch: str, kernel_name: str,
                   options: tuple[str, ...] = COMPILE_OPTIONS) -> tuple[Binary, Path]:
    """nvrtc_compile behind a disk cache keyed on source, options, arch and NVRTC version.

    Returns the binary and the path of its cubin in the cache (CuPy loads it from there)."""
    version = nvrtc_version()
    key = cache_key(source, arch, options, version)
    folder = cache_dir() / "kernels"
    cubin_path, meta_path = folder / f"{key}.cubin", folder / f"{key}.json"
    if cubin_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        binary = Binary(arch, cubin_path.read_bytes(), "", meta["log"], Resources(**meta["resources"]), version, key)
        return binary, cubin_path
    binary = nvrtc_compile(source, name, arch, kernel_name, options)
    atomic_write(cubin_path, binary.cubin)
    atomic_write(meta_path, json.dumps({"log": binary.log, "resources": asdict(binary.resources)}).encode())
    return binary, cubin_path
