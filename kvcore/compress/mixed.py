"""Mixed precision under one budget: 2, 3 or 4 bits per (layer, kind) of a `quant` method.

`plan_bits(method)` measures, on the method's `calibration` cache (an extraction of another
corpus, kvcore.compress.levels), each (layer, kind)'s relative squared error
sum((x' - x)^2) / sum(x^2) at every candidate width, and its bits per element under the
fp16-basis convention (codes, scales, zeros, levels, windows, outliers). Every tensor
starts at 2 bits; the upgrade (2 -> 3 or 3 -> 4) that removes the most error per added bit
is taken while the average bits per element stays at most `mixed_bits` (all tensors of a
model have one shape, so the plain average is the size-weighted one). The plan is the
same for every evaluated text; the stored bits per element are measured, not assumed.
"""

from __future__ import annotations

import torch

from kvcore.compress.levels import calibration_cache

CHOICES = (2, 3, 4)


def plan_bits(method) -> dict:
    """(layer, kind) -> bits for a quant `method` with mixed_bits > 0."""
    candidates = {b: method.at_bits(b) for b in CHOICES}
    error, cost = {}, {}
    for (layer, kind), x in sorted(calibration_cache(method.calibration).items()):
        ref = float((x.double() ** 2).sum()) or 1.0
        for b, m in candidates.items():
            y = m.fake(x, kind, layer=layer)
            error[(layer, kind, b)] = float(((y.double() - x.double()) ** 2).sum()) / ref
            cost[(layer, kind, b)] = 8 * m.packed_nbytes(tuple(x.shape), torch.float16, kind, layer=layer) / x.numel()
    tensors = sorted({(layer, kind) for layer, kind, _ in error})
    plan = {t: CHOICES[0] for t in tensors}
    budget = method.mixed_bits * len(tensors) - sum(cost[(*t, plan[t])] for t in tensors)
    while True:
        best, gain = None, 0.0
        for t in tensors:
            b = plan[t]
            if b == CHOICES[-1]:
                continue
            extra = cost[(*t, b + 1)] - cost[(*t, b)]
            g = (error[(*t, b)] - error[(*t, b + 1)]) / extra
            if extra <= budget + 1e-9 and g > gain:
                best, gain = t, g
        if best is None:
            return plan
        budget -= cost[(*best, plan[best] + 1)] - cost[(*best, plan[best])]
        plan[best] += 1
