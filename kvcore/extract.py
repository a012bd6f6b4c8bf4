"""Run a model over token sequences and capture its KV cache.

The cache comes from transformers' own cache object (`DynamicCache.layers[i].keys/values`,
shape [batch, n_kv_heads, seq, head_dim], keys after RoPE), so what is stored is exactly
what the model attends to.

The pipeline: the forward pass runs on the default stream; `ShardWriter.add` copies the
cache into reused (pinned, on CUDA) host buffers on a second stream and returns; writer
threads wait for each copy's event, write the safetensors rows at their offsets and encode
the Parquet rows, while the next forward runs. Host memory stays bounded by a few batches.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError


def forward_cache(model, input_ids, attention_mask=None):
    """(logits, [keys per layer], [values per layer]) of one forward pass.

    A plain DynamicCache of our own keeps every token in every layer: sliding-window layers
    (Gemma-2/3) would otherwise keep only their last window, while their attention masks the
    rest anyway. (transformers 5 names the argument `cache`, earlier versions `past_key_values`.)"""
    import inspect

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{argument: cache})
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return out.logits, keys, values


def predictions_table(tokenizer, logits, lengths: list[int], seq_ids: list[int], top_k: int,
                      temperature: float = 1.0):
    """Next-token top-k after the last real token of each sequence (probabilities at `temperature`)."""
    import pyarrow as pa
    import torch

    last = logits[torch.arange(len(lengths)), torch.tensor(lengths) - 1].float()
    probs = torch.softmax(last / temperature, dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    top_logit = last.gather(1, top_i)
    ids = top_i.cpu().tolist()
    flat = [t for row in ids for t in row]
    words = dict(zip(sorted(set(flat)), tokenizer.batch_decode([[t] for t in sorted(set(flat))])))
    return pa.table({
        "seq_id": pa.array([s for s in seq_ids for _ in range(top_k)], pa.int32()),
        "rank": pa.array(list(range(top_k)) * len(seq_ids), pa.int16()),
        "token_id": pa.array(flat, pa.int32()),
        "token": pa.array([words[t] for t in flat], pa.string()),
        "probability": pa.array(top_p.cpu().reshape(-1).tolist(), pa.float32()),
        "logit": pa.array(top_logit.cpu().reshape(-1).tolist(), pa.float32()),
    })


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_meta(model, model_name: str, dataset_name: str, seq_len: int) -> dict:
    from kvcore.model import kv_shape

    return {"model": model_name, "dataset": dataset_name, "seq_len": seq_len,
            "dtype": str(model.dtype).replace("torch.", ""), **kv_shape(model.config)}


@contextmanager
def host_threads_for_writers(device: str):
    """With the model on a GPU, torch's CPU thread pool (one OpenMP thread per core) has nothing
    to do but competes with the writer threads for the cores: one thread while extracting.
    On an H100 host with 16 writers: +18 % tokens/s through the writer alone, 1.01-1.24x for
    the whole extraction (TinyLlama, GPT-2 shapes; benchmarks/README.md)."""
    import torch

    before = torch.get_num_threads()
    if str(device).startswith("cuda"):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extract_sequences(model, tokenizer, sequences: dict[int, list[int]], writer, batch_size: int, top_k: int,
                      device: str, progress: str | None = None) -> None:
    """Forward every sequence (batched, right-padded) and hand each batch to `writer.add`."""
    with host_threads_for_writers(device):
        _extract_sequences(model, tokenizer, sequences, writer, batch_size, top_k, device, progress)


def _extract_sequences(model, tokenizer, sequences, writer, batch_size, top_k, device, progress) -> None:
    import torch

    from kvcore.progress import Progress

    seq_ids = sorted(sequences)
    bar = Progress(progress, sum(len(sequences[s]) for s in seq_ids), "tok") if progress else None
    for batch in batches(seq_ids, batch_size):
        rows = [sequences[s] for s in batch]
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        uniform = min(lengths) == width  # no padding: skip the mask, the fast path
        logits, keys, values = forward_cache(model, ids.to(device), None if uniform else mask.to(device))
        writer.add(batch, rows, keys, values, predictions_table(tokenizer, logits, lengths, batch, top_k))
        if bar:
            bar.update(sum(lengths))


def parquet_selection(model, parquet_layers=None, parquet_heads=None, parts: str = "both",
                      storage_dtype: str = "float32"):
    """The Parquet options, checked against the model's shape (a usage error, before any output)."""
    from kvcore.model import kv_shape
    from kvcore.storage import ParquetSelection

    selection = ParquetSelection.of(parquet_layers, parquet_heads, parts, storage_dtype)
    shape = kv_shape(model.config)
    selection.check(shape["num_layers"], shape["num_kv_heads"])
    return selection


