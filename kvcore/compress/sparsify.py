"""Family `sparsify`: keep the largest-|x| entries of every head_dim vector, zero the rest.

Each vector (one token of one head) keeps k = ceil(keep_fraction * head_dim) entries
(at least 1), stored exactly in the original dtype in channel order. Their positions
are stored whichever way is smaller: a 1-bit mask of all head_dim channels
(ceil(N_vectors * dim / 8) bytes) when dim <= 8 * k * w, else k indices of w bytes each
(w = 1 for dim <= 256, else 2).
"""

from __future__ import annotations

import math

import torch

from kvcore.compress.base import HEADER_NBYTES, Method
from kvcore.compress.packing import pack_bits, packed_nbytes, unpack_bits
from kvcore.compress.params import PARAMS


class Sparsify(Method):
    family = "sparsify"
    params = PARAMS["sparsify"]

    def n_kept(self, dim: int) -> int:
        return max(1, math.ceil(self.keep_fraction * dim - 1e-9))

    def _uses_mask(self, dim: int) -> bool:
        return dim <= 8 * self.n_kept(dim) * self._index_width(dim)

    @staticmethod
    def _index_width(dim: int) -> int:
        return 1 if dim <= 256 else 2

    def _encode(self, x, kind, keep, layer):
        k = self.n_kept(x.shape[-1])
        # Sorted positions, so the values read in channel order (what the mask implies).
        idx = x.abs().topk(k, dim=-1).indices.sort(dim=-1).values
        return {"idx": idx, "values": x.gather(-1, idx)}

    def _decode(self, fields, shape, dtype, device, kind):
        out = torch.zeros(shape, dtype=dtype, device=device)
        return out.scatter_(-1, fields["idx"].long(), fields["values"])

    def _pack(self, fields, shape, kind):
        dim = shape[-1]
        if self._uses_mask(dim):
            mask = torch.zeros(shape, dtype=torch.uint8, device=fields["idx"].device)
            mask.scatter_(-1, fields["idx"], 1)
            return {"mask": pack_bits(mask, 1), "values": fields["values"]}
        small = torch.uint8 if self._index_width(dim) == 1 else torch.int16
        return {"idx": fields["idx"].to(small), "values": fields["values"]}

    def _unpack(self, packed, shape, kind):
        n, h, t, d = shape
        k = self.n_kept(d)
        if "mask" in packed:
            mask = unpack_bits(packed["mask"], 1, n * h * t * d).view(n * h * t, d)
            # Exactly k bits per vector, so nonzero()'s row-major order gives sorted idx.
            idx = mask.nonzero()[:, 1].view(n, h, t, k)
        else:
            idx = packed["idx"].long()
        return {"idx": idx, "values": packed["values"]}

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        n, h, t, d = shape
        vectors, k = n * h * t, self.n_kept(d)
        if self._uses_mask(d):
            positions = packed_nbytes(vectors * d, 1)
        else:
            positions = vectors * k * self._index_width(d)
        return HEADER_NBYTES + positions + vectors * k * dtype.itemsize
