"""What an evaluation records: per-window compression errors, sizes and kept tokens, and the
ppl/{method}.json record (DESIGN.md "Perplexity results").

Sizes follow the one bits-per-element convention of `kvcore.compress.bits`. Everything is
kept per window and pooled in window order, so shards of windows merge to the same numbers.
"""

from __future__ import annotations

from kvcore.compress.bits import BASIS, bits_per_element, counted_nbytes
from kvcore.evaluation.nll import paired_differences, summarize

ERROR_SUMS = ("n", "sq_err", "sq_ref", "max_err", "cos_sum", "vectors", "nonfinite")  # compress.metrics.ErrorStats


class Recorder:
    """Per method: error statistics, counted bytes and kept tokens of everything it compressed,
    per window (`window` is set before each one)."""

    def __init__(self):
        self.parts: dict = {}  # window index -> dict of sums
        self.window = None

    def add(self, method, x, y, kind: str, layer: int | None = None, keep=None) -> None:
        """`x` compressed by `method` into `y` (its dense reconstruction); `keep` the eviction mask."""
        from kvcore.compress.metrics import ErrorStats

        part = self.parts.setdefault(self.window, {"errors": ErrorStats(), "nbytes": 0, "fp16_nbytes": 0,
                                                    "kept": {}, "slots": {}})
        part["errors"].update(x, y)
        part["nbytes"] += counted_nbytes(method, x.shape, kind, layer=layer, keep=keep)
        part["fp16_nbytes"] += counted_nbytes(None, x.shape, kind)
        if keep is not None and kind == "key":
            part["kept"][layer] = part["kept"].get(layer, 0) + int(keep.sum())
            part["slots"][layer] = part["slots"].get(layer, 0) + keep.numel()

    def raw(self) -> list[dict]:
        """The per-window sums, JSON-ready (what a perplexity shard file keeps)."""
        return [metric_part(i, p) for i, p in sorted(self.parts.items())]

    def metrics(self) -> dict:
        return pooled_metrics(self.raw())


def metric_part(index: int, part: dict) -> dict:
    """One window's compression-error sums, counted bytes and (eviction) kept tokens per layer."""
    out = {"index": index, **{k: getattr(part["errors"], k) for k in ERROR_SUMS}, "nbytes": part["nbytes"],
           "fp16_nbytes": part["fp16_nbytes"]}
    if part["kept"]:
        layers = sorted(part["kept"])
        out["kept"] = [part["kept"][i] for i in layers]
        out["slots"] = [part["slots"][i] for i in layers]
    return out


def pooled_metrics(parts: list[dict]) -> dict:
    """Compression metrics of per-window sums, added up in window order (one job or merged shards)."""
    from kvcore.compress.metrics import ErrorStats, quality_level

    errors, nbytes, fp16_nbytes, kept, slots = ErrorStats(), 0, 0, None, None
    for part in sorted(parts, key=lambda p: p["index"]):
        for key in ERROR_SUMS:
            value = part[key]
            setattr(errors, key, max(errors.max_err, value) if key == "max_err" else getattr(errors, key) + value)
        nbytes += part["nbytes"]
        fp16_nbytes += part["fp16_nbytes"]
        if "kept" in part:
            kept = [a + b for a, b in zip(kept, part["kept"])] if kept else list(part["kept"])
            slots = [a + b for a, b in zip(slots, part["slots"])] if slots else list(part["slots"])
    err = errors.result()
    out = {
        "bits_per_element": bits_per_element(nbytes, fp16_nbytes // 2),
        "bits_basis": BASIS,
        "compression_ratio": fp16_nbytes / nbytes if nbytes else 1.0,
        "rmse": err["rmse"], "snr_db": err["snr_db"], "cosine_similarity": err["cosine_similarity"],
        "max_error": err.get("max_error"),
        "quality_level": quality_level(err["snr_db"], err["cosine_similarity"]),
    }
    if kept:
        out["kept_fraction"] = sum(kept) / sum(slots)
        out["kept_by_layer"] = [k / s for k, s in zip(kept, slots)]
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
        "bits_basis": BASIS,
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
    for key in ("kept_fraction", "kept_by_layer"):
        if key in metrics:
            record[key] = metrics[key]
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


def run_from_windows(protocol: str, layout: str, token_ids_sha256: str, baseline: list[dict],
                     methods: dict[str, tuple[list[dict], list[dict]]], baseline_timing: dict | None = None) -> dict:
    """A protocol's run (what `protocol_record` reads) from its per-window numbers alone: the
    baseline's windows and, per method, (windows, metric parts). One job's windows, merged shards
    and a resumed benchmark give the same run. `baseline_timing`: the seconds of the job whose
    baseline windows these are (a method's job that took them from the baseline's record)."""
    base = summarize(baseline)
    if baseline_timing:
        base = summarize(baseline, baseline_timing["seconds"]) | {"scored_seconds": baseline_timing["scored_seconds"]}
    return {"protocol": protocol, "layout": layout, "token_ids_sha256": token_ids_sha256, "baseline": base,
            "methods": {name: summarize(windows) | {"metrics": pooled_metrics(parts)}
                        for name, (windows, parts) in methods.items()}}


def protocol_record(run: dict, name: str | None, *, method: str, max_length: int, stride: int, dtype: str,
                    threshold: float) -> dict:
    """The record of one method (None: the baseline against itself) from `protocols.evaluate_methods`."""
    base = run["baseline"]
    compressed = run["methods"][name] if name is not None else base
    extra = {"layout": run["layout"], "n_windows": len(compressed["windows"])}
    if "token_ids_sha256" in run:
        extra["token_ids_sha256"] = run["token_ids_sha256"]
    return result_record(base, compressed, method=method, protocol=run["protocol"], max_length=max_length,
                         stride=stride, dtype=dtype, threshold=threshold, metrics=compressed.get("metrics"),
                         extra=extra)
