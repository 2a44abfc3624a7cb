"""Spec: the validated, frozen description of the attention kernel to generate."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecError, shown

DTYPES = ("fp16", "bf16", "fp8_e4m3")
FP8_HEAD_DIMS = (128, 256)    # the 128-byte swizzle holds 128 fp8 columns: whole chunks only (d64 needs the 64-byte one)
HEAD_DIM_MIN, HEAD_DIM_MAX = 1, 256   # FlashAttention's range: kernels pad to 16 inside their loads and stores
TILE_KEYS = ("block_m", "block_n", "warps", "stages", "path")
TILE_PATHS = ("mma_sync", "wgmma")     # the forward kernel paths (wgmma: Hopper, sm_90a)
MASK_BLOCK_DEFAULT = 128
MASK_BLOCK_SIZES = (16, 32, 64, 128, 256)
LAYOUTS = ("batch", "varlen", "kvcache")   # varlen: sequences packed along one token axis, bounded by cu_seqlens;
                                           # kvcache: new queries against a KV cache (decode), contiguous or paged
PAGE_SIZE_MAX = 256
RUNTIME_MASK_KIND = "runtime"     # a block layout given at call time (a BlockMask), no element predicate
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")   # used with fullmatch: "$" would allow a trailing "\n"


@dataclass(frozen=True)
class TileOverride:
    """A tile configuration forced by the spec; the planner still checks it against the budget."""

    block_m: int
    block_n: int
    warps: int
    stages: int = 2
    path: str = "mma_sync"    # "mma_sync" | "wgmma" (Hopper)


@dataclass(frozen=True)
class Spec:
    """What to generate. Keyword-only; every field is validated on construction."""

    head_dim: int
    dtype: str = "bf16"
    causal: bool = False
    head_dim_v: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    scale: float | None = None
    tile: TileOverride | None = None
    name: str | None = None
    mask: dict | None = None     # the spec's `mask:` section (attngen.masks.pattern_from_dict), validated
    softcap: float | None = None   # scores become softcap * tanh(score / softcap) (Gemma 2, Grok)
    alibi: bool = False          # add -slope[h] * |aligned q_idx - kv_idx| (slopes given at call time)
    score_mod: str | None = None   # CUDA float expression (attngen.expressions)
    mask_mod: str | None = None    # CUDA boolean expression, ANDed with the mask
    score_mod_grad: str | None = None   # d(score_mod)/d(score) as a CUDA float expression (training)
    tensors: dict | None = None    # named tensors the expressions read: name -> {dtype, shape}
    backward: bool = False       # `attngen build` also emits the backward kernels (the API builds them on demand)
    deterministic: bool = False  # backward: dQ in its own pass (bit-identical run to run) instead of atomics
    layout: str = "batch"        # "batch": [batch, seqlen, heads, dim]; "varlen": packed [total, heads, dim] + cu_seqlens
    page_size: int | None = None   # layout kvcache: rows per page of a paged cache (None: a contiguous cache)

    def __init__(self, *, head_dim, dtype="bf16", causal=False, head_dim_v=None, num_heads=None,
                 num_kv_heads=None, scale=None, tile=None, name=None, mask=None, softcap=None, alibi=False,
                 score_mod=None, mask_mod=None, tensors=None, backward=False, score_mod_grad=None,
                 deterministic=False, layout="batch", page_size=None):
        values = dict(head_dim=head_dim, dtype=dtype, causal=causal, head_dim_v=head_dim_v,
                      num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, tile=tile, name=name,
                      mask=mask, softcap=softcap, alibi=alibi, score_mod=score_mod, mask_mod=mask_mod,
                      tensors=tensors, backward=backward, score_mod_grad=score_mod_grad, deterministic=deterministic,
                      layout=layout, page_size=page_size)
        for field, value in _validated(values).items():
            object.__setattr__(self, field, value)

    def __hash__(self):
        # computed once: specs key every cache on the call path (kernels, variants)
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(json.dumps(self.to_dict(), sort_keys=True))
            object.__setattr__(self, "_hash", cached)
        return cached

    # ---- derived values -------------------------------------------------------------------------
    @property
    def mask_pattern(self):
        """The mask pattern object (attngen.masks) the `mask:` section describes, or None."""
        if self.mask is None or self.mask.get("kind") == RUNTIME_MASK_KIND:
            return None
        from .masks import pattern_from_dict

        return pattern_from_dict(pattern_fields(self.mask))

    @property
    def mask_element(self):
        """The pattern a runtime layout's partial blocks evaluate (`mask: {kind: runtime, element: ...}`), or None."""
        if self.mask is None or self.mask.get("kind") != RUNTIME_MASK_KIND or "element" not in self.mask:
            return None
        from .masks import pattern_from_dict

        return pattern_from_dict(self.mask["element"], "mask.element")

    @property
    def mask_block_size(self) -> tuple[int, int]:
        """(rows, cols) of the block-sparse layout; 128 x 128 unless the mask says otherwise."""
        size = (self.mask or {}).get("block_size", MASK_BLOCK_DEFAULT)
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def elem_bytes(self) -> int:
        """Bytes of a q, k or v element."""
        return 1 if self.dtype == "fp8_e4m3" else 2

    @property
    def fp8(self) -> bool:
        return self.dtype == "fp8_e4m3"

    @property
    def out_dtype(self) -> str:
        """The output's dtype: the inputs', except fp8 inputs give bf16 (as FlashAttention-3's FP8 forward)."""
        return "bf16" if self.fp8 else self.dtype

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def forward_spec(self) -> "Spec":
        """The spec the forward kernel is built from: `deterministic` only changes the backward, so both
        settings share one forward kernel."""
        return Spec(**(self.to_dict() | {"deterministic": False})) if self.deterministic else self

    # ---- construction from data ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data) -> "Spec":
        if not isinstance(data, dict):
            raise SpecError("<spec>", type(data).__name__, "a mapping of spec keys")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                raise SpecError(str(key), data[key], "a known key: " + ", ".join(allowed))
        if "head_dim" not in data:
            raise SpecError("head_dim", None, f"required: an int in {HEAD_DIM_MIN}..{HEAD_DIM_MAX}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path) -> "Spec":
        """Load a spec file: UTF-8, YAML's safe subset, each key once per mapping. A layout mask's relative
        `path` is taken from the spec file's folder (a spec travels with its layouts), not the working one."""
        import yaml  # PyYAML; imported here so the package imports without it

        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError("<yaml>", str(path), f"UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start} "
                            "is not UTF-8)") from None
        try:
            data = yaml.load(text, Loader=_unique_key_loader())
        except yaml.YAMLError as exc:
            message = " ".join(str(exc).split())
            message = message if len(message) <= 200 else message[:200] + "..."
            raise SpecError("<yaml>", str(path), f"valid YAML ({message})") from None
        if isinstance(data, dict) and isinstance(data.get("mask"), dict):
            data = data | {"mask": _layout_paths_from(data["mask"], Path(path).absolute().parent)}
        return cls.from_dict(data)


@functools.lru_cache(maxsize=1)
def _unique_key_loader():
    """yaml.SafeLoader, refusing a key given twice in one mapping (PyYAML would keep the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:   # the node's own keys: a merge (<<) may be overridden
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in seen:
                        raise SpecError(str(key), f"given twice (lines {seen[key]} and {line})",
                                        "each key once per mapping")
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _layout_paths_from(mask, folder: Path):
    """The mask section with every layout's relative `path` made absolute from `folder` (nested and/or
    parts included)."""
    if isinstance(mask, list):
        return [_layout_paths_from(part, folder) for part in mask]
    if not isinstance(mask, dict):
        return mask
    out = {key: _layout_paths_from(value, folder) for key, value in mask.items()}
    path = out.get("path")
    if out.get("kind") == "layout" and isinstance(path, str) and path and not Path(path).is_absolute():
        out["path"] = str(folder / path)
    return out


# ---- validation -----------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _head_dim(field, value):
    if not _is_int(value) or not HEAD_DIM_MIN <= value <= HEAD_DIM_MAX:
        raise SpecError(field, value, f"an int in {HEAD_DIM_MIN}..{HEAD_DIM_MAX}")
    return value


def _positive_int_or_none(field, value):
    if value is not None and (not _is_int(value) or value < 1):
        raise SpecError(field, value, "a positive int or null")
    return value


def _positive_float(field, value, default_note):
    if value is None:
        return None
    allowed = f"a positive finite number or null {default_note}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(field, value, allowed)
    try:
        as_float = float(value)
    except OverflowError:
        raise SpecError(field, value, allowed) from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise SpecError(field, value, allowed)
    return as_float


def _tile(value):
    if value is None:
        return value
    if isinstance(value, TileOverride):
        value = dataclasses.asdict(value)    # an instance gets the same checks as a mapping
    if not isinstance(value, dict):
        raise SpecError("tile", value, "a mapping with keys " + ", ".join(TILE_KEYS))
    for key in value:
        if key not in TILE_KEYS:
            raise SpecError(f"tile.{key}", value[key], "one of the keys " + ", ".join(TILE_KEYS))
    for key in ("block_m", "block_n", "warps"):
        if key not in value:
            raise SpecError(f"tile.{key}", None, "required when 'tile' is given")
    checks = {"block_m": (16, 256, 16), "block_n": (16, 256, 16), "warps": (1, 16, 1), "stages": (2, 4, 1)}
    for key, (low, high, step) in checks.items():
        v = value.get(key, 2 if key == "stages" else None)
        if not _is_int(v) or not low <= v <= high or v % step:
            raise SpecError(f"tile.{key}", v, f"an int in {low}..{high}" + (f", a multiple of {step}" if step > 1 else ""))
    path = value.get("path", "mma_sync")
    if path not in TILE_PATHS:
        raise SpecError("tile.path", path, " | ".join(TILE_PATHS))
    return TileOverride(value["block_m"], value["block_n"], value["warps"], value.get("stages", 2), path)


def _mask(value):
    """Validate the mask section by building its pattern once; keep the plain mapping."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpecError("mask", value, "a mapping with a 'kind' key (see attngen.masks)")
    value = dict(value)
    size = value.get("block_size", MASK_BLOCK_DEFAULT)
    sizes = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or any(   # [64] is neither form
            isinstance(x, bool) or x not in MASK_BLOCK_SIZES for x in sizes):
        raise SpecError("mask.block_size", size, f"one of {MASK_BLOCK_SIZES} or a [rows, cols] pair of them")
    if value.get("kind") == RUNTIME_MASK_KIND:
        unknown = set(value) - {"kind", "block_size", "element"}
        if unknown:
            raise SpecError(f"mask.{sorted(unknown)[0]}", value[sorted(unknown)[0]],
                            "only 'kind', 'block_size' and 'element' for a runtime block layout")
        if "element" in value:    # the pattern partial blocks evaluate (BlockMask.kernel_predicate())
            from .masks import pattern_from_dict, table_parts

            element = pattern_from_dict(value["element"], "mask.element")
            if table_parts(element):
                raise SpecError("mask.element", element.name, "a pattern without a block table (layout, bigbird)")
            value["element"] = element.to_dict()
        return value
    from .masks import check_kernel_pattern, pattern_from_dict

    pattern = pattern_from_dict(pattern_fields(value))   # raises SpecError naming the mask field
    check_kernel_pattern(pattern, tuple(sizes) * (2 if len(sizes) == 1 else 1))
    return value


