"""The one context-compression path: a prefilled context + a method -> the compressed cache.

Perplexity (both protocols' prefill-compress side), the tasks and the eviction compress job
call `compress_context` / `select_context`, so for the same context and method they keep
the same tokens:

- quantize / sparsify: `method.fake` of each layer's keys and values (keys optionally
  quantized before RoPE);
- evict: the scorer's scores of every (layer, KV head, token), then the method's own
  selection (`Evict.select_layers`: uniform per head, one threshold per layer, or one over
  the whole model), then the kept tokens gathered so the cache really shrinks; heads that
  keep different counts are padded and the padding masked out of attention;
- prune: a pruned layer holds no context at all; a pruned head is masked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcore.evaluation.cache import cache_from, fake_tensor, gather_kept
from kvcore.evaluation.prefill import ContextPrefill, layer_scores


@dataclass
class CompressedContext:
    keys: list  # per layer, what the cache holds
    values: list
    hidden: dict = field(default_factory=dict)  # layer -> bool [n, n_kv, m]: slots masked out of attention
    keep: list | None = None  # eviction: per layer the bool mask [n, n_kv, seq] of the kept context tokens

    def cache(self, model):
        """A fresh cache over the compressed tensors (never modified: appending makes new tensors)."""
        return cache_from(model, self.keys, self.values)


def kept_summary(keep: list) -> dict:
    """kept_fraction (of every layer's context slots) and kept_by_layer, for eviction records."""
    by_layer = [float(k.sum()) / k.numel() if k.numel() else 0.0 for k in keep]
    total = sum(k.numel() for k in keep)
    return {"kept_fraction": sum(float(k.sum()) for k in keep) / total if total else 0.0, "kept_by_layer": by_layer}


def select_context(method, prefilled: ContextPrefill, scorers: dict, options: dict, *, index: int = 0,
                   scores: dict | None = None) -> list:
    """Per layer, the bool mask [1, n_kv, n] of the context tokens an evict `method` keeps.

    `scores` caches each scorer's layer scores for one context (shared by every keep ratio
    and budget); `index` seeds the random scorer."""
    scores = {} if scores is None else scores
    if method.scorer not in scores:
        scores[method.scorer] = layer_scores(scorers[method.scorer], prefilled, index, options)
    return method.select_layers(scores[method.scorer])


def compress_context(method, prefilled: ContextPrefill, scorers: dict, options: dict, *, index: int = 0,
                     scores: dict | None = None, recorder=None, rope=None) -> CompressedContext:
    """The compressed context cache of `method` (None: uncompressed) over the prefill's tensors.

    `recorder` (records.Recorder) measures the error and stored size of what was compressed;
    `rope` quantizes keys before RoPE."""
    import torch

    keys, values = prefilled.keys, prefilled.values
    if method is None:
        return CompressedContext(keys, values)
    keep = select_context(method, prefilled, scorers, options, index=index, scores=scores) \
        if method.needs_scores else [None] * len(keys)
    out = CompressedContext([], [], keep=keep if method.needs_scores else None)
    pruned = hasattr(method, "kept_heads")
    quantizes_kept = getattr(method, "quantizes_kept", False)
    for i, (k, v, mask) in enumerate(zip(keys, values, keep)):
        k2, v2 = k, v
        dense = None  # the dense reconstruction the recorder measures, where the loop already made it
        if mask is not None:  # evict: the kept tokens' vectors (quantized by a compose method), physically
            kept_k, kept_v = k, v
            if quantizes_kept:
                kept_k, kept_v = dense = (fake_tensor(method, k, "key", i, 0, rope, mask),
                                          method.fake(v, "value", mask, layer=i))
            k2, v2, hidden = gather_kept(kept_k, kept_v, mask)
            if hidden is not None:
                out.hidden[i] = hidden
        elif pruned:  # a whole layer emptied, single heads masked out
            kept = method.kept_heads(i, k.shape[1])
            if not any(kept):
                k2, v2 = k[:, :, :0], v[:, :, :0]
            elif not all(kept):
                dropped = torch.tensor([not f for f in kept], device=k.device)
                out.hidden[i] = dropped[None, :, None].expand(k.shape[0], k.shape[1], k.shape[2]).clone()
        else:  # quantize / sparsify: what attention reads is the method's reconstruction
            k2, v2 = dense = fake_tensor(method, k, "key", i, 0, rope), fake_tensor(method, v, "value", i)
        if recorder is not None:  # errors against the dense reconstruction (evicted / pruned = 0)
            if dense is None:
                dense = method.fake(k, "key", mask, layer=i), method.fake(v, "value", mask, layer=i)
            recorder.add(method, k, dense[0], "key", i, mask)
            recorder.add(method, v, dense[1], "value", i, mask)
        out.keys.append(k2)
        out.values.append(v2)
    return out
