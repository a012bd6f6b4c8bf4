"""The eviction compress job: which tokens of an extracted run an evict method keeps.

Each extracted sequence's tokens (tokens.parquet) are prefilled again with the model and
chosen through the one context-compression path (`context.select_context`), each sequence
at its own length, so padding is never kept and the choice is the one perplexity and the
tasks make for the same context. Scorers that read no attention (knorm, streamingllm,
random) score the extracted keys instead and load no model. The random scorer is seeded by
seq_id.
"""

from __future__ import annotations

from kvcore.errors import KvcoreError, UsageError
from kvcore.evaluation.context import select_context
from kvcore.evaluation.options import check_options
from kvcore.evaluation.prefill import make_scorers, prefill_context


def context_keep(model, ids, method, *, tokenizer=None, options: dict | None = None, index: int = 0) -> list:
    """Per layer, the bool mask [1, n_kv, seq] of the tokens an evict `method` keeps of `ids` [1, seq]."""
    import torch

    options = check_options(options)
    scorers = make_scorers([method], options, tokenizer)
    model.eval()
    with torch.inference_mode():
        pre = prefill_context(model, ids, scorers, options, tokenizer)
        return select_context(method, pre, scorers, options, index=index)


def _sequences(merged) -> tuple[list, list]:
    """(seq_ids, lengths) of a run's merged shards, checked against the tensors they hold."""
    import json

    meta = merged.metadata()
    n, _, width, _ = merged.shape("layer_0_key")
    seq_ids = json.loads(meta.get("seq_ids", "[]"))
    lengths = json.loads(meta.get("seq_lengths", "null")) or [width] * len(seq_ids)
    if len(seq_ids) != n or len(lengths) != n:
        raise KvcoreError(f"{merged}: its metadata names {len(seq_ids)} sequences but it holds {n}")
    return seq_ids, lengths


def keep_masks(merged, method, model_dir, tokens, *, device: str = "auto", dtype: str = "auto",
               options: dict | None = None) -> tuple[list, int]:
    """(masks, n_tokens) for a run's extracted shards (`kvcore.compress.shards.MergedShards`):
    per layer, the bool mask [n_seq, n_kv, seq_len] of the tokens `method` keeps, and how many
    real tokens the sequences hold. `device`/`dtype` should be the extraction's; `options` the
    evaluator's. A scorer that reads no attention scores the extracted cache itself
    (`cache_keep_masks`: no model, no tokens)."""
    import torch

    from kvcore.eviction import needs_model
    from kvcore.model import kv_shape, load_model
    from kvcore.progress import each
    from kvcore.tokens import read_sequences

    if not needs_model(method.scorer):
        return cache_keep_masks(merged, method, device=device, options=options)
    seq_ids, lengths = _sequences(merged)
    n, n_kv, width, _ = merged.shape("layer_0_key")
    meta = merged.metadata()
    sequences = read_sequences(tokens, seq_ids)
    model, tokenizer, device = load_model(model_dir, device, dtype)
    shape = kv_shape(model.config)
    stated = int(meta.get("num_layers", shape["num_layers"]))
    if (shape["num_layers"], shape["num_kv_heads"]) != (stated, n_kv):
        raise KvcoreError(f"{model_dir}: the model has {shape['num_layers']} layers x {shape['num_kv_heads']} "
                          f"KV heads but {merged} holds {stated} x {n_kv}; extract again with this model")
    masks = [torch.zeros((n, n_kv, width), dtype=torch.bool) for _ in range(shape["num_layers"])]
    for i, (seq_id, length) in enumerate(each(list(zip(seq_ids, lengths)), f"score {method.name}", "sequences",
                                                      jobs_only=True)):
        ids = sequences.get(seq_id, [])
        if len(ids) != length:  # tokens.parquet was rewritten since this extraction
            raise KvcoreError(f"{tokens}: sequence {seq_id} has {len(ids)} tokens but {length} were "
                              "extracted; tokenize and extract again")
        keeps = context_keep(model, torch.tensor([ids], device=device), method, tokenizer=tokenizer,
                             options=options, index=seq_id)
        for layer, keep in enumerate(keeps):
            masks[layer][i, :, :length] = keep[0].cpu()
    return masks, sum(lengths)


def cache_keep_masks(merged, method, *, device: str = "auto", options: dict | None = None) -> tuple[list, int]:
    """`keep_masks` for a scorer that reads only the cache (knorm, streamingllm, random): each
    sequence's extracted keys at its own length scored layer by layer (one layer in memory),
    then selected through the one context-compression path (`context.select_context`)."""
    import torch

    from kvcore.evaluation.prefill import score_layer
    from kvcore.model import resolve_device

    options = check_options(options)
    scorer = make_scorers([method], options)[method.scorer]
    dev = torch.device(resolve_device(device))
    seq_ids, lengths = _sequences(merged)
    n_layers = sum(1 for name in merged.keys() if name.endswith("_key"))
    scores = [[] for _ in seq_ids]
    with torch.inference_mode():
        for layer in range(n_layers):
            k = merged.get_tensor(f"layer_{layer}_key", dev)
            v = merged.get_tensor(f"layer_{layer}_value", dev)
            for i, (seq_id, length) in enumerate(zip(seq_ids, lengths)):
                scores[i].append(score_layer(scorer, layer, k[i:i + 1, :, :length], v[i:i + 1, :, :length],
                                             seq_id, options))
        n, n_kv, width, _ = merged.shape("layer_0_key")
        masks = [torch.zeros((n, n_kv, width), dtype=torch.bool) for _ in range(n_layers)]
        for i, (seq_id, length) in enumerate(zip(seq_ids, lengths)):
            keeps = select_context(method, None, {method.scorer: scorer}, options, index=seq_id,
                                   scores={method.scorer: scores[i]})
            for layer, keep in enumerate(keeps):
                masks[layer][i, :, :length] = keep[0].cpu()
    return masks, sum(lengths)


def compress_extracted(shards, out_safetensors, out_json, name: str, spec: dict, device: str | None = None, *,
                       model_dir=None, tokens=None, model_device: str = "auto", model_dtype: str = "auto",
                       options: dict | None = None) -> dict:
    """The workflow's compress job for any method: `kvcore.compress.run.compress_run`, with the
    keep masks of an evict method chosen here (a scorer that reads attention needs the model
    that was extracted and the tokens.parquet the sequences came from; the others score the
    extracted cache). Eviction metrics add kept_fraction and kept_by_layer (of the sequences'
    real tokens). `device` is where the compression runs ("auto": CUDA when there is a GPU)."""
    from kvcore.compress import parse_method
    from kvcore.compress.run import compress_run
    from kvcore.eviction import needs_model

    method = parse_method(name, spec)
    select = None
    if method.needs_scores:
        if needs_model(method.scorer) and (model_dir is None or tokens is None):
            raise UsageError(f"method {name!r} (family {method.family}) scores tokens with the model: "
                             "pass the model directory and tokens.parquet")

        def select(merged):
            masks, n_tokens = keep_masks(merged, method, model_dir, tokens, device=model_device, dtype=model_dtype,
                                         options=options)
            slots = n_tokens * masks[0].shape[1]
            by_layer = [int(m.sum()) / slots for m in masks]
            return masks, {"kept_fraction": sum(by_layer) / len(by_layer), "kept_by_layer": by_layer}

    return compress_run(shards, out_safetensors, out_json, name, spec, device, select=select)
