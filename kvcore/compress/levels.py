"""Non-uniform quantization levels (KVQuant's NUQ, fitted as Lloyd-Max levels) and the
calibration cache they are fitted on.

`quant` with `levels: lloyd` keeps its groups, scales and zero points (min-max, as for
uniform levels) but maps each normalised value u = (x - zero) / scale, in [0, 2^b - 1],
to the nearest of 2^b levels instead of the nearest integer; x' = zero + scale * L[q].
The levels are one table per layer and kind, fitted by Lloyd's algorithm (1-D k-means,
the MSE-optimal quantizer for that distribution) on the normalised values of an
*extracted cache* of another corpus: the method's `calibration` names a run directory
(`results/{model}/{dataset}`, its `kv/part-*.safetensors`), never the evaluated text.
The two end levels stay at 0 and 2^b - 1 (every group's minimum and maximum are exact,
as with uniform levels); the 2^b - 2 inner ones move. Each compressed tensor stores its
table (float32, 4 * 2^b bytes, counted in its size), so decompress needs no calibration.

Fitting is deterministic (a fixed subsample of at most 2^18 values, 30 iterations) and
done once per process for each calibration run, normalisation (the quant spec's grouping,
rotation, windows, outliers and clipping), layer, kind and bit width: methods that
normalise alike share their tables (`fitted_levels`). `save_levels` / `load_levels` keep
the tables of a process in a safetensors file, so a later process (e.g. on a machine
without the calibration cache) fits none of them again.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from kvcore.errors import UsageError

SAMPLE = 1 << 18
ITERATIONS = 30


@lru_cache(maxsize=4)
def calibration_cache(run_dir: str) -> dict:
    """(layer, kind) -> float32 [n_seq, n_kv, seq, dim]: every shard of an extracted run."""
    from safetensors import safe_open

    parts = sorted(Path(run_dir, "kv").glob("part-*.safetensors"))
    if not parts:
        raise UsageError(f"calibration {run_dir!r}: no extracted cache (kv/part-*.safetensors) in that run directory")
    found: dict = {}
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            for tname in f.keys():
                head, _, kind = tname.rpartition("_")
                if kind in ("key", "value") and head.startswith("layer_") and head[6:].isdigit():
                    found.setdefault((int(head[6:]), kind), []).append(f.get_tensor(tname).float())
    if not found:
        raise UsageError(f"calibration {run_dir!r}: its safetensors hold no layer_{{L}}_key / _value tensors")
    return {k: torch.cat(v, dim=0) if len(v) > 1 else v[0] for k, v in found.items()}


def calibration_tensor(run_dir: str, layer: int, kind: str) -> torch.Tensor:
    cache = calibration_cache(str(run_dir))
    if (layer, kind) not in cache:
        layers = 1 + max(i for i, _ in cache)
        raise UsageError(f"calibration {run_dir!r} has no layer {layer} {kind} (it has {layers} layers): "
                         "calibrate on an extraction of the same model")
    return cache[(layer, kind)]


FITTED: dict[str, torch.Tensor] = {}  # level_key(...) -> float32 levels on the CPU


def level_key(calibration: str, normalisation: dict, layer: int, kind: str, bits: int) -> str:
    """The name of one fitted table: its calibration run, normalisation spec, layer, kind, bits."""
    return json.dumps([str(calibration), normalisation, layer, kind, bits], sort_keys=True)


def fitted_levels(key: str, fit) -> torch.Tensor:
    """The table named `key`, fitted by `fit()` the first time it is asked for in this process
    (or read by load_levels)."""
    if key not in FITTED:
        FITTED[key] = fit().cpu()
    return FITTED[key]


def save_levels(path) -> int:
    """Write every table fitted or loaded so far to the safetensors file `path`; their count."""
    from safetensors.torch import save_file

    names = sorted(FITTED)
    save_file({str(i): FITTED[n].contiguous() for i, n in enumerate(names)}, str(path),
              metadata={"keys": json.dumps(names)})
    return len(names)


def load_levels(path) -> int:
    """Add the tables of a save_levels file; their count."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()["keys"])
        FITTED.update({n: f.get_tensor(str(i)) for i, n in enumerate(names)})
    return len(names)


def fit_levels(u: torch.Tensor, top: int) -> torch.Tensor:
    """Lloyd-Max levels [top + 1] for values u in [0, top], the end levels fixed at 0 and top."""
    u = u.reshape(-1).float()
    if u.numel() > SAMPLE:
        g = torch.Generator().manual_seed(0)
        u = u[torch.randperm(u.numel(), generator=g)[:SAMPLE].to(u.device)]
    levels = torch.arange(top + 1, dtype=torch.float32, device=u.device)
    for _ in range(ITERATIONS):
        cell = nearest_level(u, levels)
        sums = torch.zeros_like(levels).index_add_(0, cell, u)
        counts = torch.zeros_like(levels).index_add_(0, cell, torch.ones_like(u))
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        moved[0], moved[-1] = 0.0, float(top)
        levels = moved.sort().values
    return levels


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` for every value of u (ties go up)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(u, mids, right=True)
