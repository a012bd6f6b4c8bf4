"""A stored KV cache loaded back as a transformers DynamicCache, to continue generation.

`load_cache(path, seq_ids)` reads a run directory (its extracted kv/part-*.safetensors, as
metadata.json lists them), one extracted shard, or a compressed file
(compress/{method}.safetensors). Tensors are read with safetensors' torch API, so bfloat16
shards load as they are. A quantized or sparsified file gives the dequantized tensors
(`Method.decompress`, the same values the fake-quant cache computes); an evicted or pruned
one only the slots it kept, gathered as the evaluation gathers them (`cache.kept_order`),
with each slot's original position. Several sequences are stacked on the batch axis,
right-padded; heads or sequences holding fewer slots than the layer's widest are padded,
and `hidden` marks the padding (`LoadedCache.attention(model)` masks it out).

`validate_cache(cache, config)` lists what does not fit a model's geometry (the old
bridge's shape validator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError
from kvcore.evaluation.attention import PassState, attention_pass
from kvcore.evaluation.cache import cache_from, kept_order


@dataclass
class LoadedCache:
    cache: object  # transformers DynamicCache, per layer [n_seq, n_kv, slots, head_dim]
    positions: list  # per layer int64 [n_seq, n_kv, slots]: each slot's position in its sequence, -1 = padding
    seq_ids: list  # the sequences, in batch order
    lengths: list  # tokens each sequence had when extracted: the position its next token takes
    metadata: dict  # the file's string metadata (model, dataset, dtype, ...)
    method: str | None = None  # the compression method's name; None for an extracted shard
    hidden: dict = field(default_factory=dict)  # layer -> bool [n_seq, n_kv, slots]: padding slots
    token_ids: list | None = None  # per sequence its tokens (the run's tokens.parquet), None without it
    next_token_ids: list | None = None  # per sequence the run's top-1 next token (predictions.parquet)

    def attention(self, model):
        """Forwards of `model` inside this block mask the padding slots out (kvcore's attention)."""
        return attention_pass(model, PassState(hidden=self.hidden))


def _shard_paths(path: Path) -> list[Path]:
    from kvcore.storage import shard_files

    if path.is_dir():
        return shard_files(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such run directory or safetensors file")
    return [path]


def _file_tensors(path: Path, rows: list[int], device) -> tuple[dict, list, object]:
    """({layer: (keys, values, keep or None)} of the chosen rows, metadata, method or None)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from kvcore.compress.files import read_packed, unpack

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "compress_spec" not in meta:
                out = {}
                for name in f.keys():
                    if name.startswith("layer_") and name.endswith(("_key", "_value")):
                        layer, kind = int(name.split("_")[1]), name.rsplit("_", 1)[1]
                        out.setdefault(layer, {})[kind] = f.get_slice(name)[rows[0]:rows[-1] + 1].to(device)
                at = [r - rows[0] for r in rows]
                return {i: tuple(t[kind][at] if kind in t else None for kind in ("key", "value")) + (None,)
                        for i, t in sorted(out.items())}, meta, None
    except (SafetensorError, OSError, ValueError, KeyError, IndexError) as exc:
        raise KvcoreError(f"cannot read {path} as a kvcore cache file: {exc}") from None
    method, meta, groups = read_packed(path, device)
    out = {}
    for (layer, kind), packed in groups.items():
        dense = unpack(path, method, packed, layer, kind)[rows]
        keep = method.keep_mask(packed)[rows].to(dense.device) if hasattr(method, "keep_mask") else None
        if hasattr(method, "kept_heads"):  # pruned heads hold nothing
            heads = torch.tensor(method.kept_heads(layer, dense.shape[1]), device=dense.device)
            keep = heads[None, :, None].expand(dense.shape[:3])
        k, v, kept = out.get(layer, (None, None, None))
        out[layer] = (dense, v, keep) if kind == "key" else (k, dense, kept)
    return dict(sorted(out.items())), meta, method


def _check_layers(path, tensors: dict) -> None:
    if not tensors:
        raise KvcoreError(f"{path} holds no layer_{{i}}_key / layer_{{i}}_value tensors")
    for layer, (k, v, _) in tensors.items():
        if k is None or v is None:
            raise KvcoreError(f"{path}: layer_{layer}_{'key' if k is None else 'value'} is missing")
        if k.dim() != 4 or k.shape != v.shape:
            raise KvcoreError(f"{path}: layer {layer} keys {tuple(k.shape)} and values {tuple(v.shape)} "
                              "are not both [n_seq, n_kv, seq, head_dim]")
    if sorted(tensors) != list(range(len(tensors))):
        raise KvcoreError(f"{path}: layers {sorted(tensors)} are not 0..{len(tensors) - 1}")


def load_cache(run_or_file, seq_ids: list[int] | None = None, device: str = "cpu", *, dtype=None,
               model=None) -> LoadedCache:
    """The stored cache of `seq_ids` (default: every sequence) as a DynamicCache on `device`
    (auto, cpu, cuda, cuda:N).

    `dtype` converts the tensors (default: as stored); `model` checks them against its
    geometry (`validate_cache`) and builds the cache's layer types from its config."""
    import torch

    from kvcore.model import resolve_device

    device = resolve_device(device)
    if seq_ids is not None and (isinstance(seq_ids, (str, int)) or any(
            isinstance(s, bool) or not isinstance(s, int) for s in seq_ids)):
        raise UsageError(f"seq_ids must be a list of integer sequence ids, e.g. [0] (got {seq_ids!r})")
    paths = _shard_paths(Path(run_or_file))
    where: dict[int, tuple[Path, int, int]] = {}  # seq_id -> (file, row, length)
    for path in paths:
        meta = _metadata(path)
        ids = json.loads(meta.get("seq_ids", "[]"))
        lengths = json.loads(meta.get("seq_lengths", "null")) or [int(meta.get("seq_len", 0))] * len(ids)
        for row, (s, n) in enumerate(zip(ids, lengths)):
            where.setdefault(int(s), (path, row, int(n)))
    if not where:
        raise KvcoreError(f"{run_or_file} is not an extracted run, shard or compressed file "
                          "(its metadata names no sequences, seq_ids)")
    chosen = sorted(where) if seq_ids is None else list(seq_ids)
    missing = [s for s in chosen if s not in where]
    if missing or not chosen:
        raise UsageError(f"seq id {missing[0] if missing else '(none given)'} is not in {run_or_file} "
                         f"(it holds {len(where)} sequences, ids {min(where)}..{max(where)})")

    parts, meta, method = [], {}, None  # per chosen sequence: {layer: (k, v, keep)}
    for path in dict.fromkeys(where[s][0] for s in chosen):
        rows = sorted({where[s][1] for s in chosen if where[s][0] == path})
        tensors, meta, method = _file_tensors(path, rows, device)
        _check_layers(path, tensors)
        for s in chosen:
            if where[s][0] == path:
                i = rows.index(where[s][1])
                parts.append((s, {layer: (k[i:i + 1], v[i:i + 1], None if m is None else m[i:i + 1])
                                  for layer, (k, v, m) in tensors.items()}))
    parts.sort(key=lambda p: chosen.index(p[0]))
    lengths = [where[s][2] for s in chosen]
    width = max(lengths)

    keys, values, positions, hidden = [], [], [], {}
    for layer in range(len(parts[0][1])):
        ks, vs, keeps = [], [], []
        for (s, tensors), n in zip(parts, lengths):
            k, v, keep = tensors[layer]
            if k.shape[2] < n:
                raise KvcoreError(f"{where[s][0]}: sequence {s} has {n} tokens but its tensors hold {k.shape[2]}")
            k, v = k[:, :, :width], v[:, :, :width]
            keep = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device) if keep is None else keep[..., :width]
            pad = width - k.shape[2]
            if pad > 0:
                k, v = torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad))
                keep = torch.nn.functional.pad(keep, (0, pad))
            keep = keep & (torch.arange(width, device=k.device) < n)
            ks.append(k)
            vs.append(v)
            keeps.append(keep)
        k, v, keep = torch.cat(ks), torch.cat(vs), torch.cat(keeps)
        order, padding = kept_order(keep)
        index = order[..., None].expand(*order.shape, k.shape[-1])
        k, v = k.gather(2, index), v.gather(2, index)
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        keys.append(k)
        values.append(v)
        positions.append(order if padding is None else order.masked_fill(padding, -1))
        if padding is not None:
            hidden[layer] = padding
    if model is not None:
        problems = validate_cache(list(zip(keys, values)), model.config)
        if problems:
            raise KvcoreError(f"{run_or_file} does not fit the model: {problems[0]}")
        cache = cache_from(model, keys, values)
    else:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, layer)
    token_ids, next_ids = _run_tokens(Path(run_or_file), chosen)
    return LoadedCache(cache, positions, chosen, lengths, meta, getattr(method, "name", None), hidden,
                       token_ids, next_ids)


