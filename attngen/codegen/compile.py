"""Binary: NVRTC compilation through CuPy's NVRTC binding, the ptxas resource report, the disk cache.

CuPy's high-level compiler asks the CUDA driver for the architecture, so it fails on a machine with no
GPU. The low-level binding (cupy_backends.cuda.libs.nvrtc) needs neither a GPU nor a driver when it is
given an explicit -arch, so attngen compiles through it everywhere and loads the cubin with CuPy.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CompileError

# --no-source-include: nothing is read from the source's folder (the sources include no file at all).
SERIALIZED_WGMMA = "wgmma.mma_async instructions are serialized"   # ptxas's performance note (C7510-C7520)
COMPILE_OPTIONS = ("-std=c++17", "--use_fast_math", "--ptxas-options=-v", "-lineinfo", "--no-source-include")


@dataclass(frozen=True)
class Resources:
    """What ptxas reported for one kernel."""

    registers: int
    spill_stores: int | None      # None: not known (the report came from the cubin, not from ptxas)
    spill_loads: int | None
    stack_frame: int
    static_smem: int
    wgmma_serialized: bool = False   # ptxas serialised the kernel's wgmma (C75xx "Potential Performance Loss")

    @property
    def spill_bytes(self) -> int | None:
        if self.spill_stores is None or self.spill_loads is None:
            return None
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

    while _pending_warnings:
        warn_unwritable(*_pending_warnings.pop())

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
    start = log.find(f"Function properties for {kernel_name}\n")   # (the name whole: `_decode` is a prefix of `_decode_combine`)
    if start < 0:
        start = log.find(f"Compiling entry function '{kernel_name}'")
    if start < 0:
        raise CompileError(f"no ptxas report for kernel '{kernel_name}' in the NVRTC log:\n{log}")
    end = log.find("Compiling entry function", start + 1)
    section = log[start:end if end > 0 else len(log)]    # not the next kernel's lines (a field may be absent)
    values = {}
    for field, pattern in _REPORT.items():
        match = pattern.search(section)
        values[field] = int(match.group(1)) if match else 0
    # the note names the function it serialised (the kernel, or a lambda inside it: its name holds the kernel's)
    values["wgmma_serialized"] = any(SERIALIZED_WGMMA in line and kernel_name in line for line in log.splitlines())
    return Resources(**values)


def cache_dir() -> Path:
    root = os.environ.get("ATTNGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attngen")
    return Path(root)


_warned_folders: set[str] = set()
_private: dict[str, Path] = {}
_private_lock = threading.Lock()
_pending_warnings: list = []          # (folder, error, consequence) to warn about on first use


def warn_unwritable(folder: Path, exc: OSError, what: str) -> None:
    """One warning per process and folder: a cache that cannot be written slows calls down, it does not
    stop them."""
    key = str(folder)
    if key in _warned_folders:
        return
    _warned_folders.add(key)
    reason = exc.strerror or type(exc).__name__
    warnings.warn(f"attngen: cannot write the cache folder {key} ({reason}); {what}", RuntimeWarning, stacklevel=3)


def private_folder() -> Path:
    """A folder of this process's own under the system temp dir (removed at exit), for files CuPy must load
    from a path when the cache folder cannot be written."""
    with _private_lock:
        if "dir" not in _private:
            _private["dir"] = Path(tempfile.mkdtemp(prefix="attngen-"))
            atexit.register(shutil.rmtree, _private["dir"], True)
        return _private["dir"]


def _folder_usable(folder: str) -> bool:
    """Could `folder` be created and written? Looks only; creates nothing."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _prepare_cupy_cache() -> None:
    """CuPy creates its kernel cache folder (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache) when it is
    imported, and the import fails where that folder cannot be made (HOME read-only, or a file). Point
    it at a private temp folder first, so that attngen (which needs CuPy even for offline NVRTC) still
    works. CuPy reads the variable once, at import: afterwards there is nothing to do."""
    if "cupy" in sys.modules:
        return
    folder = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
    if _folder_usable(folder):
        return
    try:
        fallback = private_folder() / "cupy"
    except OSError:
        return                                   # nowhere better: CuPy's own error will say why
    os.environ["CUPY_CACHE_DIR"] = str(fallback)
    # Said on first use (nvrtc_version), not here: a warning raised during `import attngen` points nowhere.
    _pending_warnings.append((Path(folder), OSError(errno.EACCES, "not a folder that can be made or written"),
                              f"CuPy's kernel cache goes to {fallback} for this process"))