# A named tensor becomes a kernel parameter, a ModContext member and a local of the expression functions,
# so its name must not collide with anything the generated C++ (or the language) already means.
CPP_KEYWORDS = frozenset("""
    alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t char32_t class
    compl concept const consteval constexpr constinit const_cast continue co_await co_return co_yield decltype
    default delete do double dynamic_cast else enum explicit export extern false final float for friend goto if
    import inline int long module mutable namespace new noexcept not not_eq nullptr operator or or_eq override
    private protected public register reinterpret_cast requires restrict return short signed sizeof static
    static_assert static_cast struct switch template this thread_local throw true try typedef typeid typename
    union unsigned using virtual void volatile wchar_t while xor xor_eq _Bool _Complex _Imaginary
    """.split())
_MATH_BASES = """sqrt rsqrt cbrt exp exp2 exp10 expm1 log log2 log10 log1p pow sin cos tan asin acos atan atan2 sinh
    cosh tanh asinh acosh atanh fabs floor ceil trunc round rint nearbyint fmod remainder fmin fmax fma fdim erf
    erfc lgamma tgamma hypot copysign ldexp frexp modf""".split()
CUDA_NAMES = frozenset(_MATH_BASES + [b + "f" for b in _MATH_BASES] + """abs min max isnan isinf isfinite signbit
    threadIdx blockIdx blockDim gridDim warpSize dim3 half half2 nv_bfloat16 nv_bfloat162 size_t ptrdiff_t
    int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t printf malloc free memcpy memset
    assert""".split())
