"""Caches over given tensors, the fake-quant cache, RoPE undo/redo and physical eviction."""

from __future__ import annotations

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

    def quantize(self, method, keys, start: int, layer: int | None = None):
        cos, sin = self.cos_sin(keys, start)
        q = method.fake(self.unrotate(keys, start), "key", layer=layer)
        return q * cos + self.rotate_half(q) * sin


def fake_tensor(method, x, kind: str, layer: int, start: int = 0, rope: Rope | None = None):
    """`method.fake` of one layer's keys or values (pre-RoPE for keys when `rope` is given)."""
    if kind == "key" and rope is not None:
        return rope.quantize(method, x, start, layer)
    return method.fake(x, kind, layer=layer)


def fake_quant_cache(model, method, recorder, rope: Rope | None):
    """A DynamicCache whose every layer compresses what is written to it on update()."""
    from transformers.cache_utils import DynamicLayer

    class FakeQuantLayer(DynamicLayer):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def update(self, key_states, value_states, *args, **kwargs):
            start = self.get_seq_length()
            k = fake_tensor(method, key_states, "key", self.index, start, rope)
            v = fake_tensor(method, value_states, "value", self.index, start)
            recorder.add(method, key_states, k, "key", self.index)
            recorder.add(method, value_states, v, "value", self.index)
            return super().update(k, v)

    cache = cache_from(model, [], [])
    cache.layers = [FakeQuantLayer(i) for i in range(len(cache.layers))]
    return cache


def gather_kept(keys, values, keep):
    """Physically keep the tokens of `keep` [n, n_kv, seq] in position order.

    Returns (keys, values, hidden): when every head keeps the same count the cache just
    shrinks and hidden is None; otherwise each head is padded to the layer's largest
    count and hidden [n, n_kv, m] marks the padding (masked out of attention).
    """
    import torch

    counts = keep.sum(dim=-1)
    m = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :m]  # kept first, in order
    index = order[..., None].expand(*order.shape, keys.shape[-1])
    k2, v2 = keys.gather(2, index), values.gather(2, index)
    if bool((counts == m).all()):
        return k2, v2, None
    hidden = torch.arange(m, device=keys.device)[None, None, :] >= counts[..., None]
    return k2, v2, hidden
