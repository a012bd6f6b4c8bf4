"""Family `prune`: drop whole layers and single KV heads.

`layers` lists layers dropped entirely; `heads` lists [layer, kv_head] pairs dropped.
The method needs the layer index: `compress(x, kind, layer=i)`. Stored form: `heads`,
one uint8 flag per KV head (1 = kept), and `data` [n, kept heads, seq, dim] in the
original dtype (absent when every head of the layer is dropped). Dropped heads
decompress to zeros.
"""

from __future__ import annotations

import torch

from kvcore.compress.base import HEADER_NBYTES, Method
from kvcore.compress.params import PARAMS


class Prune(Method):
    family = "prune"
    params = PARAMS["prune"]

    def kept_heads(self, layer: int, n_kv: int) -> list[bool]:
        if layer in self.layers:
            return [False] * n_kv
        dropped = {h for l, h in self.heads if l == layer}
        return [h not in dropped for h in range(n_kv)]

    def check_shape(self, shape, layer=None):
        if layer is None:
            raise self.error("family prune needs the layer index: compress(x, kind, layer=i)")
        n_kv = shape[1]
        bad = [[l, h] for l, h in self.heads if l == layer and h >= n_kv]
        if bad:
            raise self.error(f"heads {bad[0]} names a KV head outside 0..{n_kv - 1}")

    def check_layers(self, num_layers: int, n_kv: int | None = None) -> None:
        """Config-time check that every pruned layer (and head) exists in the model."""
        bad = [l for l in self.layers if l >= num_layers] + [l for l, _ in self.heads if l >= num_layers]
        if bad:
            raise self.error(f"layer {bad[0]} does not exist (the model has layers 0..{num_layers - 1})")
        if n_kv is not None:
            for layer in range(num_layers):
                self.check_shape((1, n_kv, 1, 1), layer)

    def _encode(self, x, kind, keep, layer):
        flags = self.kept_heads(layer, x.shape[1])
        kept = torch.tensor(flags, dtype=torch.bool, device=x.device)
        fields = {"heads": kept.to(torch.uint8)}
        if any(flags):
            fields["data"] = x[:, kept]
        return fields

    def _decode(self, fields, shape, dtype, device, kind):
        out = torch.zeros(shape, dtype=dtype, device=device)
        if "data" in fields:
            out[:, fields["heads"].bool()] = fields["data"]
        return out

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        n, h, t, d = shape
        kept = sum(self.kept_heads(layer, h))
        return HEADER_NBYTES + h + n * kept * t * d * dtype.itemsize
