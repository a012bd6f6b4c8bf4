"""Sliding-window perplexity, exactly as the Hugging Face perplexity guide computes it.

The evaluated text is the dataset's documents joined by blank lines, tokenized once (no
special tokens added). Windows of `max_length` tokens advance by `stride`; in each window
only the tokens not scored by an earlier window are scored (the others are labelled -100),
and the NLL is weighted by the number of scored tokens. With one window covering the whole
text this is a plain forward pass's perplexity.

Compression protocols plug in as a `score_window` function (see `plain_window`); the
result records every window's NLL sum so shards of windows merge to the same number and
methods can be compared window by window. The two protocols of DESIGN.md (fake-quant,
prefill-compress) live in `kvcore.protocols`; `run_perplexity` writes ppl/{method}.json
with the method's primary protocol at top level and every protocol under `protocols`.

Layouts: `sliding` is the HF guide (above); `chunks` cuts the text into disjoint windows
of max_length tokens and scores the last `stride` of each (kvpress's protocol), so 8192
tokens at 1024/512 make 8 windows of 512 context + 512 scored tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from kvcore.errors import KvcoreError, UsageError


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


def chunk_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Disjoint full windows of max_length tokens, each scoring its last `stride` tokens."""
    if max_length < 2 or stride < 1 or stride >= max_length:
        raise UsageError(f"the chunks layout needs max_length >= 2 and 1 <= stride < max_length "
                         f"(got max_length={max_length}, stride={stride})")
    if n_tokens < max_length:
        raise UsageError(f"the chunks layout needs at least max_length={max_length} tokens (got {n_tokens})")
    return [Window(b, b + max_length, stride) for b in range(0, n_tokens - max_length + 1, max_length)]


LAYOUTS = ("sliding", "chunks")


def layout_windows(n_tokens: int, max_length: int, stride: int, layout: str = "sliding") -> list[Window]:
    if layout == "sliding":
        return windows(n_tokens, max_length, stride)
    if layout == "chunks":
        return chunk_windows(n_tokens, max_length, stride)
    raise UsageError(f"perplexity layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")


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
             device: str = "cpu", selected: list[int] | None = None, progress: str | None = None,
             layout: str = "sliding") -> dict:
    """Perplexity of `token_ids`; `selected` evaluates only those window indices (a shard)."""
    import torch
    from tqdm.auto import tqdm

    all_windows = layout_windows(len(token_ids), max_length, stride, layout)
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


def result_record(base: dict, compressed: dict | None, *, method: str, protocol: str, max_length: int,
                  stride: int, dtype: str, threshold: float, metrics: dict | None = None,
                  extra: dict | None = None) -> dict:
    """The ppl/{method}.json fields (DESIGN.md), plus latency and paired per-window differences."""
    compressed = compressed or base
    metrics = metrics or {}
    delta = compressed["perplexity"] - base["perplexity"]
    windows_ = [{"index": w["index"], "baseline_nll_sum": b["nll_sum"], "nll_sum": w["nll_sum"],
                 "n_scored": w["n_scored"]} for b, w in zip(base["windows"], compressed["windows"])]
    record = {
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
        "quality_level": metrics.get("quality_level", "EXCELLENT"),
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
    }
    if "scored_seconds" in compressed and "scored_seconds" in base:
        c, b = compressed["scored_seconds"], base["scored_seconds"]
        record.update({
            "scored_forward_seconds": c,
            "baseline_scored_forward_seconds": b,
            "latency_ratio": c / b if b else None,
            "scored_tokens_per_second": compressed["n_scored"] / c if c else None,
            "baseline_scored_tokens_per_second": base["n_scored"] / b if b else None,
        })
    record["paired"] = paired_differences(windows_)
    record.update(extra or {})
    record["windows"] = windows_
    return record


