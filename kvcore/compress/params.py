"""Every family's parameters and the one check a method spec goes through, without torch.

`PARAMS[family]` declares each key of a family's spec once (`Param`: default, check, JSON
Schema); `CROSS_CHECKS[family]` holds the checks across keys. The method classes take their
`params` from this table and call `check_params` when they are built, and the workflow calls
`canonical_spec` while it builds the DAG (no torch import there): one table, one check, so a
spec the workflow accepts is one the method accepts, with the same canonical values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from kvcore.compress.presets import preset_spec
from kvcore.errors import UsageError

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One key of a method spec: its default, a checker and its JSON Schema."""

    default: Any
    check: Callable[[Any], Any]  # returns the normalised value or raises ValueError
    schema: dict = field(default_factory=dict)
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _fmt(values) -> str:
    return ", ".join(str(v) for v in values)


def choice(default, values: tuple, doc: str = "") -> Param:
    def check(v):
        # bool is an int in Python; `bits: true` must not pass as 1.
        if isinstance(v, bool) != isinstance(values[0], bool) or v not in values:
            raise ValueError(f"must be one of {_fmt(values)}")
        return v

    return Param(default, check, {"enum": list(values)}, doc)


def flag(default: bool, doc: str = "") -> Param:
    def check(v):
        if not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v

    return Param(default, check, {"type": "boolean"}, doc)


def count(default: int, doc: str = "") -> Param:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("must be an integer >= 0")
        return v

    return Param(default, check, {"type": "integer", "minimum": 0}, doc)


def fraction(default, low: float, high: float, low_open: bool, doc: str = "") -> Param:
    """A number in (low, high] or [low, high]."""
    bracket = "(" if low_open else "["

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"must be a number in {bracket}{low}, {high}]")
        if v > high or v < low or (low_open and v == low):
            raise ValueError(f"must be a number in {bracket}{low}, {high}]")
        return float(v)

    key = "exclusiveMinimum" if low_open else "minimum"
    return Param(default, check, {"type": "number", key: low, "maximum": high}, doc)


def name(doc: str = "") -> Param:
    def check(v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    return Param(_REQUIRED, check, {"type": "string", "minLength": 1}, doc)


def text(default: str = "", doc: str = "") -> Param:
    """An optional string (e.g. a path); "" means unset."""
    def check(v):
        if not isinstance(v, str):
            raise ValueError("must be a string")
        return v

    return Param(default, check, {"type": "string"}, doc)


def index_list(doc: str = "") -> Param:
    def check(v):
        if not isinstance(v, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v
        ):
            raise ValueError("must be a list of integers >= 0, e.g. [0, 5]")
        return sorted(set(v))

    item = {"type": "integer", "minimum": 0}
    return Param([], check, {"type": "array", "items": item}, doc)


def pair_list(doc: str = "") -> Param:
    def check(v):
        ok = isinstance(v, (list, tuple)) and all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and all(not isinstance(i, bool) and isinstance(i, int) and i >= 0 for i in p)
            for p in v
        )
        if not ok:
            raise ValueError("must be a list of [layer, head] pairs of integers >= 0, e.g. [[0, 1]]")
        return [list(p) for p in sorted({(a, b) for a, b in v})]

    item = {"type": "integer", "minimum": 0}
    pair = {"type": "array", "items": item, "minItems": 2, "maxItems": 2}
    return Param([], check, {"type": "array", "items": pair}, doc)


def part(families: tuple[str, ...], doc: str) -> Param:
    """A method inside a composed one: a preset name or a spec of one of `families`, stored as
    its canonical spec."""
    def check(v):
        if not isinstance(v, (str, Mapping)):
            raise ValueError("must be a preset name or a spec mapping")
        try:
            spec = canonical_spec(v if isinstance(v, str) else "part", None if isinstance(v, str) else dict(v))
        except UsageError as exc:
            raise ValueError(f"is not a valid method ({exc})") from None
        if spec["family"] not in families:
            raise ValueError(f"must be a method of family {' or '.join(families)} (got family {spec['family']})")
        return spec

    return Param(None, check, {"type": ["string", "object"]}, doc)


ROTATIONS = ("none", "hadamard", "random")  # kvcore.compress.rotation
BUDGETS = ("uniform", "global", "model")  # kvcore.compress.evict.select_keep

