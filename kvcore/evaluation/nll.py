"""Negative log-likelihood of scored tokens, pooled over windows, and paired differences."""

from __future__ import annotations

import hashlib
import math


def target_nll(logits, targets) -> tuple[float, int]:
    """Sum of NLL of targets [1, T] under logits [1, T, V] (logits[t] predicts targets[t])."""
    import torch

    logp = torch.log_softmax(logits[0].float(), dim=-1)
    nll = -logp.gather(1, targets[0][:, None]).squeeze(1)
    return float(nll.double().sum()), int(targets.shape[1])


def scored_nll(logits, labels) -> tuple[float, int]:
    """Sum of next-token NLL over labels != -100 (logits[t] predicts labels[t + 1]), and the count."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return target_nll(logits[keep][None], labels[keep][None])


def plain_window(model, input_ids, target_len: int) -> tuple[float, int]:
    """The reference protocol: one forward over the window, no cache compression."""
    import torch

    labels = input_ids.clone()
    labels[:, :-target_len] = -100
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return scored_nll(logits, labels)


def summarize(per_window: list[dict], seconds: float | None = None) -> dict:
    """Pool windows (from one job or merged shards) into a perplexity; `seconds` defaults to the
    sum of the windows' seconds (so a merged run reports the time its shards spent scoring)."""
    per_window = sorted(per_window, key=lambda w: w["index"])
    if seconds is None:
        seconds = sum(w["seconds"] for w in per_window)
    nll = sum(w["nll_sum"] for w in per_window)
    n = sum(w["n_scored"] for w in per_window)
    out = {"perplexity": math.exp(nll / n) if n else float("nan"), "nll_sum": nll, "n_scored": n,
           "seconds": seconds, "tokens_per_second": n / seconds if seconds > 0 else None, "windows": per_window}
    if per_window and all("scored_seconds" in w for w in per_window):
        out["scored_seconds"] = sum(w["scored_seconds"] for w in per_window)
    return out


def paired_differences(windows: list[dict]) -> dict:
    """Per-window paired differences (compressed - baseline) of the mean NLL per scored token.

    delta_percent_ci95 turns mean +- 1.96 standard errors into a perplexity change in %,
    so a small pooled delta can be told from window-to-window noise.
    """
    diffs = [(w["nll_sum"] - w["baseline_nll_sum"]) / w["n_scored"] for w in windows if w["n_scored"]]
    n = len(diffs)
    if not n:
        return {"n_windows": 0}
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    out = {"n_windows": n, "mean_nll_delta": mean, "stderr_nll_delta": se,
           "windows_worse": sum(d > 0 for d in diffs),
           "delta_percent_per_window": [100.0 * math.expm1(d) for d in diffs]}
    if se is not None:
        out["delta_percent_ci95"] = [100.0 * math.expm1(mean - 1.96 * se), 100.0 * math.expm1(mean + 1.96 * se)]
    return out


def token_ids_sha256(token_ids) -> str:
    """sha256 of the evaluated token ids as little-endian int64: two runs pair window by
    window only when this matches."""
    import numpy as np

    return hashlib.sha256(np.asarray(list(token_ids), dtype="<i8").tobytes()).hexdigest()
