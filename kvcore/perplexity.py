"""Sliding-window perplexity, exactly as the Hugging Face perplexity guide computes it.

The evaluated text is the dataset's documents joined by blank lines, tokenized once (no
special tokens added). Windows of `max_length` tokens advance by `stride`; in each window
only the tokens not scored by an earlier window are scored (the others are labelled -100),
and the NLL is weighted by the number of scored tokens. With one window covering the whole
text this is a plain forward pass's perplexity.

Compression protocols plug in as a `score_window` function (see `plain_window`); the
result records every window's NLL sum so shards of windows merge to the same number and
methods can be compared window by window.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from kvcore.errors import UsageError


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    target_len: int  # how many of its last tokens are new (scored) in this window


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The HF guide's windows: begin = 0, stride, 2*stride, ... until the text is covered."""
    if max_length < 2 or stride < 1 or stride > max_length:
        raise UsageError(f"perplexity needs max_length >= 2 and 1 <= stride <= max_length "
                         f"(got max_length={max_length}, stride={stride})")
    if n_tokens < 2:
        raise UsageError(f"perplexity needs at least 2 tokens (got {n_tokens})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def scored_nll(logits, labels) -> tuple[float, int]:
    """Sum of next-token NLL over labels != -100 (logits[t] predicts labels[t + 1]), and the count."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[keep], dim=-1)
    nll = -logp.gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    return float(nll.double().sum()), int(keep.sum())


def plain_window(model, input_ids, target_len: int) -> tuple[float, int]:
    """The reference protocol: one forward over the window, no cache compression."""
    import torch

    labels = input_ids.clone()
    labels[:, :-target_len] = -100
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return scored_nll(logits, labels)


ScoreWindow = Callable[..., tuple[float, int]]


def evaluate(model, token_ids: list[int], max_length: int, stride: int, score_window: ScoreWindow = plain_window,
             device: str = "cpu", selected: list[int] | None = None, progress: str | None = None) -> dict:
    """Perplexity of `token_ids`; `selected` evaluates only those window indices (a shard)."""
    import torch
    from tqdm.auto import tqdm

    all_windows = windows(len(token_ids), max_length, stride)
    chosen = range(len(all_windows)) if selected is None else selected
    ids = torch.tensor([token_ids], device=device)
    per_window, started = [], time.perf_counter()
    for i in tqdm(chosen, desc=progress, unit="window", disable=progress is None):
        w = all_windows[i]
        nll_sum, count = score_window(model, ids[:, w.begin:w.end], w.target_len)
        per_window.append({"index": i, "begin": w.begin, "end": w.end, "nll_sum": nll_sum, "n_scored": count})
    seconds = time.perf_counter() - started
    return summarize(per_window, seconds) | {"n_windows_total": len(all_windows)}


def summarize(per_window: list[dict], seconds: float) -> dict:
    """Pool windows (from one job or merged shards) into a perplexity."""
    nll = sum(w["nll_sum"] for w in per_window)
    n = sum(w["n_scored"] for w in per_window)
    return {"perplexity": math.exp(nll / n) if n else float("nan"), "nll_sum": nll, "n_scored": n,
            "seconds": seconds, "tokens_per_second": n / seconds if seconds > 0 else None,
            "windows": sorted(per_window, key=lambda w: w["index"])}


def eval_token_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    from kvcore.tokens import encode_joined

    ids, _ = encode_joined(tokenizer, [text], max_tokens)
    return ids


def result_record(base: dict, compressed: dict | None, *, method: str, protocol: str, max_length: int,
                  stride: int, dtype: str, threshold: float, metrics: dict | None = None) -> dict:
    """The ppl/{method}.json fields (DESIGN.md)."""
    compressed = compressed or base
    metrics = metrics or {}
    delta = compressed["perplexity"] - base["perplexity"]
    return {
        "method": method,
        "baseline_perplexity": base["perplexity"],
        "compressed_perplexity": compressed["perplexity"],
        "delta": delta,
        "delta_percent": 100.0 * delta / base["perplexity"],
        "compression_ratio": metrics.get("compression_ratio", 1.0),
        "bits_per_element": metrics.get("bits_per_element"),
        "rmse": metrics.get("rmse", 0.0),
        "snr_db": metrics.get("snr_db"),
        "cosine_similarity": metrics.get("cosine_similarity", 1.0),
        "passed": bool(delta < threshold),
        "threshold": threshold,
        "protocol": protocol,
        "max_length": max_length,
        "stride": stride,
        "n_tokens": compressed["n_scored"],
        "dtype": dtype,
        "seconds": compressed["seconds"],
        "tokens_per_second": compressed["tokens_per_second"],
        "baseline_seconds": base["seconds"],
        "windows": [{"index": w["index"], "baseline_nll_sum": b["nll_sum"], "nll_sum": w["nll_sum"],
                     "n_scored": w["n_scored"]} for b, w in zip(base["windows"], compressed["windows"])],
    }


def run_perplexity(model_dir, text_parquet, method: str, spec: dict, settings: dict, out_path) -> dict:
    """Evaluate one method on a dataset and write ppl/{method}.json (the workflow's job)."""
    from pathlib import Path

    from kvcore.atomic import write_json
    from kvcore.model import load_model
    from kvcore.sources.datasets import joined_text

    if spec.get("family", "none") != "none":
        raise UsageError(f"method '{method}': family {spec.get('family')!r} has no perplexity protocol yet")
    model, tokenizer, device = load_model(Path(model_dir), settings.get("device", "auto"),
                                          settings.get("dtype", "float32"))
    ids = eval_token_ids(tokenizer, joined_text(text_parquet), settings.get("max_tokens"))
    base = evaluate(model, ids, settings["max_length"], settings["stride"], device=device, progress=method)
    record = result_record(base, None, method=method, protocol="none", max_length=settings["max_length"],
                           stride=settings["stride"], dtype=str(model.dtype).replace("torch.", ""),
                           threshold=settings.get("threshold", 0.5))
    write_json(out_path, record)
    return record
