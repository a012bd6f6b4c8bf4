"""Orthogonal rotation of each head's channels before quantization (QuaRot / SpinQuant style).

A rotation R [dim, dim] (orthogonal: R Rᵀ = I) spreads a channel outlier over every channel,
so groups of channels (per-token quantization) get similar ranges. `quant` rotates the
quantized tokens (x R) before grouping and rotates back (y Rᵀ) after dequantization; the
stored form is the codes of the rotated tensor. Nothing of R is stored: it is regenerated
from its kind, size and seed.

- `hadamard`: the Sylvester Hadamard matrix / sqrt(dim) (dim a power of two), the same for
  keys and values;
- `random`: a seeded random orthogonal matrix (QR of a Gaussian, signs fixed so the result
  is unique), seed `seed` for keys and `seed + 1` for values, so the two differ.
Both are built in float64 on the CPU and cast to float32 once per (kind, dim, seed, device).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kvcore.compress.params import ROTATIONS


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _hadamard(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim ** 0.5


def _random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed and unique


@lru_cache(maxsize=64)
def rotation_matrix(rotation: str, dim: int, seed: int, kind: str, device: str) -> torch.Tensor:
    """The float32 [dim, dim] rotation of `kind` ("key" / "value") on `device`."""
    if rotation == "hadamard":
        if not is_power_of_two(dim):
            raise ValueError(f"a Hadamard rotation needs head_dim a power of two (got {dim})")
        r = _hadamard(dim)
    elif rotation == "random":
        r = _random_orthogonal(dim, seed + (kind == "value"))
    else:
        raise ValueError(f"rotation must be one of {', '.join(ROTATIONS[1:])} (got {rotation!r})")
    return r.to(torch.float32).to(device)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., dim] (any float dtype) -> x R in float32."""
    return x.float() @ r


def unrotate(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """y [..., dim] float32 -> y Rᵀ in float32 (R⁻¹ = Rᵀ)."""
    return y @ r.T
