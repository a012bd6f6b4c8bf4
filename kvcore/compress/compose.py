"""Family `compose`: evict or sparsify first, then quantize what is kept, as one method.

`first` is an `evict` or `sparsify` method, `then` a `quant` method (each a preset name or a
spec). The first method's stored form keeps its positions (evict: the 1-bit keep mask;
sparsify: the mask or indices of the kept entries) but its kept values are not stored in
full precision: they go through `then`, whose fields are stored beside them (prefixed
`q_`). So the true size is the positions + `then`'s size of the kept values:

- evict + quant: the kept vectors [n_kept, dim] (heads one after the other, each in token
  order), quantized as one [1, 1, n_kept, dim] tensor: per token, groups of channels inside
  each vector; per channel (KIVI keys), groups of consecutive kept tokens, a group at a
  head boundary spanning both heads. `then` takes no sink / recent windows (eviction has
  its own);
- sparsify + quant: the kept entries [n, n_kv, seq, k] of every vector, quantized per
  token (group_size must divide k, e.g. sparse-0.5 of head_dim 64 keeps 32: group 32);
  the old TinyLlama bridge's (group_size, sparsity) pair.

Rotation, Lloyd-Max levels and mixed precision of `then` apply to the kept values.
Preset: `{first}+{then}`, e.g. `evict-kvzip-0.5-s4-model+int4-g32-had`, `sparse-0.5+int4-g32`.
Size: positions (as `first` counts them) + `then`'s packed bytes of the kept values − its
header (one header per tensor).
"""

from __future__ import annotations

import torch

from kvcore.compress.base import HEADER_NBYTES, Method
from kvcore.compress.evict import kept_per_head
from kvcore.compress.params import PARAMS
from kvcore.errors import UsageError

INNER = "q_"  # prefix of `then`'s stored fields (word characters: file tensor names)


class Compose(Method):
    family = "compose"
    params = PARAMS["compose"]

    def setup(self):
        from kvcore.compress import parse_method

        self.outer = parse_method(f"{self.name}.first", self.first)
        self.inner = parse_method(f"{self.name}.then", self.then)
        self.needs_scores = self.outer.needs_scores
        self.quantizes_kept = True  # compress_context gathers the kept tokens of `fake`

    # ---- eviction's interface, passed to `first` --------------------------------------

    @property
    def scorer(self):
        return self.outer.scorer

    def select(self, scores):
        return self.outer.select(scores)

    def select_layers(self, scores):
        return self.outer.select_layers(scores)

    def keep_mask(self, packed):
        return self.outer.keep_mask(packed)

    @property
    def protocols_family(self) -> str:
        """The family whose perplexity protocols this method has (evaluation.options)."""
        return self.outer.family

    # ---- geometry ------------------------------------------------------------------------

    def _values_shape(self, fields, shape) -> tuple[int, ...]:
        """`first`'s kept values as the 4-d tensor `then` quantizes."""
        if "keep" in fields:
            return 1, 1, int(fields["keep"].sum()), shape[-1]
        return (*shape[:3], self.outer.n_kept(shape[-1]))

    def check_shape(self, shape, layer=None):
        self.outer.check_shape(shape, layer)
        if self.outer.family == "sparsify":
            k = self.outer.n_kept(shape[-1])
            try:
                self.inner.check_shape((*shape[:3], k), layer)
            except UsageError as exc:
                raise self.error(f"`then` cannot quantize the {k} kept entries of each vector: {exc}") from None
        else:
            self.inner.check_shape(shape, layer)

    def _check_input(self, x, kind, keep, layer):
        self.outer._check_input(x, kind, keep, layer)
        self.check_shape(tuple(x.shape), layer)

    # ---- encode / decode -------------------------------------------------------------------

    def _encode(self, x, kind, keep, layer):
        fields = self.outer._encode(x, kind, keep, layer)
        values = fields.pop("values")
        vshape = self._values_shape(fields, x.shape)
        inner = self.inner._encode(values.reshape(vshape), kind, None, layer)
        return {**fields, **{INNER + k: v for k, v in inner.items()}}

    def _split(self, fields):
        outer = {k: v for k, v in fields.items() if not k.startswith(INNER)}
        return outer, {k[len(INNER):]: v for k, v in fields.items() if k.startswith(INNER)}

    def _decode(self, fields, shape, dtype, device, kind):
        outer, inner = self._split(fields)
        vshape = self._values_shape(outer, shape)
        values = self.inner._decode(inner, vshape, dtype, device, kind)
        if "keep" in outer:
            values = values.reshape(vshape[2], vshape[3])
        return self.outer._decode({**outer, "values": values}, shape, dtype, device, kind)

    def _pack(self, fields, shape, kind):
        outer, inner = self._split(fields)
        vshape = self._values_shape(outer, shape)
        packed = self.outer._pack({**outer, "values": None}, shape, kind)
        packed.pop("values")
        return {**packed, **{INNER + k: v for k, v in self.inner._pack(inner, vshape, kind).items()}}

    def _unpack(self, packed, shape, kind):
        outer, inner = self._split(packed)
        outer = self.outer._unpack({**outer, "values": None}, shape, kind)
        outer.pop("values")
        vshape = self._values_shape(outer, shape)
        return {**outer, **{INNER + k: v for k, v in self.inner._unpack(inner, vshape, kind).items()}}

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        """`first`'s bytes without its full-precision values + `then`'s bytes of them, one header."""
        n, h, t, d = shape
        if self.outer.family == "evict":
            outer = self.outer.packed_nbytes(shape, dtype, kind, layer=layer, keep=keep)
            o = self.outer
            kept = int(keep.sum()) if keep is not None else \
                n * h * kept_per_head(t, o.keep_ratio, o.sink_tokens, o.recent_tokens)
            vshape = (1, 1, kept, d)
        else:
            outer = self.outer.packed_nbytes(shape, dtype, kind, layer=layer)
            vshape = (n, h, t, self.outer.n_kept(d))
        values = vshape[2] * vshape[3] * vshape[0] * vshape[1] * dtype.itemsize
        inner = self.inner.packed_nbytes(vshape, dtype, kind, layer=layer) - HEADER_NBYTES
        return outer - values + inner

