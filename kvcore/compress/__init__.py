"""KV-cache compression: methods with a real stored form, and honest metrics.

A method is a name and a spec dict (config.yaml: `methods: {NAME: SPEC}`); the key
`family` picks the module that implements it:

    family    module      what it stores
    none      identity    the tensor as it is (the baseline)
    quant     quant       bit-packed integer codes + scales (+ zeros), optional
                          full-precision sink/recent windows and exact outliers
    sparsify  sparsify    the largest-|x| entries of every head_dim vector
    evict     evict       the kept tokens (1-bit mask + vectors); scores come from
                          a scorer in kvcore.eviction, top-k is `select_keep`
    prune     prune       everything but the dropped layers / KV heads
    compose   compose     evict or sparsify, then quant of what is kept (one method)

Each module's docstring states its parameters, remainder handling and size formula.
`parse_method(name, spec)` validates every key (UsageError naming method and key);
`parse_method(name)` (spec None) resolves a preset name; a spec without `family` is
applied on top of the preset its name spells (`int4-g64: {symmetric: true}`).
`canonical_spec(name, spec)` is the same check without torch (params.py: every family's
parameters, declared once): the spec `parse_method(name, spec).spec` would give.

Preset grammar (options in any order, separated by "-"):

    {GRAMMAR}

Tensor API (torch, vectorised, CPU or CUDA), x is [n_seq or batch, n_kv, seq, dim]:
    packed = method.compress(x, "key" | "value", keep=None, layer=None)
    x2 = method.decompress(packed, kind)
    x2 = method.fake(x, kind, keep=None, layer=None)   # == decompress(compress(x)), bit for bit
`keep` (evict only) is a bool [n, n_kv, seq] mask from `method.select(scores)`;
`layer` (prune only) is the layer index.

Stored size of one tensor (`method.packed_nbytes(shape, dtype, kind)`), bytes, with
n*h*t*d = the tensor's shape, s = dtype bytes, N = quantized values, 40 = header:
    none       40 + n*h*t*d*s
    quant      40 + b*ceil(N/8) + groups*(2 or 1 if symmetric)*scale bytes
               + window tokens*n*h*d*s + outliers*(4 + s)
               (+ 4*2^b levels if lloyd, + 1 byte of bits if mixed)
    sparsify   40 + positions (1-bit mask or 1-byte indices) + n*h*t*k*s
    evict      40 + ceil(n*h*t/8) + kept vectors*d*s
    prune      40 + h + n*kept heads*t*d*s
    compose    first's size without its kept values + then's size of them - 40
A file is 8 + its JSON header + the sum of those. For int4-g64 with float16 scales
(default) on float16 data: 36 bytes per 64 values (4.5 bits), a 3.56x ratio; with
float32 scales 40 bytes (5 bits, 3.2x); symmetric float16 34 bytes (3.76x).

File API: `compress_file`, `decompress_file`, `measure`; files.py defines the
stored file and the size fields, metrics.py the error measures, quality levels and
pass/fail thresholds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

from kvcore.compress.params import FAMILIES, PARAMS, canonical_spec
from kvcore.compress.presets import GRAMMAR, preset_spec

if TYPE_CHECKING:
    from kvcore.compress.base import Method

__doc__ = __doc__.replace("{GRAMMAR}", GRAMMAR.replace("\n", "\n    "))

# family -> "module:Class"; imported on first use so that the CLI starts without torch.
_FAMILY_CLASSES = {
    "none": "identity:Identity",
    "quant": "quant:Quant",
    "sparsify": "sparsify:Sparsify",
    "evict": "evict:Evict",
    "prune": "prune:Prune",
    "compose": "compose:Compose",
}

# public name -> module that defines it (lazy, same reason)
_LAZY = {
    "Method": "base", "KINDS": "base",
    "select_keep": "evict",
    "compress_file": "files", "decompress_file": "files", "measure": "files",
    "quality_level": "metrics", "LEVELS": "metrics", "DEFAULT_THRESHOLDS": "metrics",
    "pack_bits": "packing", "unpack_bits": "packing",
}

__all__ = ["FAMILIES", "GRAMMAR", "canonical_spec", "parse_method", "method_schema", "family_class", "preset_spec",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"kvcore.compress.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kvcore.compress' has no attribute {name!r}")


def family_class(family: str) -> type[Method]:
    module, cls = _FAMILY_CLASSES[family].split(":")
    return getattr(importlib.import_module(f"kvcore.compress.{module}"), cls)


def parse_method(name: str, spec: Mapping[str, Any] | None = None) -> Method:
    """A validated Method from a config entry, or from a preset name when spec is None
    (`canonical_spec` checks it, without torch)."""
    spec = canonical_spec(name, spec)
    return family_class(spec["family"])(name, spec)


def method_schema() -> dict:
    """JSON Schema of one config entry `methods: {NAME: SPEC}`'s SPEC.

    SPEC is null (NAME is a preset), an object with `family`, or an object without it
    (overrides on the preset NAME; checked by parse_method). Checks that need the
    model's shape (group_size dividing head_dim) are in `Method.check_shape`.
    """
    variants = []
    for family in FAMILIES:
        props = {"family": {"const": family}}
        props.update({key: {**p.schema, "description": p.doc} for key, p in PARAMS[family].items()})
        required = ["family"] + [key for key, p in PARAMS[family].items() if p.required]
        variants.append({"type": "object", "properties": props, "required": required,
                         "additionalProperties": False})
    variants.append({"type": "null"})
    variants.append({"type": "object", "not": {"required": ["family"]}})
    return {"oneOf": variants}
