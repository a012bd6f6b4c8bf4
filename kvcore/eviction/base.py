"""The scorer interface: a scorer implements `score(inputs)` and nothing else.

`inputs` (`ScoreInputs`) holds one layer's cached context: keys and values
[n, n_kv, seq, dim] as the model caches them (after RoPE), and, for scorers that read
attention, `attention`: what the queries the scorer asked for (`queries`) gave each
cached token, per query head, computed in chunks by kvcore.evaluation.attention:

    sum    [n, n_kv, group, seq]  attention summed over those queries
    max    [n, n_kv, group, seq]  its maximum over those queries
    count  [seq]                  how many of those queries could see the token (causal)

`group` is the GQA group: query head h reads KV head h // group, so reducing over dim 2
gives one score per KV head. `queries` is one of:

    None       no attention (knorm, random, streamingllm)
    "context"  every query of the prefilled context (h2o)
    "window"   the last `window` queries of the context (snapkv)
    "repeat"   the queries of a reconstruction pass fed after the context (kvzip); the
               scorer builds that pass's inputs with `reconstruction_chunks`

Scores are float [n, n_kv, seq], higher = keep. The base checks the shape and NaNs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvcore.errors import KvcoreError, UsageError

QUERY_SETS = (None, "context", "window", "repeat")


@dataclass
class AttentionReceived:
    sum: torch.Tensor
    max: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Mean attention over the queries that could see each token, [n, n_kv, group, seq]."""
        return self.sum / self.count.clamp_min(1).to(self.sum.dtype)


@dataclass
class ScoreInputs:
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    attention: AttentionReceived | None = None
    generator: torch.Generator | None = None


class Scorer:
    """Base class: options with defaults in `defaults`, the query set in `queries`."""

    name: ClassVar[str] = ""
    queries: ClassVar[str | None] = None
    # the budget a method named after the scorer alone uses (kvcore.tasks): "model", one
    # threshold over every layer and head as KVzip selects, for the attention scorers
    budget: ClassVar[str] = "uniform"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise UsageError(f"scorer {self.name!r}: unknown option {unknown[0]!r} (valid: {valid})")
        for key, default in self.defaults.items():
            value = options.get(key, default)
            if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"scorer {self.name!r}: {key} must be an integer >= 1 (got {value!r})")
            setattr(self, key, value)

    @property
    def query_key(self) -> str | None:
        """Which attention statistics this scorer needs; equal keys share one computation."""
        if self.queries == "window":
            return f"window{self.window}"
        return self.queries

    def query_start(self, n_queries: int) -> int:
        """First observed query of the prefill (context and window query sets)."""
        return max(0, n_queries - self.window) if self.queries == "window" else 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        if self.queries is not None and inputs.attention is None:
            raise KvcoreError(f"scorer {self.name!r} needs the attention of its {self.queries} queries")
        scores = self.score(inputs)
        n, h, seq, _ = inputs.keys.shape
        if tuple(scores.shape) != (n, h, seq):
            raise KvcoreError(f"scorer {self.name!r} returned shape {tuple(scores.shape)}, expected {(n, h, seq)}")
        scores = scores.float()
        if torch.isnan(scores).any():
            raise KvcoreError(f"scorer {self.name!r} returned NaN scores (layer {inputs.layer})")
        return scores

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.defaults)
        return f"{type(self).__name__}({opts})"