def _run_tokens(path: Path, seq_ids: list[int]) -> tuple[list | None, list | None]:
    """The sequences' tokens and predicted next tokens from the run holding `path` (a run
    directory, or a file in its kv/ or compress/), where the run has them."""
    import pyarrow.parquet as pq

    from kvcore.tokens import read_sequences

    run = path if path.is_dir() else path.parent.parent if path.parent.name in ("kv", "compress") else None
    if run is None or not (run / "tokens.parquet").is_file():
        return None, None
    found = read_sequences(run / "tokens.parquet", seq_ids)
    token_ids = [found.get(s) for s in seq_ids]
    next_ids = None
    if (run / "predictions.parquet").is_file():
        top = pq.read_table(run / "predictions.parquet", columns=["seq_id", "rank", "token_id"]).to_pylist()
        best = {r["seq_id"]: r["token_id"] for r in top if r["rank"] == 0}
        next_ids = [best.get(s) for s in seq_ids]
    return token_ids, next_ids


def _metadata(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise KvcoreError(f"cannot read {path} as safetensors: {exc}") from None


def validate_cache(cache, config) -> list[str]:
    """What in `cache` (a transformers Cache, or per-layer (keys, values) pairs) does not fit
    a model of `config`: layer count, [batch, n_kv, seq, head_dim] shapes, finite values.
    An empty list means it fits."""
    import torch

    from kvcore.model import kv_shape

    shape = kv_shape(config)
    layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
    problems = []
    if len(layers) != shape["num_layers"]:
        problems.append(f"{len(layers)} layers, the model has {shape['num_layers']}")
    want = (shape["num_kv_heads"], shape["head_dim"])
    for i, (k, v) in enumerate(layers):
        for kind, x in (("keys", k), ("values", v)):
            if x is None or x.dim() != 4 or (x.shape[1], x.shape[3]) != want:
                got = "nothing" if x is None else tuple(x.shape)
                problems.append(f"layer {i} {kind} are {got}, expected [batch, {want[0]}, seq, {want[1]}]")
            elif not bool(torch.isfinite(x).all()):
                problems.append(f"layer {i} {kind} hold NaN or infinite values")
        if k is not None and v is not None and k.shape[:3] != v.shape[:3]:
            problems.append(f"layer {i} keys {tuple(k.shape)} and values {tuple(v.shape)} hold different slots")
    return problems