_prepare_cupy_cache()


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
        try:
            os.unlink(tmp)
        except OSError:
            pass                                      # keep the write's own error, not the cleanup's
        raise


def nvrtc_compile(source: str, name: str, arch: str, kernel_name: str,
                  options: tuple[str, ...] = COMPILE_OPTIONS) -> Binary:
    """Compile with NVRTC for an explicit arch (no GPU or driver needed). No cache."""
    from cupy_backends.cuda.libs import nvrtc

    version = nvrtc_version()
    key = cache_key(source, arch, options, version)
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            src_path = _dump_failed_source(source, name, key, log)
            raise CompileError(f"NVRTC failed to compile {name} for {arch} ({exc}); source: "
                               f"{src_path or 'not saved (no writable folder)'}\n{log}",
                               log=log, source_path=src_path) from None
        log = nvrtc.getProgramLog(prog)
        cubin = nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    cubin = _complete_elf(bytes(cubin))
    # Where a driver is present NVRTC may take the program from the CUDA compute cache and skip ptxas
    # (the log is then empty); the cubin's own attributes still say registers and stack frame.
    resources = parse_ptxas_report(log, kernel_name) if "ptxas" in log else parse_cubin_resources(cubin, kernel_name)
    return Binary(arch, cubin, ptx.rstrip("\0"), log, resources, version, key)