_VECTOR_TYPE_RE = re.compile(r"(u?char|u?short|u?int|u?long|u?longlong|float|double)[1-4]|make_\w+")
_TENSOR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_TENSOR_NAME_RULE = ("a C identifier of at most 32 characters that is not a C++ keyword, a CUDA or math name, or a "
                     "name the generated kernel uses, and does not start with '__' or 'attngen_'")


@functools.lru_cache(maxsize=1)
def generated_names() -> frozenset:
    """Every identifier in the C++ of the kernel templates (Jinja tags, comments and strings left out):
    a tensor of one of these names would shadow or redeclare it somewhere in a kernel."""
    from .codegen.jinja_env import templates_dir

    names = set()
    for path in sorted(templates_dir().rglob("*.j2")):
        text = re.sub(r"\{#.*?#\}|\{\{.*?\}\}|\{%.*?%\}", " ", path.read_text(), flags=re.S)
        text = re.sub(r'"(?:[^"\\\n]|\\.)*"|/\*.*?\*/|//[^\n]*', " ", text, flags=re.S)
        names.update(re.findall(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*", text))
    return frozenset(names)


def _tensor_names(tensors: dict | None) -> dict | None:
    """Whitelist rule for the names of `tensors:` (their declarations are checked by validate_tensors)."""
    from .expressions import RESERVED_NAMES

    for name in tensors or {}:
        if not isinstance(name, str) or not _TENSOR_NAME_RE.fullmatch(name):
            why = "is not such an identifier"
        elif name in CPP_KEYWORDS:
            why = "is a C++ keyword"
        elif name in CUDA_NAMES or _VECTOR_TYPE_RE.fullmatch(name):
            why = "is a CUDA or math name"
        elif name in RESERVED_NAMES or name in generated_names():
            why = "is a name the generated kernel uses"
        elif name.startswith(("__", "attngen_")):
            why = "starts with a reserved prefix"
        else:
            continue
        raise SpecError("tensors", name, f"{_TENSOR_NAME_RULE} ({shown(name, 40)} {why})")
    return tensors


def pattern_fields(mask: dict) -> dict:
    """The mask section less the layout's block size (patterns that need one name it themselves)."""
    if mask.get("kind") in ("bigbird", "layout"):
        return dict(mask)
    return {k: v for k, v in mask.items() if k != "block_size"}


def _validated(values: dict) -> dict:
    out = dict(values)
    out["head_dim"] = _head_dim("head_dim", values["head_dim"])
    hv = values["head_dim_v"]
    out["head_dim_v"] = out["head_dim"] if hv is None else _head_dim("head_dim_v", hv)
    if values["dtype"] not in DTYPES:
        raise SpecError("dtype", values["dtype"], " | ".join(DTYPES))
    if not isinstance(values["causal"], bool):
        raise SpecError("causal", values["causal"], "true or false")
    nh = _positive_int_or_none("num_heads", values["num_heads"])
    nkv = _positive_int_or_none("num_kv_heads", values["num_kv_heads"])
    if nh is not None and nkv is not None and nh % nkv:
        raise SpecError("num_kv_heads", nkv, f"a divisor of num_heads={nh} (GQA groups must be equal)")
    if nkv is not None and nh is None:
        raise SpecError("num_heads", None, "an int when num_kv_heads is given")
    out["scale"] = _positive_float("scale", values["scale"], "(default 1/sqrt(head_dim))")
    out["softcap"] = _positive_float("softcap", values["softcap"], "(no capping)")
    for flag in ("alibi", "backward", "deterministic"):
        if not isinstance(values[flag], bool):
            raise SpecError(flag, values[flag], "true or false")
    from .expressions import validate_expression, validate_tensors

    out["tensors"] = _tensor_names(validate_tensors(values["tensors"]))
    out["score_mod"] = validate_expression("score_mod", values["score_mod"], out["tensors"])
    out["mask_mod"] = validate_expression("mask_mod", values["mask_mod"], out["tensors"])
    out["score_mod_grad"] = validate_expression("score_mod_grad", values["score_mod_grad"], out["tensors"])
    if out["score_mod_grad"] is not None and out["score_mod"] is None:
        raise SpecError("score_mod_grad", values["score_mod_grad"], "null unless score_mod is given (it is its derivative)")
    if out["tensors"] and out["score_mod"] is None and out["mask_mod"] is None:
        raise SpecError("tensors", values["tensors"], "null unless score_mod or mask_mod reads them")
    out["tile"] = _tile(values["tile"])
    out["mask"] = _mask(values["mask"])
    if values["layout"] not in LAYOUTS:
        raise SpecError("layout", values["layout"], " | ".join(LAYOUTS))
    if values["layout"] == "varlen":
        if out["mask"] is not None and out["mask"].get("kind") == RUNTIME_MASK_KIND:
            raise SpecError("mask", out["mask"], "a pattern (evaluated per sequence) with layout: varlen; a runtime "
                            "block layout spans one [batch, seqlen] problem")
        if out["tensors"]:
            raise SpecError("tensors", values["tensors"], "null with layout: varlen (named tensors are shaped by "
                            "[batch, seqlen] sizes)")
    out["page_size"] = _kvcache_fields(values, out)
    _fp8_fields(values, out)
    if out["mask"] is not None and out["causal"]:
        raise SpecError("causal", True, "false when a mask is given: make causality part of the mask "
                        "({kind: causal}, or {kind: and, of: [{kind: causal}, ...]})")
    name = values["name"]
    if name is None:
        name = _default_name(out)
    elif not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SpecError("name", name, "an identifier: letters, digits and '_', at most 64 characters")
    out["name"] = name
    return out


def _kvcache_fields(values: dict, out: dict) -> int | None:
    """page_size, checked with what a decode kernel over a KV cache covers: masks that are one run of keys
    per query (causal, sliding_window, document and their `and`s), the built-in modifiers, no backward."""
    page_size = values["page_size"]
    if values["layout"] != "kvcache":
        if page_size is not None:
            raise SpecError("page_size", page_size, "null unless layout: kvcache")
        return None
    if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int)
                                  or not 1 <= page_size <= PAGE_SIZE_MAX):
        raise SpecError("page_size", page_size, f"an int in 1..{PAGE_SIZE_MAX} (rows per page), or null for a "
                        "contiguous cache")
    mask = out["mask"]
    if mask is not None:
        from .masks import pattern_from_dict

        if mask.get("kind") == RUNTIME_MASK_KIND or pattern_from_dict(pattern_fields(mask)).cuda_spans() is None:
            raise SpecError("mask", mask.get("kind"), "with layout: kvcache, a pattern that is one run of keys per "
                            "query: causal, sliding_window, document, or an `and` of them")
    for field in ("score_mod", "mask_mod", "tensors"):
        if out[field]:
            raise SpecError(field, values[field], "null with layout: kvcache (the decode kernel takes the built-in "
                            "modifiers: scale, softcap, alibi)")
    if out["backward"] or out["deterministic"]:
        raise SpecError("backward", True, "false with layout: kvcache (decode has no backward)")
    return page_size


