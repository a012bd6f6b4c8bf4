"""Reconstruction error, quality levels and pass/fail, computed in float64.

Over all K and V elements of a file (x original, y reconstruction):
- rmse = sqrt(mean((y - x)^2)); max_error = max|y - x|
- snr_db = 10 log10(sum x^2 / sum (y - x)^2); null when the error is exactly zero
- cosine_similarity = mean over head_dim vectors (one per sequence, head, token) of
  cos(x, y), what an attention score sees; a zeroed (evicted, pruned) vector counts 0.

Quality levels (both bounds must hold; a lossless result is EXCELLENT):

    level        snr_db >=   cosine_similarity >=
    EXCELLENT      30.0         0.999
    GOOD           20.0         0.99
    ACCEPTABLE     13.0         0.95
    POOR         otherwise

`passed` is true when no threshold is violated. The default thresholds are the
ACCEPTABLE bounds, so by default passed == (quality_level != POOR). Eviction and
pruning zero whole vectors, so they are POOR by these measures; judge them by
perplexity. A non-finite reconstruction is always a violation.
"""

from __future__ import annotations

import math

import torch

from kvcore.errors import UsageError

LEVELS = (("EXCELLENT", 30.0, 0.999), ("GOOD", 20.0, 0.99), ("ACCEPTABLE", 13.0, 0.95))
DEFAULT_THRESHOLDS = {"min_snr_db": 13.0, "min_cosine_similarity": 0.95}
# threshold key -> the metric it bounds
THRESHOLD_KEYS = {
    "min_snr_db": "snr_db",
    "min_cosine_similarity": "cosine_similarity",
    "max_rmse": "rmse",
    "max_error": "max_error",
    "min_compression_ratio": "compression_ratio",
}


# the valid bounds of a threshold (default: from 0 up)
THRESHOLD_RANGES = {"min_snr_db": (-math.inf, math.inf), "min_cosine_similarity": (-1.0, 1.0)}


def _range_text(low: float, high: float) -> str:
    if math.isinf(low):
        return ""
    return f" from {low:g}" + (f" to {high:g}" if math.isfinite(high) else " up")


def quality_level(snr_db: float | None, cosine: float) -> str:
    for level, min_snr, min_cos in LEVELS:
        if (snr_db is None or snr_db >= min_snr) and cosine >= min_cos:
            return level
    return "POOR"


def check_thresholds(thresholds: dict | None) -> dict:
    """Validated thresholds (defaults when None)."""
    if thresholds is None:
        return dict(DEFAULT_THRESHOLDS)
    out = {}
    for key, value in thresholds.items():
        if key not in THRESHOLD_KEYS:
            raise UsageError(f"unknown threshold {key!r} (valid: {', '.join(THRESHOLD_KEYS)})")
        low, high = THRESHOLD_RANGES.get(key, (0.0, math.inf))
        # nan compares false with every metric: it would be a silent violation, not a usage error
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise UsageError(f"threshold {key} must be a finite number{_range_text(low, high)} (got {value!r})")
        out[key] = float(value)
    return out


def violations(metrics: dict, thresholds: dict) -> list[str]:
    found = []
    if metrics["nonfinite"]:
        found.append(f"reconstruction has {metrics['nonfinite']} non-finite values")
    for key, bound in thresholds.items():
        field = THRESHOLD_KEYS[key]
        value = metrics[field]
        if value is None:  # lossless snr: never below a minimum
            continue
        if key.startswith("min_") and not value >= bound:
            found.append(f"{field} {value:.6g} < {key} {bound:g}")
        if key.startswith("max_") and not value <= bound:
            found.append(f"{field} {value:.6g} > {key} {bound:g}")
    return found


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in `x`, in one reduction: a float64 sum of float values is NaN or
    infinite exactly when one of them is (float32/16 values cannot overflow a float64 sum;
    float64 input is checked element by element)."""
    if x.dtype == torch.float64:
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(x.sum(dtype=torch.float64)))


class ErrorStats:
    """Accumulates error sums over tensors, one layer at a time."""

    def __init__(self):
        self.n = 0
        self.sq_err = 0.0
        self.sq_ref = 0.0
        self.max_err = 0.0
        self.cos_sum = 0.0
        self.vectors = 0
        self.nonfinite = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        finite_y = all_finite(y)  # the usual case: one reduction instead of a mask and two selections
        x, y = x.double(), y.double()
        if finite_y:
            err = y - x
        else:
            finite = torch.isfinite(y)
            self.nonfinite += int((~finite).sum())
            err = torch.where(finite, y - x, 0.0)
            y = torch.where(finite, y, 0.0)
        self.n += x.numel()
        self.sq_err += float((err * err).sum())
        self.sq_ref += float((x * x).sum())
        if err.numel():
            self.max_err = max(self.max_err, float(err.abs().max()))
        dot = (x * y).sum(-1)
        norms = x.norm(dim=-1) * y.norm(dim=-1)
        self.cos_sum += float((dot / norms.clamp_min(1e-300)).sum())
        self.vectors += dot.numel()

    def result(self) -> dict:
        rmse = math.sqrt(self.sq_err / self.n) if self.n else 0.0
        if self.sq_err == 0:
            snr = None
        elif self.sq_ref == 0:
            snr = -math.inf
        else:
            snr = 10 * math.log10(self.sq_ref / self.sq_err)
        cosine = self.cos_sum / self.vectors if self.vectors else 1.0
        return {
            "rmse": rmse,
            "snr_db": snr,
            "cosine_similarity": cosine,
            "max_error": self.max_err,
            "nonfinite": self.nonfinite,
        }
