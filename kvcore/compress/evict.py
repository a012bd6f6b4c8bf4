"""Family `evict`: token eviction storage, and `select_keep`, the one shared top-k.

The scorers (which tokens matter) live in `kvcore.eviction`; here a scorer is only a
name. Given per-token scores, `select_keep` picks which tokens stay:

- the first `sink_tokens` and last `recent_tokens` tokens are always kept;
- k = max(floor(keep_ratio * seq), tokens in those windows), capped at seq, tokens
  are kept per head on average;
- budget `uniform`: exactly k per (sequence, KV head), the top scores of that head;
- budget `global`: exactly k * n_kv per sequence, the top scores across all heads of
  the layer (one threshold), so heads keep different counts;
- budget `model`: one threshold over every layer and head (KVzip's default);
  `Evict.select_layers` puts every layer's scores side by side on the head axis (the
  one selection perplexity, tasks and the compress job call); a single layer's scores
  select as `global`.

Stored form per tensor: `keep`, a 1-bit mask of kept (sequence, head, token) slots
(ceil(n*h*seq / 8) bytes, cheaper than token indices for any keep ratio above 1/16),
and `values` [n_kept, dim], the kept vectors in original dtype in mask order.
`decompress` returns the dense tensor with evicted vectors zero; `keep_mask(packed)`
returns the mask. Note for attention: a zero key still receives weight exp(0), so to
*drop* tokens from attention use the mask, not the zeros.
"""

from __future__ import annotations

import math

import torch

from kvcore.compress.base import HEADER_NBYTES, Method, read_header
from kvcore.compress.packing import pack_bits, packed_nbytes, unpack_bits
from kvcore.compress.params import BUDGETS, PARAMS
from kvcore.errors import KvcoreError, UsageError


def kept_per_head(seq: int, keep_ratio: float, sink_tokens: int, recent_tokens: int) -> int:
    """k: tokens kept per head (exact for uniform, the average for global)."""
    forced = min(seq, sink_tokens + recent_tokens)
    return min(seq, max(math.floor(keep_ratio * seq + 1e-9), forced))


def select_keep(scores: torch.Tensor, keep_ratio: float, sink_tokens: int = 0,
                recent_tokens: int = 0, budget: str = "uniform") -> torch.Tensor:
    """Scores [n_seq, n_kv, seq] (higher = keep) -> bool mask [n_seq, n_kv, seq]."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.is_floating_point():
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise UsageError(f"select_keep: scores must be a float tensor [n_seq, n_kv, seq] (got {got})")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise UsageError(f"select_keep: keep_ratio must be a number in (0, 1] (got {keep_ratio!r})")
    for key, value in (("sink_tokens", sink_tokens), ("recent_tokens", recent_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"select_keep: {key} must be an integer >= 0 (got {value!r})")
    if budget not in BUDGETS:
        raise UsageError(f"select_keep: budget must be one of {', '.join(BUDGETS)} (got {budget!r})")
    if torch.isnan(scores).any():
        raise KvcoreError("select_keep: scores contain NaN")

    n, h, seq = scores.shape
    k = kept_per_head(seq, keep_ratio, sink_tokens, recent_tokens)
    start = min(sink_tokens, seq)
    stop = seq - min(recent_tokens, seq - start)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep[:, :, :start] = True
    keep[:, :, stop:] = True
    extra = k - (seq - (stop - start))  # tokens chosen by score, per head
    if extra <= 0:
        return keep
    # Only the tokens between the windows compete, so the windows can never lose.
    middle = scores[:, :, start:stop]
    chosen = torch.zeros(middle.shape, dtype=torch.bool, device=scores.device)
    if budget == "uniform":
        chosen.scatter_(-1, middle.topk(extra, dim=-1).indices, True)
    else:
        flat = middle.reshape(n, h * (stop - start))
        chosen.view(n, -1).scatter_(-1, flat.topk(extra * h, dim=-1).indices, True)
    keep[:, :, start:stop] = chosen
    return keep


class Evict(Method):
    family = "evict"
    needs_scores = True
    params = PARAMS["evict"]

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """This method's keep mask for `scores` [n_seq, n_kv, seq].

        A bool `scores` is a mask this method already chose (kvcore.compress.run selects
        each sequence at its own length, and budget `model` across layers) and is
        returned as it is."""
        if isinstance(scores, torch.Tensor) and scores.dtype == torch.bool:
            return scores
        return select_keep(scores, self.keep_ratio, self.sink_tokens, self.recent_tokens, self.budget)

    def select_layers(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the keep mask for every layer's scores [n_seq, n_kv, seq]: per head or per
        layer (budgets uniform, global), or under one threshold over every layer and head
        (budget model: the layers' heads side by side). The one selection every caller uses."""
        if self.budget == "model" and len(scores) > 1:
            return list(self.select(torch.cat(scores, dim=1)).split([s.shape[1] for s in scores], dim=1))
        return [self.select(s) for s in scores]

    def _check_input(self, x, kind, keep, layer):
        self._check_kind(kind)
        if keep is None:
            raise self.error(
                "family evict needs keep=, a bool mask [n_seq, n_kv, seq] from "
                "method.select(scores) (scores from a scorer in kvcore.eviction)"
            )
        super()._check_input(x, kind, None, layer)
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(x.shape[:3]):
            raise self.error(
                f"keep must be a bool tensor of shape {tuple(x.shape[:3])} (got {keep.dtype} {tuple(keep.shape)})"
            )

    def _encode(self, x, kind, keep, layer):
        keep = keep.to(x.device)
        return {"keep": keep, "values": x[keep]}

    def _decode(self, fields, shape, dtype, device, kind):
        out = torch.zeros(shape, dtype=dtype, device=device)
        out[fields["keep"]] = fields["values"]
        return out

    def _pack(self, fields, shape, kind):
        return {"keep": pack_bits(fields["keep"], 1), "values": fields["values"]}

    def _unpack(self, packed, shape, kind):
        n, h, t, _ = shape
        keep = unpack_bits(packed["keep"], 1, n * h * t).view(n, h, t).bool()
        return {"keep": keep, "values": packed["values"]}

    def keep_mask(self, packed) -> torch.Tensor:
        """The bool [n_seq, n_kv, seq] mask of kept tokens stored in a packed form."""
        shape, _, _ = read_header(packed)
        return self._unpack(dict(packed), shape, "key")["keep"]

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        """The kept vectors + a 1-bit mask: the vectors of `keep` when given, else n * h * k
        (what `select` keeps of one layer under any budget on average)."""
        n, h, t, d = shape
        kept = int(keep.sum()) if keep is not None else n * h * kept_per_head(t, self.keep_ratio, self.sink_tokens,
                                                                                self.recent_tokens)
        return HEADER_NBYTES + packed_nbytes(n * h * t, 1) + kept * d * dtype.itemsize