# family -> its keys, in the order a method's spec lists them (the module of each family
# documents what they do)
PARAMS: dict[str, dict[str, Param]] = {
    "none": {},
    "quant": {
        "bits": choice(4, (2, 3, 4, 8), "bits per stored code"),
        "value_bits": choice(0, (0, 2, 3, 4, 8), "values' own bits per code (0: bits)"),
        "group_size": choice(64, (32, 64, 128), "values sharing one scale (and zero)"),
        "key_group_size": choice(0, (0, 32, 64, 128), "keys' own group size (0: group_size)"),
        "symmetric": flag(False, "scale only (true) or scale and zero point (false)"),
        "key_axis": choice("token", ("token", "channel"), "keys quantized per token or per channel"),
        "value_axis": choice("token", ("token", "channel"), "values quantized per token or per channel"),
        "sink_tokens": count(0, "first tokens kept in full precision"),
        "recent_tokens": count(0, "last tokens kept in full precision"),
        "outlier_fraction": fraction(0.0, 0.0, 0.5, False, "largest-|x| fraction stored exactly"),
        "scale_dtype": choice("float16", ("float16", "float32"), "dtype of stored scales and zeros"),
        "int_zero": choice("none", ("none", "both", "key", "value"),
                           "which kinds store their zero point as an int8 code in units of the scale "
                           "(others: in scale_dtype)"),
        "rotation": choice("none", ROTATIONS, "orthogonal transform of each head's channels before grouping"),
        "rotation_seed": count(0, "seed of the random rotation (keys: seed, values: seed + 1)"),
        "rotated": choice("both", ("both", "key", "value"), "which kinds the rotation applies to"),
        "levels": choice("uniform", ("uniform", "lloyd"), "code levels: uniform, or Lloyd-Max fitted on calibration"),
        "clip": choice("none", ("none", "both", "key", "value"),
                       "which kinds' group ranges are clipped to least squared error (asymmetric groups)"),
        "mixed_bits": fraction(0.0, 0.0, 8.5, False,
                               "0: every tensor at `bits`; else 2, 3 or 4 bits per layer and kind, chosen on "
                               "calibration so that the bits per element average at most this"),
        "calibration": text("", "run directory of an extracted cache of another corpus (levels lloyd, mixed_bits)"),
    },
    "sparsify": {
        "keep_fraction": fraction(0.5, 0.0, 1.0, True, "fraction of each vector's entries kept"),
    },
    "evict": {
        "scorer": name("name of the scorer in kvcore.eviction"),
        "keep_ratio": fraction(0.5, 0.0, 1.0, True, "fraction of tokens kept"),
        "sink_tokens": count(0, "first tokens always kept"),
        "recent_tokens": count(0, "last tokens always kept"),
        "budget": choice("uniform", BUDGETS,
                         "same count per head, one threshold per layer (global) or over all layers (model)"),
    },
    "prune": {
        "layers": index_list("layers dropped entirely"),
        "heads": pair_list("[layer, kv_head] pairs dropped"),
    },
    "compose": {
        "first": part(("evict", "sparsify"), "evict or sparsify: what is kept"),
        "then": part(("quant",), "quant: how the kept values are stored"),
    },
}
FAMILIES = tuple(PARAMS)


def _quant_problem(v: dict) -> str | None:
    if v["clip"] != "none" and v["symmetric"]:
        return "clip needs asymmetric groups (symmetric: false)"
    if v["int_zero"] != "none" and v["symmetric"]:
        return "int_zero needs asymmetric groups (symmetric: false)"
    if v["levels"] == "lloyd" and v["symmetric"]:
        return "levels lloyd needs asymmetric groups (symmetric: false)"
    if v["value_bits"] and v["mixed_bits"]:
        return "value_bits and mixed_bits both set the values' width: give one"
    if (v["levels"] == "lloyd" or v["mixed_bits"]) and not v["calibration"]:
        what = "levels lloyd" if v["levels"] == "lloyd" else "mixed_bits"
        return (f"{what} needs calibration: the run directory of an extracted cache of another corpus, "
                "e.g. results/smollm2-135m/enwiki-sample")
    return None


def _prune_problem(v: dict) -> str | None:
    if not v["layers"] and not v["heads"]:
        return "family prune needs a non-empty 'layers' or 'heads' list"
    return None


def _compose_problem(v: dict) -> str | None:
    if v["first"] is None or v["then"] is None:
        return "family compose needs both `first` (evict or sparsify) and `then` (quant)"
    if v["then"]["sink_tokens"] or v["then"]["recent_tokens"]:
        return ("`then` takes no sink_tokens / recent_tokens (the kept values have no first or last "
                "tokens of their own: give the windows to `first`)")
    return None


# family -> the checks across its keys: a message, or None when the values go together
CROSS_CHECKS: dict[str, Callable[[dict], str | None]] = {
    "quant": _quant_problem,
    "prune": _prune_problem,
    "compose": _compose_problem,
}


def check_params(method: str, family: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised value of every key of `family` (defaults filled in) for `spec`; UsageError
    naming the method and the key when one is unknown, missing or invalid."""
    params = PARAMS[family]
    unknown = sorted(set(spec) - set(params) - {"family"})
    if unknown:
        valid = ", ".join(["family", *params])
        raise UsageError(f"method {method!r}: unknown key {unknown[0]!r} for family {family} (valid: {valid})")
    values = {}
    for key, param in params.items():
        if key not in spec:
            if param.required:
                raise UsageError(f"method {method!r}: missing required key {key!r} for family {family}")
            values[key] = param.default
            continue
        try:
            values[key] = param.check(spec[key])
        except ValueError as exc:
            raise UsageError(f"method {method!r}: {key} {exc} (got {spec[key]!r})") from None
    problem = CROSS_CHECKS.get(family, lambda _: None)(values)
    if problem:
        raise UsageError(f"method {method!r}: {problem}")
    return values


def canonical_spec(method: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config entry's full spec, checked: `family` and every key with its default filled in
    (what `parse_method(method, spec).spec` is). `spec` None: `method` is a preset name; a spec
    without `family` overrides the preset its name spells (`int4-g64: {symmetric: true}`)."""
    if not isinstance(method, str) or not method:
        raise UsageError(f"a method name must be a non-empty string (got {method!r})")
    if spec is None:
        spec = preset_spec(method)
    elif not isinstance(spec, Mapping):
        raise UsageError(f"method {method!r}: spec must be a mapping of keys to values (got {type(spec).__name__})")
    elif "family" not in spec:
        try:
            base = preset_spec(method)
        except UsageError:
            raise UsageError(
                f"method {method!r}: missing key 'family' (one of {', '.join(FAMILIES)}), "
                f"and {method!r} is not a preset name to take it from"
            ) from None
        spec = {**base, **spec}
    family = spec["family"]
    if family not in PARAMS:
        raise UsageError(f"method {method!r}: family must be one of {', '.join(FAMILIES)} (got {family!r})")
    return {"family": family, **check_params(method, family, spec)}