def _fp8_fields(values: dict, out: dict) -> None:
    """What the FP8 forward covers: Hopper's wgmma with both operands K-major, so whole 128-column chunks of
    the head dims, the batch layout, and no backward (FlashAttention-3's FP8 is forward only too)."""
    if values["dtype"] != "fp8_e4m3":
        return
    if out["head_dim"] not in FP8_HEAD_DIMS or out["head_dim_v"] != out["head_dim"]:
        raise SpecError("head_dim", (out["head_dim"], out["head_dim_v"]), "with dtype: fp8_e4m3, head_dim = "
                        f"head_dim_v in {FP8_HEAD_DIMS} (whole 128-byte rows of the tensor cores' swizzle)")
    if values["layout"] != "batch":
        raise SpecError("layout", values["layout"], "batch with dtype: fp8_e4m3")
    if out["backward"] or out["deterministic"]:
        raise SpecError("backward", True, "false with dtype: fp8_e4m3 (the FP8 path is forward only)")
    if out["tile"] is not None and out["tile"].path != "wgmma":
        raise SpecError("tile", values["tile"], "a wgmma tile with dtype: fp8_e4m3 (Hopper's FP8 tensor cores)")


MASK_NAME_MAX = 40     # longer mask names keep their start and a hash of the whole


def _mask_name(mask: dict) -> str:
    """The mask's part of a default name: the pattern's name with its parameters, or runtime, its block size
    and its element pattern."""
    from .masks import pattern_from_dict

    if mask.get("kind") == RUNTIME_MASK_KIND:
        rows, cols = (lambda s: (s, s) if isinstance(s, int) else tuple(s))(mask.get("block_size", MASK_BLOCK_DEFAULT))
        name = f"runtime{rows}" + (f"x{cols}" if cols != rows else "")
        if "element" in mask:
            name += "_" + pattern_from_dict(mask["element"], "mask.element").name
    else:
        name = pattern_from_dict(pattern_fields(mask)).name
    name = re.sub(r"\W+", "_", name).strip("_")
    if "[" in json.dumps({k: v for k, v in mask.items() if k != "block_size"}):   # lists are named by count only
        name += "_" + hashlib.sha1(json.dumps(mask, sort_keys=True).encode()).hexdigest()[:6]
    if len(name) > MASK_NAME_MAX:
        name = name[:MASK_NAME_MAX - 7] + "_" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return name


def _default_name(v: dict) -> str:
    parts = [f"d{v['head_dim']}"]
    if v["head_dim_v"] != v["head_dim"]:
        parts.append(f"dv{v['head_dim_v']}")
    parts.append(v["dtype"])
    if v["causal"]:
        parts.append("causal")
    if v["mask"] is not None:     # with its parameters: two windows of different sizes differ in name
        parts.append(_mask_name(v["mask"]))
    if v["softcap"] is not None:
        parts.append(f"softcap{v['softcap']:g}".replace(".", "p"))
    if v["alibi"]:
        parts.append("alibi")
    if v["layout"] != "batch":
        parts.append(v["layout"] + (f"_page{v['page_size']}" if v.get("page_size") else ""))
    for mod in ("score_mod", "mask_mod", "score_mod_grad"):
        if v[mod] is not None:     # two specs that differ only in the expression differ in name
            parts.append(mod.replace("_", "") + hashlib.sha1(v[mod].encode()).hexdigest()[:6])
    if v["num_heads"] is not None:
        parts.append(f"h{v['num_heads']}" + (f"kv{v['num_kv_heads']}" if v["num_kv_heads"] else ""))
    return "attn_" + "_".join(parts)
