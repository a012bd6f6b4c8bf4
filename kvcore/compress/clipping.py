"""Clipped group ranges: each group's [min, max] shrunk to the range of least squared error.

Min-max groups spend their few levels on the extremes: at 2 bits a Gaussian group of 64 values
spans about ±2.4 standard deviations, a step of 1.6 of them, while the squared-error optimal
uniform 4-level grid has a step near 1.0 and clips the tails (the clipping search of AWQ and
OmniQuant's learnable clipping, done here per group at encode time). `quant` with `clip`
searches, for every group, the low and high ends as lo' = lo + a * (hi - lo) and
hi' = hi - b * (hi - lo) over a small grid of (a, b), computes each candidate's stored (rounded)
scale and zero exactly as the codes will use them, and keeps the one with the least squared
error over the group's quantized values (outliers and padding left out). Values outside the
chosen range take the end codes. Nothing new is stored: the chosen range is the group's scale
and zero, so the size and the decoder are those of plain min-max groups.
"""

from __future__ import annotations

import torch

SHRINK = (0.0, 0.04, 0.08, 0.12, 0.17, 0.23)  # fraction of the range cut from each end


def clipped_range(groups, ignored, dim: int, lo, hi, top: int, grid):
    """(lo, hi) per group, each end moved in by one of SHRINK (of the range) so that the squared
    error of the uniform codes 0..top is least. `grid(lo, hi)` -> (scale32, zero32): the stored
    scale and zero the codes would use for that range; `ignored` (or None) masks values that
    take no part (outliers, padding)."""
    width = hi - lo
    best = best_lo = best_hi = None
    for a in SHRINK:
        for b in SHRINK:
            lo_c, hi_c = lo + a * width, hi - b * width
            scale32, zero32 = grid(lo_c, hi_c)
            s, z = scale32.unsqueeze(dim), zero32.unsqueeze(dim)
            err = ((groups - z).div_(s).round_().clamp_(0, top).mul_(s).add_(z).sub_(groups)).square_()
            if ignored is not None:
                err.masked_fill_(ignored, 0.0)
            err = err.sum(dim)
            if best is None:
                best, best_lo, best_hi = err, lo_c, hi_c
            else:
                better = err < best
                best = torch.where(better, err, best)
                best_lo, best_hi = torch.where(better, lo_c, best_lo), torch.where(better, hi_c, best_hi)
    return best_lo, best_hi
