"""kvcore's attention function: SDPA with a bottom-right causal mask, per-head masks for
evicted or pruned slots, and attention statistics for the eviction scorers.

Registered with transformers' AttentionInterface as `kvcore` for the duration of an
`attention_pass`. Statistics are computed from Q and K in chunks of queries (at most
`floats` floats at a time) and reduced on the fly: no attention map is ever stored.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ATTENTION_NAME = "kvcore"


@dataclass
class PassState:
    """What the kvcore attention function does in the current forward pass."""

    hidden: dict = field(default_factory=dict)  # layer -> bool [n, n_kv, cached]: True = masked out
    observer: Any = None  # an Observer collecting attention statistics, or None


_CURRENT: PassState | None = None


def causal_mask(q: int, k: int, device):
    """Bottom-right aligned causal mask [q, k]: query i sees keys j <= i + (k - q)."""
    import torch

    return torch.arange(k, device=device)[None, :] <= torch.arange(q, device=device)[:, None] + (k - q)


def kvcore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with a bottom-right causal mask (new tokens follow the cache, whatever it holds),
    per-head masks for evicted/pruned slots, and optional attention statistics. A layer's
    sliding window and logit softcap (Gemma-2) are applied as the model's own eager attention does."""
    import torch.nn.functional as F

    state = _CURRENT or PassState()
    n, n_heads, q, d = query.shape
    n_kv, k = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(d)
    layer = getattr(module, "layer_idx", None)
    allowed = causal_mask(q, k, query.device)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window:  # query i (at position i + k - q) sees the last `window` positions only
        allowed = allowed & window_mask(q, k, window, query.device)
    if state.observer is not None:
        state.observer.observe(layer, query, key, scaling, allowed)
    hidden = state.hidden.get(layer)
    mask = allowed
    if hidden is not None:
        visible = visible_slots(hidden, k)
        mask = allowed[None, None] & visible.repeat_interleave(group, dim=1)[:, :, None, :]
    if softcap:
        out = softcapped_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                   mask, scaling, softcap)
    elif hidden is not None:
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                             value.repeat_interleave(group, 1), attn_mask=mask, scale=scaling)
    elif q == k and not window:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=group > 1)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             enable_gqa=group > 1)
    return out.transpose(1, 2).contiguous(), None


def window_mask(q: int, k: int, window: int, device):
    """[q, k]: key j is within `window` positions of query i (bottom-right aligned)."""
    import torch

    return torch.arange(k, device=device)[None, :] > torch.arange(q, device=device)[:, None] + (k - q) - window


def softcapped_attention(query, key, value, mask, scaling: float, softcap: float):
    """Attention with logits capped to +-softcap by tanh, softmax in float32 (Gemma-2's eager attention)."""
    import torch

    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)


def visible_slots(hidden, k: int):
    """[n, n_kv, k] visibility: the cached slots not hidden, then every slot appended after them."""
    import torch

    n, n_kv, m = hidden.shape
    return torch.cat([~hidden, hidden.new_ones((n, n_kv, k - m))], dim=-1)


@contextmanager
def attention_pass(model, state: PassState | None = None):
    """Run the model's attention through `kvcore_attention` with `state`, then restore."""
    global _CURRENT
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kvcore_attention)
    configs = {id(model.config): model.config}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    previous = _CURRENT
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_NAME
        _CURRENT = state or PassState()
        yield
    finally:
        _CURRENT = previous
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]


class Observer:
    """Attention received by the first `n_keys` cached tokens from chosen queries.

    `sets`: name -> index of the first observed query of the pass. Statistics per
    layer: sum and max over the observed queries per query head ([n, n_kv, group,
    n_keys]) and, per key, how many observed queries could see it; passes add up.
    """

    def __init__(self, sets: dict[str, int], n_keys: int, floats: int, stats: dict | None = None):
        self.sets, self.n_keys, self.floats = sets, n_keys, floats
        self.stats = stats if stats is not None else {}

    def observe(self, layer, query, key, scaling, allowed):
        import torch

        n, n_heads, q, d = query.shape
        n_kv, k = key.shape[1], key.shape[2]
        group = n_heads // n_kv
        kf = key.float()
        chunk = max(1, self.floats // (n_heads * k))
        for name, start in self.sets.items():
            total = self.stats.setdefault(name, {}).get(layer)
            s = torch.zeros((n, n_kv, group, self.n_keys), device=query.device)
            m = torch.zeros_like(s)
            for c0 in range(start, q, chunk):
                c1 = min(q, c0 + chunk)
                qc = query[:, :, c0:c1].float().reshape(n, n_kv, group, c1 - c0, d)
                logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf).mul_(scaling)
                logits.masked_fill_(~allowed[c0:c1], -math.inf)
                p = logits.softmax(dim=-1)[..., : self.n_keys]
                s += p.sum(dim=-2)
                m = torch.maximum(m, p.amax(dim=-2))
            count = allowed[start:, : self.n_keys].sum(dim=0)
            if total is not None:
                s, m, count = s + total[0], torch.maximum(m, total[1]), count + total[2]
            self.stats[name][layer] = (s, m, count)
