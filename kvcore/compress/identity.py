"""Family `none`: the baseline. Stores the tensor as it is, in its own dtype."""

from __future__ import annotations

from kvcore.compress.base import HEADER_NBYTES, Method
from kvcore.compress.params import PARAMS


class Identity(Method):
    family = "none"
    params = PARAMS["none"]

    def _encode(self, x, kind, keep, layer):
        return {"data": x}

    def _decode(self, fields, shape, dtype, device, kind):
        return fields["data"]

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        n, h, t, d = shape
        return HEADER_NBYTES + n * h * t * d * dtype.itemsize
