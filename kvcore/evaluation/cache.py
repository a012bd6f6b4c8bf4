"""Caches over given tensors, the compressing (fake-quant) cache layers, RoPE undo/redo and
physical eviction."""

from __future__ import annotations

import functools

from kvcore.errors import UsageError


def cache_from(model, keys, values):
    """A DynamicCache holding the given per-layer tensors (no copy; appending makes new tensors)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, k, v in zip(cache.layers, keys, values):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def cached_tensors(cache) -> tuple[list, list]:
    """(keys, values) per layer of a cache."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


class Rope:
    """Undo and redo a LLaMA-style model's RoPE on cached keys (pre-RoPE quantization)."""

    def __init__(self, model):
        self.emb = getattr(getattr(model, "model", None), "rotary_emb", None)
        if self.emb is None:
            raise UsageError("pre_rope: the model has no rotary position embedding (e.g. GPT-2 uses learned positions)")

    def cos_sin(self, x, start: int):
        import torch

        pos = torch.arange(start, start + x.shape[2], device=x.device)[None]
        cos, sin = self.emb(x, pos)
        return cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)

    @staticmethod
    def rotate_half(x):
        import torch

        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def unrotate(self, keys, start: int):
        """Keys as the model's k_proj gave them, before RoPE at positions start.."""
        cos, sin = self.cos_sin(keys, start)
        return keys * cos - self.rotate_half(keys) * sin  # rotate back by -theta(pos)

    def quantize(self, method, keys, start: int, layer: int | None = None, keep=None):
        cos, sin = self.cos_sin(keys, start)
        q = method.fake(self.unrotate(keys, start), "key", keep, layer=layer)
        return q * cos + self.rotate_half(q) * sin


def fake_tensor(method, x, kind: str, layer: int, start: int = 0, rope: Rope | None = None, keep=None):
    """`method.fake` of one layer's keys or values (pre-RoPE for keys when `rope` is given;
    `keep`: an evict or compose method's mask)."""
    if kind == "key" and rope is not None:
        return rope.quantize(method, x, start, layer, keep)
    return method.fake(x, kind, keep, layer=layer)


class CompressingLayer:
    """Mixed into a transformers cache layer: `update()`, the one seam where K/V pass through,
    stores `method.fake` of what is written (keys optionally quantized before RoPE), so every
    attention read sees compressed keys and values (the fake-quant protocol)."""

    method = None
    index = 0
    recorder = None  # a records.Recorder measuring what was compressed, or None
    rope: Rope | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.get_seq_length()
        k = fake_tensor(self.method, key_states, "key", self.index, start, self.rope)
        v = fake_tensor(self.method, value_states, "value", self.index, start)
        if self.recorder is not None:
            self.recorder.add(self.method, key_states, k, "key", self.index)
            self.recorder.add(self.method, value_states, v, "value", self.index)
        return super().update(k, v, *args, **kwargs)


@functools.cache
def compressing_class(base: type) -> type:
    """The compressing subclass of a transformers cache layer class (DynamicLayer, sliding...)."""
    return type(f"Compressing{base.__name__}", (CompressingLayer, base), {})


def compress_layers(cache, method, recorder=None, rope: Rope | None = None):
    """Give an empty cache compressing layers of the same kinds (full, sliding window...), in place."""
    if cache.get_seq_length() > 0:
        raise UsageError("a cache that already holds tokens cannot start compressing them on write")
    if any(isinstance(layer, CompressingLayer) for layer in cache.layers):
        raise UsageError(f"the cache already compresses what is written to it (method "
                         f"{cache.layers[0].method.name!r}); pass a plain cache")
    layers = []
    for index, layer in enumerate(cache.layers):
        new = object.__new__(compressing_class(type(layer)))
        new.__dict__.update(layer.__dict__)  # an empty layer: only its settings (e.g. sliding_window)
        new.method, new.index, new.recorder, new.rope = method, index, recorder, rope
        layers.append(new)
    cache.layers = layers
    return cache


def fake_quant_cache(model, method, recorder=None, rope: Rope | None = None):
    """A DynamicCache for `model` whose every layer compresses what is written to it on update()."""
    return compress_layers(cache_from(model, [], []), method, recorder, rope)


def kept_order(keep):
    """(order [n, n_kv, m], hidden) for a keep mask [n, n_kv, seq]: per head the kept token
    indices in position order, padded to the largest count m; hidden [n, n_kv, m] marks the
    padding (None when every head keeps m)."""
    import torch

    counts = keep.sum(dim=-1)
    m = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :m]  # kept first, in order
    if bool((counts == m).all()):
        return order, None
    return order, torch.arange(m, device=keep.device)[None, None, :] >= counts[..., None]


def gather_kept(keys, values, keep):
    """Physically keep the tokens of `keep` [n, n_kv, seq] in position order.

    Returns (keys, values, hidden): when every head keeps the same count the cache just
    shrinks and hidden is None; otherwise each head is padded to the layer's largest
    count and hidden [n, n_kv, m] marks the padding (masked out of attention).
    """
    order, hidden = kept_order(keep)
    index = order[..., None].expand(*order.shape, keys.shape[-1])
    return keys.gather(2, index), values.gather(2, index), hidden