def check_top_k(model, top_k: int) -> None:
    """A top-k the vocabulary cannot give is a usage error before any output, not torch's RuntimeError."""
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(top_k, int) or top_k < 1 or (vocab and top_k > vocab):
        raise UsageError(f"top_k must be an integer from 1 to the model's vocabulary size {vocab} (got {top_k!r})")


def extract_shard(model_dir: str | Path, tokens_parquet: str | Path, run_dir: str | Path, shard: int,
                  shard_size: int, batch_size: int = 8, device: str = "auto", dtype: str = "auto", top_k: int = 10,
                  model_name: str | None = None, dataset_name: str | None = None, parquet_layers=None,
                  parquet_heads=None, parts: str = "both", storage_dtype: str = "float32") -> dict:
    """Extract sequences [shard*shard_size, (shard+1)*shard_size) of a tokens table into run_dir.

    `parquet_layers`/`parquet_heads` (None: all), `parts` (both/keys/values) and `storage_dtype`
    (float32/float16) choose what goes to Parquet; the safetensors always hold everything.
    """
    from kvcore.model import load_model
    from kvcore.storage import ParquetSelection, ShardWriter
    from kvcore.tokens import read_sequences

    ParquetSelection.of(parquet_layers, parquet_heads, parts, storage_dtype)  # bad names fail before loading
    seq_ids = list(range(shard * shard_size, (shard + 1) * shard_size))
    sequences = read_sequences(tokens_parquet, seq_ids)
    if not sequences:
        raise KvcoreError(f"{tokens_parquet}: no sequences for shard {shard} (seq_ids {seq_ids[0]}..{seq_ids[-1]})")
    model, tokenizer, device = load_model(model_dir, device, dtype)
    check_top_k(model, top_k)
    selection = parquet_selection(model, parquet_layers, parquet_heads, parts, storage_dtype)
    seq_len = max(len(v) for v in sequences.values())
    meta = run_meta(model, model_name or Path(model_dir).name, dataset_name or Path(tokens_parquet).parent.name,
                    seq_len)
    writer = ShardWriter(run_dir, shard, meta, seq_lengths={s: len(v) for s, v in sequences.items()},
                         selection=selection)
    try:
        extract_sequences(model, tokenizer, sequences, writer, batch_size, top_k, device, progress=f"shard {shard}")
    except BaseException:
        writer.abort()  # stop the writer threads, leave nothing staged
        raise
    return writer.close()


JSON_MAX_ELEMENTS = 2_000_000  # cache numbers a JSON file may hold (about 40 MB of text)


def check_json_size(elements: int, max_elements: int | None = None) -> None:
    max_elements = JSON_MAX_ELEMENTS if max_elements is None else max_elements
    if elements > max_elements:
        raise UsageError(f"{elements:,} cache elements is too many for JSON (limit {max_elements:,}); "
                         "use the run's Parquet/safetensors instead, or shorter or fewer texts")


