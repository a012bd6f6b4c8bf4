"""Token eviction scorers: which cached tokens matter, per (layer, KV head, token).

A scorer implements only `score()` (see `base.Scorer`); the shared top-k that turns
scores into a keep mask is `kvcore.compress.evict.select_keep` (via an `evict` method's
`select_layers`), so sink tokens, the recent window and the budget (uniform per head, one
threshold per layer, or one over the whole model) behave the same for every scorer.
`Scorer.budget` is the budget a method named after the scorer alone gets (kvcore.tasks):
the model-wide one for kvzip, h2o and snapkv, as KVzip selects.

    name          scores a token by                                    attention it reads
    kvzip         max attention from a "repeat the context" pass       reconstruction queries
    h2o           mean attention received from later context tokens    every context query
    snapkv        mean attention from the last `window` context        last `window` queries
                  tokens, smoothed by an average pool of `kernel`
    streamingllm  its position (most recent first); sinks come from    none
                  the method's sink_tokens
    knorm         minus its key norm (low-norm keys are kept)          none
    random        a seeded uniform draw (the floor)                    none

Attention weights are computed by kvcore itself from Q and K inside the attention call
(`kvcore.evaluation.attention`), in query chunks, so memory stays bounded (heads x chunk x keys
floats) however long the context; no eager attention pass and no stored attention maps.
"""

from __future__ import annotations

import importlib

from kvcore.errors import UsageError

# name -> "module:Class", imported on first use
_SCORERS = {
    "kvzip": "kvzip:KVzip",
    "h2o": "h2o:H2O",
    "snapkv": "snapkv:SnapKV",
    "streamingllm": "streamingllm:StreamingLLM",
    "knorm": "knorm:KNorm",
    "random": "random:Random",
}
SCORERS = tuple(_SCORERS)
# the scorers whose class asks for queries (`Scorer.queries` not None): they read attention. Named
# here so the workflow's DAG-time checks import no torch (tests/test_eviction.py compares the two).
MODEL_SCORERS = ("kvzip", "h2o", "snapkv")

__all__ = ["MODEL_SCORERS", "SCORERS", "scorer_class", "make_scorer", "needs_model"]


def scorer_class(name: str):
    if name not in _SCORERS:
        raise UsageError(f"unknown eviction scorer {name!r} (valid: {', '.join(SCORERS)})")
    module, cls = _SCORERS[name].split(":")
    return getattr(importlib.import_module(f"kvcore.eviction.{module}"), cls)


def needs_model(name: str) -> bool:
    """Whether the scorer reads attention, so choosing tokens runs the model (kvzip, h2o,
    snapkv); knorm, streamingllm and random score a cache from its keys and positions alone."""
    if name not in _SCORERS:
        scorer_class(name)  # the error naming the valid scorers
    return name in MODEL_SCORERS


def make_scorer(name: str, **options):
    """A scorer instance by name; options override its defaults (UsageError on unknown keys)."""
    return scorer_class(name)(**options)
