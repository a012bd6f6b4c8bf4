"""Family `evict`: token eviction storage, and `select_keep`, the one shared top-k.

The scorers (which tokens matter) live in `kvcore.eviction`; here a scorer is only a
name. Given per-token scores, `select_keep` picks which tokens stay:

- the first `sink_tokens` and last `recent_tokens` tokens are always kept;
- k = max(floor(keep_ratio * seq), tokens in those windows), capped at seq, tokens
  are kept per head on average;
- budget `uniform`: exactly k per (sequence, KV head), the top scores of that head;
- budget `global`: exactly k * n_kv per sequence, the top scores across all heads of
  the layer (one threshold), so heads keep different counts;
- budget `model`: one threshold over every layer and head (KVzip's and kvpress's
  default); callers that hold all layers pass their scores side by side on the head
  axis, a single layer's scores select as `global`.

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

from kvcore.compress.base import HEADER_NBYTES, Method, choice, count, fraction, name, read_header
from kvcore.compress.packing import pack_bits, packed_nbytes, unpack_bits
from kvcore.errors import KvcoreError, UsageError

BUDGETS = ("uniform", "global", "model")


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
    params = {
        "scorer": name("name of the scorer in kvcore.eviction"),
        "keep_ratio": fraction(0.5, 0.0, 1.0, True, "fraction of tokens kept"),
        "sink_tokens": count(0, "first tokens always kept"),
        "recent_tokens": count(0, "last tokens always kept"),
        "budget": choice("uniform", BUDGETS, "same count per head, one threshold per layer (global) or over all layers (model)"),
    }

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """This method's keep mask for `scores` [n_seq, n_kv, seq].

        A bool `scores` is a mask this method already chose (kvcore.compress.run selects
        each sequence at its own length, and budget `model` across layers) and is
        returned as it is."""
        if isinstance(scores, torch.Tensor) and scores.dtype == torch.bool:
            return scores
        return select_keep(scores, self.keep_ratio, self.sink_tokens, self.recent_tokens, self.budget)

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

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None):
        """For a mask from `select`: both budgets keep n * h * k vectors."""
        n, h, t, d = shape
        k = kept_per_head(t, self.keep_ratio, self.sink_tokens, self.recent_tokens)
        return HEADER_NBYTES + packed_nbytes(n * h * t, 1) + n * h * k * d * dtype.itemsize

    def select_extracted(self, path, model_dir, tokens, *, device: str = "auto", dtype: str = "auto",
                         options: dict | None = None) -> tuple[list[torch.Tensor], int]:
        """(masks, n_tokens) for an extracted safetensors `path` (the workflow's compress job):
        per layer, the bool mask [n_seq, n_kv, seq_len] of the tokens this method keeps, and
        how many real tokens the sequences hold. Each sequence's tokens (from `tokens`, the
        tokens.parquet it was extracted from) are prefilled again with the model and chosen
        as the perplexity protocol chooses a context (`kvcore.protocols.context_keep`), at
        the sequence's own length: padding is never kept. The random scorer is seeded by
        seq_id. `device`/`dtype` should be the extraction's; `options` the protocol's."""
        import json

        from safetensors import safe_open

        # Imported here, not at the top: only a compress job of this family runs a model.
        from kvcore.model import kv_shape, load_model
        from kvcore.protocols import context_keep
        from kvcore.tokens import read_sequences

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            n, n_kv, width, _ = f.get_slice("layer_0_key").get_shape()
        seq_ids = json.loads(meta.get("seq_ids", "[]"))
        lengths = json.loads(meta.get("seq_lengths", "null")) or [width] * len(seq_ids)
        if len(seq_ids) != n or len(lengths) != n:
            raise KvcoreError(f"{path}: its metadata names {len(seq_ids)} sequences but it holds {n}")
        sequences = read_sequences(tokens, seq_ids)
        model, tokenizer, device = load_model(model_dir, device, dtype)
        shape = kv_shape(model.config)
        stated = int(meta.get("num_layers", shape["num_layers"]))
        if (shape["num_layers"], shape["num_kv_heads"]) != (stated, n_kv):
            raise KvcoreError(f"{model_dir}: the model has {shape['num_layers']} layers x {shape['num_kv_heads']} "
                              f"KV heads but {path} holds {stated} x {n_kv}; extract again with this model")
        masks = [torch.zeros((n, n_kv, width), dtype=torch.bool) for _ in range(shape["num_layers"])]
        for i, (seq_id, length) in enumerate(zip(seq_ids, lengths)):
            ids = sequences.get(seq_id, [])
            if len(ids) != length:  # tokens.parquet was rewritten since this extraction
                raise KvcoreError(f"{tokens}: sequence {seq_id} has {len(ids)} tokens but {length} were "
                                  "extracted; tokenize and extract again")
            keeps = context_keep(model, torch.tensor([ids], device=device), self, tokenizer=tokenizer,
                                 options=options, index=seq_id)
            for layer, keep in enumerate(keeps):
                masks[layer][i, :, :length] = keep[0].cpu()
        return masks, sum(lengths)