@dataclass
class Extraction:
    """The KV cache of one text: what `Extractor.extract` returns."""

    tokens: list[str]
    token_ids: list[int]
    keys: list  # per layer, torch tensor [n_kv_heads, seq, head_dim]
    values: list
    prediction: dict
    meta: dict = field(default_factory=dict)
    text: str = ""

    def _check(self, layer: int, head: int, token: int) -> None:
        n_layers, n_kv, n_tok = len(self.keys), self.keys[0].shape[0], len(self.tokens)
        if not (0 <= layer < n_layers and 0 <= head < n_kv and 0 <= token < n_tok):
            raise UsageError(f"coordinate ({layer}, {head}, {token}) out of range: layer 0..{n_layers - 1}, "
                             f"head 0..{n_kv - 1}, token 0..{n_tok - 1}")

    def coordinate(self, layer: int, head: int, token: int) -> dict:
        """Key and value vectors (and their L2 norms) at one (layer, KV head, token)."""
        self._check(layer, head, token)
        k = self.keys[layer][head, token].float()
        v = self.values[layer][head, token].float()
        return {"layer": layer, "head": head, "token": token, "token_text": self.tokens[token],
                "key": k.tolist(), "value": v.tolist(), "key_norm": float(k.norm()), "value_norm": float(v.norm())}

    def stats(self) -> dict:
        """Shape, size and value statistics of the whole cache."""
        import torch

        k = torch.stack([x.float() for x in self.keys])
        v = torch.stack([x.float() for x in self.values])
        both = torch.cat([k.reshape(-1), v.reshape(-1)])
        return {**self.meta, "seq_len": len(self.tokens), "total_elements": both.numel(),
                "total_bytes": both.numel() * self.keys[0].element_size(),
                "key_mean": float(k.mean()), "key_std": float(k.std()), "value_mean": float(v.mean()),
                "value_std": float(v.std()), "min": float(both.min()), "max": float(both.max()),
                "key_norm_mean": float(k.norm(dim=-1).mean()), "value_norm_mean": float(v.norm(dim=-1).mean())}

    def to_dict(self, max_elements: int | None = None) -> dict:
        """Nested JSON-ready form (kvcore's JSON layout); refused for large caches."""
        check_json_size(2 * sum(x.numel() for x in self.keys), max_elements)
        return {"meta": self.meta, "tokens": self.tokens, "token_ids": self.token_ids, "prediction": self.prediction,
                "kv_cache": {f"layer_{i}": {f"head_{h}": {"key": k[h].float().tolist(), "value": v[h].float().tolist()}
                                            for h in range(k.shape[0])}
                             for i, (k, v) in enumerate(zip(self.keys, self.values))}}

    def to_seed_dict(self, max_elements: int | None = None) -> dict:
        """The seed extractor's layout (README, "JSON copies"), so scripts written for it keep working:
        kv_cache.layer_i.head_j.tokens is a list of {token_idx, key, value}; heads are KV heads."""
        check_json_size(2 * sum(x.numel() for x in self.keys), max_elements)
        p = self.prediction
        return {
            "model": self.meta.get("model"),
            "input_text": self.text,
            "input_tokens": self.tokens,
            "predicted_next_token": {
                "token": p["token"], "token_id": p["token_id"], "probability": p["probability"],
                "top_k_candidates": [{"token": c["token"], "token_id": c["token_id"], "probability": c["probability"]}
                                     for c in p["top_k"]]},
            "kv_cache": {f"layer_{i}": {f"head_{h}": {"tokens": [
                {"token_idx": t, "key": key, "value": value}
                for t, (key, value) in enumerate(zip(k[h].float().tolist(), v[h].float().tolist()))]}
                for h in range(k.shape[0])} for i, (k, v) in enumerate(zip(self.keys, self.values))},
            "metadata": {"n_layers": self.meta.get("num_layers"), "n_heads": self.meta.get("num_kv_heads"),
                         "n_query_heads": self.meta.get("num_heads"), "d_head": self.meta.get("head_dim"),
                         "sequence_length": len(self.tokens), "temperature": p.get("temperature", 0.0)},
        }


