"""Bits per element: one convention for every table, plot and JSON (DESIGN.md).

The literature's count: full-precision parts (kept vectors, exact sink/recent windows,
outlier values) count as 16 bits, as if the cache were float16 whatever dtype it was
extracted or evaluated in; codes, scales, zero points, indices and masks count as stored.
It is the method's own size formula (`Method.packed_nbytes`) at float16. The bytes a job
actually wrote (`compressed_size_bytes`) are reported beside it, never instead of it.
"""

from __future__ import annotations

BASIS = "fp16"  # how tables and plots name the convention
LABEL = "bits/elem (fp16 basis)"


def counted_nbytes(method, shape, kind: str, *, layer: int | None = None, keep=None) -> int:
    """Bytes of `method`'s stored form of one [n, n_kv, seq, dim] tensor under the convention
    (`method` None: the uncompressed float16 tensor; `keep`: an evict method's mask)."""
    import torch  # here, not at the top: reports read LABEL without loading torch

    if method is None:
        n = 1
        for s in shape:
            n *= int(s)
        return 2 * n
    return method.packed_nbytes(tuple(shape), torch.float16, kind, layer=layer, keep=keep)


def bits_per_element(nbytes: int, n_elements: int) -> float | None:
    """8 x counted bytes per K/V element (None when nothing was counted)."""
    return 8 * nbytes / n_elements if n_elements else None
