"""Preset method names: a method spelled as its name alone (see GRAMMAR).

A preset name expands to a spec dict; `parse_method` then validates it like any spec
from config.yaml, so `int5` fails with "bits must be one of 2, 3, 4, 8 (got 5)".
"""

from __future__ import annotations

import re

from kvcore.errors import UsageError

GRAMMAR = """\
baseline | none                                   no compression (family none)
int{B}[-v{B}][-g{G}][-sym][-tok|-ch][-s{S}][-r{R}][-o{F}][-f32][-z8[k|v]][-had[k|v]|-rot{N}][-nuq][-mx{T}][-c[k|v]]
                                                  quant: B bits (v: values' own B),
                                                  group G (default 64),
                                                  symmetric, per-token (default) or
                                                  per-channel for keys and values,
                                                  S sink and R recent tokens in full
                                                  precision, outlier fraction F,
                                                  float32 scales (default float16),
                                                  int8 zero points in scale units
                                                  (keys / values only),
                                                  Hadamard (keys / values only) or
                                                  seed-N random rotation,
                                                  Lloyd-Max levels, mixed 2-4 bits at
                                                  T bits/elem on average (nuq and mx
                                                  need the spec key calibration),
                                                  ranges clipped to least squared error
                                                  (keys / values only)
kivi{B}[-g{G}][-kg{G}][-sym][-s{S}][-r{R}][-o{F}][-f32][...]
                                                  as int, but keys per channel and
                                                  values per token (KIVI); kg: keys'
                                                  own group size
sparse-{F}                                        sparsify: keep fraction F per vector
evict-{SCORER}-{R}[-s{S}][-r{R}][-global|-model]   evict: keep ratio R by SCORER
prune[-l{L},{L}..][-h{L}.{H},{L}.{H}..]           prune: layers L, [layer, head] pairs
{EVICT or SPARSE}+{INT or KIVI}                   compose: evict / sparsify, then quantize
                                                  the kept values (no -s / -r windows)
examples: int4-g64  int2-g32-sym  kivi2-g32-r128  int4-g128-ch-s4-o0.01  int2-g32-had
          sparse-0.5  evict-knorm-0.5-s4-r64-global  prune-l0,1-h5.2
          evict-kvzip-0.5-s4-model+int4-g32-had  sparse-0.5+int4-g32  int4-v3-g64-hadv"""

_QUANT_OPTIONS = [
    (r"v(\d+)", lambda m: {"value_bits": int(m[1])}),
    (r"g(\d+)", lambda m: {"group_size": int(m[1])}),
    (r"kg(\d+)", lambda m: {"key_group_size": int(m[1])}),
    (r"sym", lambda m: {"symmetric": True}),
    (r"asym", lambda m: {"symmetric": False}),
    (r"s(\d+)", lambda m: {"sink_tokens": int(m[1])}),
    (r"r(\d+)", lambda m: {"recent_tokens": int(m[1])}),
    (r"o(\d*\.?\d+)", lambda m: {"outlier_fraction": float(m[1])}),
    (r"f32", lambda m: {"scale_dtype": "float32"}),
    (r"f16", lambda m: {"scale_dtype": "float16"}),
    (r"z8", lambda m: {"int_zero": "both"}),
    (r"z8k", lambda m: {"int_zero": "key"}),
    (r"z8v", lambda m: {"int_zero": "value"}),
    (r"had", lambda m: {"rotation": "hadamard"}),
    (r"hadv", lambda m: {"rotation": "hadamard", "rotated": "value"}),
    (r"hadk", lambda m: {"rotation": "hadamard", "rotated": "key"}),
    (r"rot(\d+)", lambda m: {"rotation": "random", "rotation_seed": int(m[1])}),
    (r"nuq", lambda m: {"levels": "lloyd"}),
    (r"c", lambda m: {"clip": "both"}),
    (r"ck", lambda m: {"clip": "key"}),
    (r"cv", lambda m: {"clip": "value"}),
    (r"mx(\d*\.?\d+)", lambda m: {"mixed_bits": float(m[1])}),
]
_AXIS_OPTIONS = [
    (r"tok", lambda m: {"key_axis": "token", "value_axis": "token"}),
    (r"ch", lambda m: {"key_axis": "channel", "value_axis": "channel"}),
]
_EVICT_OPTIONS = [
    (r"s(\d+)", lambda m: {"sink_tokens": int(m[1])}),
    (r"r(\d+)", lambda m: {"recent_tokens": int(m[1])}),
    (r"global", lambda m: {"budget": "global"}),
    (r"model", lambda m: {"budget": "model"}),
    (r"uniform", lambda m: {"budget": "uniform"}),
]
_PRUNE_OPTIONS = [
    (r"l(\d+(?:,\d+)*)", lambda m: {"layers": [int(i) for i in m[1].split(",")]}),
    (r"h(\d+\.\d+(?:,\d+\.\d+)*)",
     lambda m: {"heads": [[int(i) for i in p.split(".")] for p in m[1].split(",")]}),
]


def _not_a_preset(name: str, why: str) -> UsageError:
    return UsageError(
        f"method {name!r}: {why}; a preset is baseline, int{{B}}[-g{{G}}][-sym][-tok|-ch][-s{{S}}]"
        f"[-r{{R}}][-o{{F}}][-f32], kivi{{B}}[...], sparse-{{F}}, evict-{{SCORER}}-{{R}}[-s{{S}}][-r{{R}}]"
        f"[-global|-model], prune-l{{L,..}}-h{{L.H,..}} or FIRST+INT (e.g. int4-g64), or give a spec with 'family'"
    )


def _options(name: str, tokens: list[str], table) -> dict:
    spec: dict = {}
    for token in tokens:
        for pattern, make in table:
            m = re.fullmatch(pattern, token)
            if m:
                spec.update(make(m))
                break
        else:
            raise _not_a_preset(name, f"unknown preset option {token!r}")
    return spec


def _number(name: str, text: str, what: str) -> float:
    if not re.fullmatch(r"\d*\.?\d+", text):
        raise _not_a_preset(name, f"{what} must be a number (got {text!r})")
    return float(text)


def preset_spec(name: str) -> dict:
    """The spec dict a preset name stands for; UsageError if it is not one."""
    tokens = name.split("-")
    head, rest = tokens[0], tokens[1:]
    if name in ("baseline", "none"):
        return {"family": "none"}
    if "+" in name:
        first, _, then = name.partition("+")
        return {"family": "compose", "first": preset_spec(first), "then": preset_spec(then)}
    m = re.fullmatch(r"(int|kivi)(\d+)", head)
    if m:
        spec = {"family": "quant", "bits": int(m[2])}
        if m[1] == "kivi":
            spec.update(key_axis="channel", value_axis="token")
            return {**spec, **_options(name, rest, _QUANT_OPTIONS)}
        return {**spec, **_options(name, rest, _QUANT_OPTIONS + _AXIS_OPTIONS)}
    if head == "sparse" and len(rest) == 1:
        return {"family": "sparsify", "keep_fraction": _number(name, rest[0], "keep fraction")}
    if head == "evict" and len(rest) >= 2 and re.fullmatch(r"[A-Za-z0-9_]+", rest[0]):
        spec = {"family": "evict", "scorer": rest[0], "keep_ratio": _number(name, rest[1], "keep ratio")}
        return {**spec, **_options(name, rest[2:], _EVICT_OPTIONS)}
    if head == "prune" and rest:
        return {"family": "prune", **_options(name, rest, _PRUNE_OPTIONS)}
    raise _not_a_preset(name, "not a preset name and no spec given")
