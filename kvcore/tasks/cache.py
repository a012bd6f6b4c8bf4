"""Adapter over the prefill-compress internals of `kvcore.protocols` (the perplexity
protocol's eviction code), so that tasks compress exactly as perplexity does: the same
prefill and scorer passes (`prefill_context`: attention statistics, kvzip reconstruction
pass), scorers, `method.select` top-k, physical eviction and per-head masks. Every name
taken from kvcore.protocols is imported here and nowhere else in kvcore.tasks; if those
helpers move, only this file changes.
"""

from __future__ import annotations

from kvcore.protocols import (  # noqa: F401  (re-exported for kvcore.tasks.evaluate)
    ContextPrefill as Prefilled,
    _cache_from,
    _compress,
    _PassState,
    _layer_scores,
    _scorers,
    gather_kept,
    check_options,
    kvcore_attention_pass,
    prefill_context,
)


def prefill(model, tokenizer, ids, scorers: dict, options: dict) -> Prefilled:
    """Prefill `ids` [1, seq] once, collecting what every scorer in `scorers` needs."""
    return prefill_context(model, ids, scorers, options, tokenizer)


class _NoRecorder:
    """Error statistics are not needed here (perplexity records them); skip their cost."""

    def add(self, *args, **kwargs):
        pass


def compressed_cache(model, prefilled: Prefilled, method, scorers, scores_cache: dict, index: int, options: dict):
    """(cache, hidden) for `method` (None: uncompressed) over a fresh cache object on the
    prefill's tensors (never modified: appending makes new tensors).

    Eviction is scored once per scorer (`scores_cache`, shared by every keep ratio), then
    `method.select` + `gather_kept` as in perplexity's `_compress`, without its
    round trip through `method.fake` (only needed for error statistics)."""
    if method is None:
        return _cache_from(model, prefilled.keys, prefilled.values), {}
    if method.family == "evict":
        if method.scorer not in scores_cache:
            scores_cache[method.scorer] = _layer_scores(scorers[method.scorer], prefilled.keys, prefilled.values,
                                                        prefilled.stats, index, options)
        keys, values, hidden = [], [], {}
        for i, (k, v, s) in enumerate(zip(prefilled.keys, prefilled.values, scores_cache[method.scorer])):
            k2, v2, mask = gather_kept(k, v, method.select(s))
            keys.append(k2)
            values.append(v2)
            if mask is not None:
                hidden[i] = mask
        return _cache_from(model, keys, values), hidden
    keys, values, hidden = _compress(method, prefilled.keys, prefilled.values, scorers, prefilled.stats,
                                     scores_cache, index, _NoRecorder(), None, options)
    return _cache_from(model, keys, values), hidden


def attention(model, hidden: dict | None = None):
    """The attention context a forward over a (compressed) cache must run in."""
    return kvcore_attention_pass(model, _PassState(hidden=hidden or {}))
