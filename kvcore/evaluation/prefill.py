"""One prefill of a context serving every scorer and method.

The prefill collects the attention statistics the scorers ask for (`context`/`window`
query sets) during its own forward, then runs each `repeat` scorer's (kvzip's)
reconstruction pass against the cache and drops that pass's entries again. Perplexity's
prefill-compress, the tasks and the eviction compress job all prefill through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.errors import UsageError
from kvcore.evaluation.attention import Observer, PassState, attention_pass
from kvcore.evaluation.cache import cache_from, cached_tensors
from kvcore.evaluation.nll import target_nll
from kvcore.evaluation.timing import Timer


@dataclass
class ContextPrefill:
    """A context prefilled once for every scorer (see `prefill_context`)."""

    keys: list  # per layer [1, n_kv, n, head_dim]: the prefill's own entries
    values: list
    stats: dict  # scorer query_key -> layer -> attention statistics (`Observer`)
    last_logits: object  # [1, V]: the prediction after the context's last token
    context_nll: tuple  # (NLL sum, count) of `context_targets`, (0.0, 0) without them
    seconds: float  # the prefill forward alone (not the reconstruction passes)


def make_scorers(methods, options: dict, tokenizer=None) -> dict:
    """scorer name -> scorer, once for every evict method in `methods` (an iterable)."""
    from kvcore.eviction import make_scorer

    out = {}
    for method in methods:
        if getattr(method, "needs_scores", False) and method.scorer not in out:
            out[method.scorer] = make_scorer(method.scorer, **options["scorers"].get(method.scorer, {}))
    if tokenizer is None and any(s.queries == "repeat" for s in out.values()):
        raise UsageError("the kvzip scorer needs the model's tokenizer (to build its reconstruction prompt)")
    return out


def prefill_context(model, ids, scorers: dict, options: dict, tokenizer=None, *, device=None,
                    context_targets=None) -> ContextPrefill:
    """Prefill `ids` [1, n] at positions 0..n-1 into a fresh cache and run every scorer's pass.

    `context_targets` [1, n - 1]: score them against the prefill's logits (logits[t]
    predicts context_targets[t]); a first window, whose context nothing precedes.
    """
    import torch

    n = ids.shape[1]
    stats: dict = {}
    sets = {s.query_key: s.query_start(n) for s in scorers.values() if s.queries in ("context", "window")}
    observer = Observer(sets, n, options["attention_floats"], stats) if sets else None
    cache = cache_from(model, [], [])
    with Timer(device if device is not None else ids.device) as timer, \
            attention_pass(model, PassState(observer=observer)):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(n, device=ids.device)[None],
                    logits_to_keep=0 if context_targets is not None else 1)
    context_nll = target_nll(out.logits[:, :-1], context_targets) if context_targets is not None else (0.0, 0)
    last_logits = out.logits[:, -1]
    del out
    keys, values = cached_tensors(cache)
    for scorer in scorers.values():
        if scorer.queries == "repeat":
            reconstruction_pass(model, cache, ids, scorer, tokenizer, stats, options)
            for layer, k, v in zip(cache.layers, keys, values):
                layer.keys, layer.values = k, v  # drop the pass's own entries
    return ContextPrefill(keys, values, stats, last_logits, context_nll, timer.seconds)


def reconstruction_pass(model, cache, ctx, scorer, tokenizer, stats: dict, options: dict) -> None:
    """kvzip's pass: its reconstruction chunks fed after the context `ctx` [1, n] held in
    `cache`, the attention they give the context added to `stats`; the cache is cropped back
    to the context after each chunk."""
    import torch

    prefix = ctx.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    room = None if limit is None else limit - prefix
    for chunk in scorer.reconstruction_chunks(tokenizer, ctx, room):
        observer = Observer({scorer.query_key: 0}, prefix, options["attention_floats"], stats)
        with attention_pass(model, PassState(observer=observer)):
            model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1,
                  position_ids=torch.arange(prefix, prefix + chunk.shape[1], device=chunk.device)[None])
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :prefix], layer.values[:, :, :prefix]


def layer_scores(scorer, prefilled: ContextPrefill, index: int, options: dict) -> list:
    """Per layer, the scorer's scores [1, n_kv, n] of the prefilled context; `index` (a
    window, an example, a sequence id) seeds the random scorer with the layer."""
    from kvcore.eviction.base import AttentionReceived

    out = []
    for i, (k, v) in enumerate(zip(prefilled.keys, prefilled.values)):
        attention = None
        if scorer.queries is not None:
            s, m, count = prefilled.stats[scorer.query_key][i]
            attention = AttentionReceived(sum=s, max=m, count=count)
        out.append(score_layer(scorer, i, k, v, index, options, attention))
    return out


def score_layer(scorer, layer: int, keys, values, index: int, options: dict, attention=None):
    """One layer's scores [1, n_kv, n] of a context's keys and values; `index` and `layer` seed
    the random scorer (so the cache-only scorers score an extracted sequence as its prefill)."""
    import torch

    from kvcore.eviction.base import ScoreInputs

    generator = torch.Generator().manual_seed(options["seed"] * 1_000_003 + index * 1009 + layer)
    return scorer(ScoreInputs(layer=layer, keys=keys, values=values, attention=attention, generator=generator))
