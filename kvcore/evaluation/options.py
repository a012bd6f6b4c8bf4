"""The evaluator's options and which protocols fit which compression family."""

from __future__ import annotations

from kvcore.errors import UsageError

PROTOCOLS = ("fake-quant", "prefill-compress")

# family -> protocols that make sense for it, the first is the primary one
FAMILY_PROTOCOLS = {
    "none": ("fake-quant", "prefill-compress"),
    "quant": ("fake-quant", "prefill-compress"),
    "sparsify": ("fake-quant", "prefill-compress"),
    "evict": ("prefill-compress",),
    "prune": ("prefill-compress",),
}


def method_protocols(method) -> tuple[str, ...]:
    """The protocols of a method's family (a compose method: those of its `first` part)."""
    return FAMILY_PROTOCOLS[getattr(method, "protocols_family", method.family)]

DEFAULT_OPTIONS = {
    "pre_rope": False,  # quantize keys before RoPE (undone and redone around method.fake): true, or method names
    "seed": 0,  # the random scorer's seed
    "scorers": {},  # scorer name -> options, e.g. {"snapkv": {"window": 64}}
    "attention_floats": 1 << 24,  # scorer attention computed in chunks of at most this many floats
}


def check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        hint = " (a method's budget scope is its `budget` key: uniform, global or model)" \
            if unknown[0] == "global_scope" else ""
        raise UsageError(f"unknown perplexity option {unknown[0]!r} (valid: {', '.join(DEFAULT_OPTIONS)}){hint}")
    return {**DEFAULT_OPTIONS, **options}


def check_protocol(name: str, method, protocol: str) -> None:
    """UsageError unless `protocol` is one of PROTOCOLS and fits the method's family."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    family = getattr(method, "family", None)
    if family is not None and protocol not in method_protocols(method):
        raise UsageError(f"method {name!r}: family {family} has no {protocol} protocol "
                         f"(valid: {', '.join(method_protocols(method))})")
