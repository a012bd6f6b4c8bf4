"""Adapter over the prefill-compress internals of `kvcore.protocols` (the perplexity
protocol's eviction code), so that tasks compress exactly as perplexity does: the same
scorers, attention statistics, kvzip reconstruction pass, `method.select` top-k,
physical eviction and per-head masks. Every name taken from kvcore.protocols is imported
here and nowhere else in kvcore.tasks; if those helpers move, only this file changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.protocols import (  # noqa: F401  (re-exported for kvcore.tasks.evaluate)
    _cache_from,
    _compress,
    _Observer,
    _PassState,
    _reconstruction_pass,
    _layer_scores,
    _scorers,
    gather_kept,
    check_options,
    kvcore_attention_pass,
)


@dataclass
class Prefilled:
    """One prefilled context: per-layer keys/values [1, n_kv, seq, dim] and attention stats."""

    keys: list
    values: list
    stats: dict
    n_tokens: int


def prefill(model, tokenizer, ids, scorers: dict, options: dict) -> Prefilled:
    """Prefill `ids` [1, seq] once, collecting what every scorer in `scorers` needs."""
    import torch

    n = ids.shape[1]
    stats: dict = {}
    sets = {s.query_key: s.query_start(n) for s in scorers.values() if s.queries in ("context", "window")}
    observer = _Observer(sets, n, options["attention_floats"], stats) if sets else None
    cache = _cache_from(model, [], [])
    with kvcore_attention_pass(model, _PassState(observer=observer)):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
              position_ids=torch.arange(n, device=ids.device)[None])
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    for scorer in scorers.values():
        if scorer.queries == "repeat":
            _reconstruction_pass(model, cache, ids, scorer, tokenizer, stats, options, n)
            for layer, k, v in zip(cache.layers, keys, values):
                layer.keys, layer.values = k, v
    return Prefilled(keys, values, stats, n)


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