def protocol_record(run: dict, name: str | None, *, method: str, max_length: int, stride: int, dtype: str,
                    threshold: float) -> dict:
    """The record of one method (None: the baseline against itself) from `protocols.evaluate_methods`."""
    base = run["baseline"]
    compressed = run["methods"][name] if name is not None else base
    return result_record(base, compressed, method=method, protocol=run["protocol"], max_length=max_length,
                         stride=stride, dtype=dtype, threshold=threshold, metrics=compressed.get("metrics"),
                         extra={"layout": run["layout"], "n_windows": len(compressed["windows"])})


def code_modules(method: str, spec: dict | None) -> list[str]:
    """The kvcore modules a method's perplexity job runs (for the workflow's code inputs), found
    without importing torch: the protocols, the method's family and, for eviction, its scorer
    (kvcore.compress and kvcore.eviction load those lazily, so imports alone miss them)."""
    from kvcore.compress.presets import preset_spec

    if spec is None or "family" not in spec:
        spec = {**preset_spec(method), **(spec or {})}
    family = spec.get("family", "none")
    modules = ["kvcore.perplexity", "kvcore.protocols", "kvcore.model",
               f"kvcore.compress.{'identity' if family == 'none' else family}"]
    if family == "evict":
        from kvcore.eviction import SCORERS

        if spec.get("scorer") not in SCORERS:
            raise UsageError(f"method {method!r}: scorer must be one of {', '.join(SCORERS)} "
                             f"(got {spec.get('scorer')!r})")
        modules.append(f"kvcore.eviction.{spec['scorer']}")
    return modules


# --------------------------------------------------------------------------- shards
# A job evaluates a contiguous block of windows (`evaluate_shard`) and keeps every window's
# NLL sum, latency and compression-error sums; `merge_shards` pools them in window order.
# One job is the one-shard case of the same code, so N shards give exactly its numbers.

SHARD_FORMAT = "kvcore-perplexity-shard/1"
ERROR_SUMS = ("n", "sq_err", "sq_ref", "max_err", "cos_sum", "vectors", "nonfinite")  # kvcore.compress.metrics.ErrorStats