class Extractor:
    """One-off extraction: `Extractor("smollm2-135m").extract("The quick brown fox")`.

    `model` is what `--model` takes: a model directory, a name of ./config.yaml's models or one
    prepared under ./resources/models/, or a hub id org/name[@revision] (kvcore.sources.resolve)."""

    def __init__(self, model: str | Path, device: str = "auto", dtype: str = "auto",
                 attn_implementation: str | None = None):
        from kvcore.model import load_model
        from kvcore.sources.resolve import resolve_model

        self.model_dir = resolve_model(str(model))
        self.model, self.tokenizer, self.device = load_model(self.model_dir, device, dtype, attn_implementation)

    def extract(self, text: str, top_k: int = 10, temperature: float = 0.0, seed: int = 0) -> Extraction:
        """The cache of `text` and its next token: the most likely one (temperature 0), or one
        sampled from the top-k at `temperature` with a generator seeded by `seed`."""
        import torch

        ids = self.token_ids(text)
        logits, keys, values = forward_cache(self.model, torch.tensor([ids], device=self.device))
        pred = predictions_table(self.tokenizer, logits, [len(ids)], [0], top_k, temperature or 1.0).to_pylist()
        chosen = 0
        if temperature > 0:
            weights = torch.tensor([p["probability"] for p in pred], dtype=torch.float64)
            chosen = int(torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed)))
        prediction = {"token": pred[chosen]["token"], "token_id": pred[chosen]["token_id"],
                      "probability": pred[chosen]["probability"], "temperature": temperature,
                      "top_k": [{k: p[k] for k in ("token", "token_id", "probability", "logit")} for p in pred]}
        meta = run_meta(self.model, self.model_dir.name, "text", len(ids))
        return Extraction(tokens=self.tokenizer.batch_decode([[i] for i in ids]), token_ids=ids,
                          keys=[k[0].cpu() for k in keys], values=[v[0].cpu() for v in values],
                          prediction=prediction, meta=meta, text=text)

    def token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UsageError("the text has no tokens")
        return ids

    def json_elements(self, texts: list[str]) -> int:
        """Cache numbers the JSON of `texts` holds, from the model's shape (checked before any output)."""
        from kvcore.model import kv_shape

        shape = kv_shape(self.model.config)
        per_token = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"]
        return per_token * sum(len(self.token_ids(t)) for t in texts)

    def extract_to_run(self, texts: list[str], run_dir: str | Path, top_k: int = 10, batch_size: int = 8,
                       dataset_name: str = "text", parquet_layers=None, parquet_heads=None, parts: str = "both",
                       storage_dtype: str = "float32") -> dict:
        """Extract several texts (one sequence each) into a run directory the query tools read.

        The Parquet options are those of `extract_shard`; a layer or head the model lacks is a
        UsageError before anything is written.
        """
        from kvcore.atomic import atomic_path
        from kvcore.storage import ShardWriter, finalize_run
        from kvcore.tokens import make_sequences, tokens_table, write_tokens_table

        check_top_k(self.model, top_k)
        selection = parquet_selection(self.model, parquet_layers, parquet_heads, parts, storage_dtype)
        sequences = make_sequences(self.tokenizer, texts, 1 << 30, len(texts), mode="documents")
        if not sequences:
            raise UsageError("none of the texts has any tokens")
        run_dir = Path(run_dir)
        with atomic_path(run_dir / "tokens.parquet") as tmp:
            write_tokens_table(tokens_table(self.tokenizer, sequences), tmp)
        seqs = {i: ids for i, (ids, _) in enumerate(sequences)}
        meta = run_meta(self.model, self.model_dir.name, dataset_name, max(len(s) for s in seqs.values()))
        writer = ShardWriter(run_dir, 0, meta, seq_lengths={s: len(v) for s, v in seqs.items()},
                             selection=selection)
        try:
            extract_sequences(self.model, self.tokenizer, seqs, writer, batch_size, top_k, self.device,
                              progress="extract")
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return finalize_run(run_dir, 1)