def nvrtc_errors(source: str, name: str) -> str | None:
    """Front-end check only (virtual arch, no ptxas): None if the source compiles, else NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=compute_80", "-std=c++17", "--no-source-include"])
        return None
    except nvrtc.NVRTCError:
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


EIATTR_REGCOUNT, EIATTR_FRAME_SIZE = 0x2F, 0x11   # .nv.info attributes holding (symbol index, value)


def _elf_sections(cubin: bytes) -> dict:
    e_shoff, = struct.unpack_from("<Q", cubin, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    names = headers[e_shstrndx][4]

    def c_string(at):
        return cubin[at:cubin.index(b"\0", at)].decode()

    return {c_string(names + h[0]): cubin[h[4]:h[4] + h[5]] for h in headers}


def parse_cubin_resources(cubin: bytes, kernel_name: str) -> Resources:
    """Registers and stack frame from the cubin's .nv.info attributes. Spill counts are not recorded
    there and come back as None (the kernels have no local arrays, so a stack frame means spills)."""
    sections = _elf_sections(cubin)
    symtab, strtab = sections[".symtab"], sections[".strtab"]
    wanted = kernel_name.encode() + b"\0"
    symbol = next(i for i in range(len(symtab) // 24)
                  if strtab[struct.unpack_from("<I", symtab, 24 * i)[0]:].startswith(wanted))
    info, values, i = sections.get(".nv.info", b""), {}, 0
    while i + 2 <= len(info):
        fmt, attr = info[i], info[i + 1]
        if fmt == 4:                                   # EIFMT_SVAL: a 16-bit size, then the payload
            size, = struct.unpack_from("<H", info, i + 2)
            if attr in (EIATTR_REGCOUNT, EIATTR_FRAME_SIZE) and size == 8:
                owner, value = struct.unpack_from("<II", info, i + 4)
                if owner == symbol:
                    values[attr] = value
            i += 4 + size
        else:                                          # EIFMT_NVAL: no value; BVAL, HVAL: 2 bytes
            i += 4 if fmt in (2, 3) else 2
    if EIATTR_REGCOUNT not in values:
        raise CompileError(f"no ptxas report and no register count in the cubin for kernel '{kernel_name}'")
    return Resources(values[EIATTR_REGCOUNT], None, None, values.get(EIATTR_FRAME_SIZE, 0), 0)


def _complete_elf(cubin: bytes) -> bytes:
    """CuPy's getCUBIN drops the last byte of the image (it treats it as a C string's NUL); put back the
    zero bytes up to the end the ELF header declares, so cuobjdump and other tools can read the file."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF":
        return cubin
    e_phoff, e_shoff = struct.unpack_from("<QQ", cubin, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    return cubin + b"\0" * max(0, end - len(cubin))


def _dump_failed_source(source: str, name: str, key: str, log: str = "") -> Path | None:
    """Keep the source NVRTC refused (and its log beside it) for the error message; in the cache, else in
    the private temp folder. Never raises: the compile error is what the caller must see."""
    folder = cache_dir() / "failed"
    for attempt in (folder, None):
        try:
            where = attempt if attempt is not None else private_folder() / "failed"
            path = where / f"{name}-{key}.cu"
            atomic_write(path, source.encode())
            atomic_write(path.with_suffix(".log"), log.encode())
            return path
        except OSError as exc:
            if attempt is not None:
                warn_unwritable(cache_dir(), exc, "the failed source goes to a private temp folder")
    return None


def _cached_entry(cubin_path: Path, meta_path: Path, arch: str, version: str, key: str) -> Binary | None:
    """The cache entry if it is whole: its meta parses and the cubin has the recorded length and sha256.
    Anything else (missing, truncated, garbage, swapped files) is a miss; the caller rebuilds and
    overwrites it."""
    try:
        meta = json.loads(meta_path.read_bytes())
        cubin = cubin_path.read_bytes()
        resources = meta["resources"]
        numbers = [resources[f] for f in ("registers", "stack_frame", "static_smem")]
        spills = [resources[f] for f in ("spill_stores", "spill_loads")]
        whole = (len(cubin) == meta["cubin_bytes"] and hashlib.sha256(cubin).hexdigest() == meta["cubin_sha256"]
                 and isinstance(meta["log"], str) and set(resources) == set(Resources.__dataclass_fields__)
                 and all(type(v) is int for v in numbers) and all(v is None or type(v) is int for v in spills))
        return Binary(arch, cubin, "", meta["log"], Resources(**resources), version, key) if whole else None
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON (or not UTF-8), wrong shape
        return None


def compile_cached(source: str, name: str, arch: str, kernel_name: str,
                   options: tuple[str, ...] = COMPILE_OPTIONS) -> tuple[Binary, Path]:
    """nvrtc_compile behind a disk cache keyed on source, options, arch and NVRTC version.

    Returns the binary and the path of its cubin (CuPy loads it from there): in the cache, or, where the
    cache folder cannot be written, in a private temp folder of this process (with one warning)."""
    version = nvrtc_version()
    key = cache_key(source, arch, options, version)
    folder = cache_dir() / "kernels"
    cubin_path, meta_path = folder / f"{key}.cubin", folder / f"{key}.json"
    cached = _cached_entry(cubin_path, meta_path, arch, version, key)
    if cached is not None:
        return cached, cubin_path
    binary = nvrtc_compile(source, name, arch, kernel_name, options)
    meta = {"log": binary.log, "resources": asdict(binary.resources), "cubin_bytes": len(binary.cubin),
            "cubin_sha256": hashlib.sha256(binary.cubin).hexdigest()}
    try:
        atomic_write(cubin_path, binary.cubin)       # the cubin first: meta without it is a miss, not a hit
        atomic_write(meta_path, json.dumps(meta).encode())
        return binary, cubin_path
    except OSError as exc:
        warn_unwritable(cache_dir(), exc, "compiled kernels are kept in a private temp folder for this process")
    private = private_folder() / f"{key}.cubin"
    atomic_write(private, binary.cubin)
    return binary, private