def shard_windows(n_windows: int, shard: int, shards: int) -> range:
    """Shard `shard` of `shards`: the contiguous block of window indices it evaluates."""
    if shards < 1 or not 0 <= shard < shards:
        raise UsageError(f"perplexity shard must be in 0..shards-1 with shards >= 1 (got shard {shard} of {shards})")
    return range(shard * n_windows // shards, (shard + 1) * n_windows // shards)


def metric_part(index: int, errors, nbytes: int, fp16_nbytes: int) -> dict:
    """One window's compression-error sums (an ErrorStats) and stored bytes, JSON-ready."""
    return {"index": index, **{k: getattr(errors, k) for k in ERROR_SUMS}, "nbytes": nbytes,
            "fp16_nbytes": fp16_nbytes}


def pooled_metrics(parts: list[dict]) -> dict:
    """Compression metrics of per-window sums, added up in window order (one job or merged shards)."""
    from kvcore.compress.metrics import ErrorStats, quality_level

    errors, nbytes, fp16_nbytes = ErrorStats(), 0, 0
    for part in sorted(parts, key=lambda p: p["index"]):
        for key in ERROR_SUMS:
            value = part[key]
            setattr(errors, key, max(errors.max_err, value) if key == "max_err" else getattr(errors, key) + value)
        nbytes += part["nbytes"]
        fp16_nbytes += part["fp16_nbytes"]
    err = errors.result()
    return {
        "bits_per_element": 8 * 2 * nbytes / fp16_nbytes if fp16_nbytes else None,
        "compression_ratio": fp16_nbytes / nbytes if nbytes else 1.0,
        "rmse": err["rmse"], "snr_db": err["snr_db"], "cosine_similarity": err["cosine_similarity"],
        "max_error": err.get("max_error"),
        "quality_level": quality_level(err["snr_db"], err["cosine_similarity"]),
    }


def _check_protocols(method: str, spec: dict | None, protocols: list[str] | None):
    from kvcore.compress import parse_method
    from kvcore.protocols import FAMILY_PROTOCOLS

    m = parse_method(method, spec)
    allowed = FAMILY_PROTOCOLS[m.family]
    protocols = list(protocols or allowed)
    bad = [p for p in protocols if p not in allowed]
    if bad:
        raise UsageError(f"method {method!r}: family {m.family} has no {bad[0]} protocol (valid: {', '.join(allowed)})")
    return m, protocols


def evaluate_shard(model_dir, text_or_ids, method: str, spec: dict | None, settings: dict,
                   options: dict | None = None, protocols: list[str] | None = None, loaded=None,
                   shard: int = 0, shards: int = 1) -> dict:
    """Per-window results of one method under its protocols over shard `shard` of `shards`."""
    from pathlib import Path

    from kvcore.model import load_model
    from kvcore.protocols import evaluate_methods

    m, protocols = _check_protocols(method, spec, protocols)
    if loaded is None:  # (model, tokenizer, device) from load_model, to reuse a loaded model
        loaded = load_model(Path(model_dir), settings.get("device", "auto"), settings.get("dtype", "float32"))
    model, tokenizer, device = loaded
    ids = (eval_token_ids(tokenizer, text_or_ids, settings.get("max_tokens")) if isinstance(text_or_ids, str)
           else list(text_or_ids))
    layout = settings.get("layout", "sliding")
    n_windows = len(layout_windows(len(ids), settings["max_length"], settings["stride"], layout))
    selected = list(shard_windows(n_windows, shard, shards))
    methods = {} if m.family == "none" else {method: m}
    runs = {}
    for protocol in protocols:
        out = {"protocol": protocol, "layout": layout, "baseline": {"windows": []},
               "methods": {name: {"windows": [], "metric_parts": []} for name in methods}}
        if selected:  # more shards than windows leaves some empty
            run = evaluate_methods(model, ids, methods, protocol=protocol, max_length=settings["max_length"],
                                   stride=settings["stride"], layout=layout, tokenizer=tokenizer, device=device,
                                   selected=selected, options=options, progress=f"{method} {protocol}")
            out["baseline"]["windows"] = run["baseline"]["windows"]
            for name in methods:
                out["methods"][name] = {"windows": run["methods"][name]["windows"],
                                        "metric_parts": run["methods"][name].get("metric_parts", [])}
        runs[protocol] = out
    return {"format": SHARD_FORMAT, "method": method, "spec": m.spec, "family": m.family, "shard": shard,
            "shards": shards, "n_windows_total": n_windows, "max_length": settings["max_length"],
            "stride": settings["stride"], "threshold": settings.get("threshold", 0.5),
            "dtype": str(model.dtype).replace("torch.", ""), "protocols": runs}


def _pooled(windows: list[dict], n_windows_total: int, parts: list[dict] | None = None) -> dict:
    """A protocols.evaluate_methods summary rebuilt from per-window results; latency is the
    sum of the windows' seconds (so a merged run reports the time its shards spent scoring)."""
    windows = sorted(windows, key=lambda w: w["index"])
    out = summarize(windows, sum(w["seconds"] for w in windows))
    out["scored_seconds"] = sum(w["scored_seconds"] for w in windows)
    out["n_windows_total"] = n_windows_total
    if parts is not None:
        out["metrics"] = pooled_metrics(parts)
    return out


SHARD_KEYS = ("format", "method", "spec", "family", "shards", "n_windows_total", "max_length", "stride",
              "threshold", "dtype")


def merge_shards(shards: list[dict]) -> dict:
    """The ppl/{method}.json record of a method from all of its shards (any order)."""
    if not shards:
        raise KvcoreError("no perplexity shards to merge")
    first = shards[0]
    for shard in shards:
        for key in SHARD_KEYS:
            if shard.get(key) != first.get(key):
                raise KvcoreError(f"perplexity shards of {first.get('method')!r} disagree on {key} "
                                  f"({shard.get(key)!r} vs {first.get(key)!r}); rerun the perplexity_shard jobs")
    ids = sorted(s["shard"] for s in shards)
    if ids != list(range(first["shards"])):
        raise KvcoreError(f"perplexity shards of {first['method']!r}: expected shards 0..{first['shards'] - 1}, "
                          f"got {ids}")
    method, family, n_total = first["method"], first["family"], first["n_windows_total"]
    settings = {"max_length": first["max_length"], "stride": first["stride"], "dtype": first["dtype"],
                "threshold": first["threshold"]}
    name = None if family == "none" else method
    records = {}
    for protocol, head in first["protocols"].items():
        parts = [s["protocols"][protocol] for s in shards]
        base = [w for p in parts for w in p["baseline"]["windows"]]
        if sorted(w["index"] for w in base) != list(range(n_total)):
            raise KvcoreError(f"perplexity shards of {method!r} ({protocol}) do not cover windows 0..{n_total - 1} "
                              f"exactly once")
        run = {"protocol": protocol, "layout": head["layout"], "baseline": _pooled(base, n_total), "methods": {}}
        for m in head["methods"]:
            run["methods"][m] = _pooled([w for p in parts for w in p["methods"][m]["windows"]], n_total,
                                        [x for p in parts for x in p["methods"][m]["metric_parts"]])
        records[protocol] = protocol_record(run, name, method=method, **settings)
        if family == "none":
            records[protocol]["bits_per_element"] = 16.0  # counted as a float16 cache, like every method
    top = dict(next(iter(records.values())))
    top["spec"] = first["spec"]
    top["protocols"] = records
    return top


def read_shard(path) -> dict:
    import json
    from pathlib import Path

    try:
        shard = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise KvcoreError(f"{path}: not a readable perplexity shard ({error}); rerun its perplexity_shard job") \
            from None
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        raise KvcoreError(f"{path}: not a perplexity shard (format {SHARD_FORMAT} expected)")
    return shard


# --------------------------------------------------------------------------- workflow jobs


def _job_inputs(text_parquet, settings: dict, options: dict | None):
    from kvcore.sources.datasets import joined_text

    options = options if options is not None else settings.get("options")  # perplexity.options, if any
    return joined_text(text_parquet), options


def run_perplexity(model_dir, text_parquet, method: str, spec: dict, settings: dict, out_path,
                   options: dict | None = None) -> dict:
    """Evaluate one method on a dataset and write ppl/{method}.json (the workflow's job).

    Every protocol that makes sense for the method's family runs (kvcore.protocols
    FAMILY_PROTOCOLS); the first is the primary: its record is the file's top level, and
    `protocols` holds each protocol's full record.
    """
    from kvcore.atomic import write_json

    text, options = _job_inputs(text_parquet, settings, options)
    record = validate_method(model_dir, text, method, spec, settings, options=options)
    write_json(out_path, record)
    return record


def run_perplexity_shard(model_dir, text_parquet, method: str, spec: dict, settings: dict, shard: int,
                         shards: int, out_path, options: dict | None = None) -> dict:
    """Evaluate shard `shard` of `shards` of one method and write ppl/shards/{method}-{shard}.json."""
    from kvcore.atomic import write_json

    text, options = _job_inputs(text_parquet, settings, options)
    result = evaluate_shard(model_dir, text, method, spec, settings, options=options, shard=shard, shards=shards)
    write_json(out_path, result)
    return result


def merge_shard_files(paths: list, out_path) -> dict:
    """Merge a method's shard files into ppl/{method}.json (the same record as one job's)."""
    from kvcore.atomic import write_json

    record = merge_shards([read_shard(p) for p in paths])
    write_json(out_path, record)
    return record


def validate_method(model_dir, text_or_ids, method: str, spec: dict | None, settings: dict,
                    options: dict | None = None, protocols: list[str] | None = None, loaded=None) -> dict:
    """Baseline and compressed perplexity of one method under its protocols: the ppl record."""
    return merge_shards([evaluate_shard(model_dir, text_or_ids, method, spec, settings, options=options,
                                        protocols=protocols, loaded=loaded)])
