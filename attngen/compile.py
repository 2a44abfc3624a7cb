"""Binary: NVRTC compilation through CuPy's NVRTC binding, the ptxas resource report, the disk cache.

CuPy's high-level compiler asks the CUDA driver for the architecture, so it fails on a machine with no
GPU. The low-level binding (cupy_backends.cuda.libs.nvrtc) needs neither a GPU nor a driver when it is
given an explicit -arch, so attngen compiles through it everywhere and loads the cubin with CuPy.
"""

from __future__ import annotations

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
    spill_stores: int | None      # None: not known (the report came from the cubin, not from ptxas)
    spill_loads: int | None
    stack_frame: int
    static_smem: int

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
            src_path = _dump_failed_source(source, name, key)
            raise CompileError(f"NVRTC failed to compile {name} for {arch} ({exc}); source: {src_path}\n{log}") from None
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
        nvrtc.compileProgram(prog, ["-arch=compute_80", "-std=c++17"])
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
