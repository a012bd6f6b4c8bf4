"""Perplexity under a compressed KV cache: the `fake-quant` and `prefill-compress` protocols.

Each evaluation runs the uncompressed baseline through the same code path in the same job,
so identity compression reproduces its baseline bit for bit and latency is compared on the
same device. One prefill per window serves every method.

fake-quant
    One forward per window with a cache whose `update()` replaces every K/V written into it
    by `method.fake(...)` before attention reads it, so every query (scored or not) sees
    compressed keys and values, its own included (KVQuant's measurement). Per-channel groups
    span the window's tokens from its first. Latency is the simulated forward.

prefill-compress
    Per window, as kvpress and transformers' QuantizedCache measure: prefill the whole
    context (the window's tokens before its targets), compress all of it through
    `context.compress_context`, score the first target from the prefill's last logits, then
    feed targets[:-1] at their true positions against the compressed cache. Keys keep the
    RoPE of their original positions. The first window of the `sliding` layout has no
    earlier context: its first max_length - stride tokens are the context (scored from the
    uncompressed prefill, as nothing precedes them) and the rest are the targets. With
    identity compression the result equals the plain HF-guide evaluation to float tolerance.

A method is a kvcore.compress Method, or a peer with `build_cache(model, keys, values,
recorder)` returning a transformers Cache (QuantizedCache in benchmarks/ppl_bench.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvcore.errors import UsageError
from kvcore.evaluation.attention import PassState, attention_pass
from kvcore.evaluation.batched import batches, fake_quant_baseline, prefill_compress_baseline, window_batch
from kvcore.evaluation.cache import Rope, cache_from, fake_quant_cache
from kvcore.evaluation.context import compress_context
from kvcore.evaluation.nll import plain_window, scored_nll, summarize, target_nll, token_ids_sha256
from kvcore.evaluation.options import check_options, check_protocol
from kvcore.evaluation.prefill import make_scorers, prefill_context
from kvcore.evaluation.records import Recorder
from kvcore.evaluation.timing import Timer
from kvcore.evaluation.windows import layout_windows, split_window


def evaluate(model, token_ids: list[int], max_length: int, stride: int, device: str = "cpu",
             selected: list[int] | None = None, progress: str | None = None, layout: str = "sliding") -> dict:
    """Plain perplexity of `token_ids` (the HF guide); `selected` evaluates only those windows."""
    import torch

    from kvcore.progress import each

    all_windows = layout_windows(len(token_ids), max_length, stride, layout)
    chosen = range(len(all_windows)) if selected is None else selected
    ids = torch.tensor([token_ids], device=device)
    per_window, started = [], time.perf_counter()
    for i in each(chosen, progress, "windows"):
        w = all_windows[i]
        nll_sum, count = plain_window(model, ids[:, w.begin:w.end], w.target_len)
        per_window.append({"index": i, "begin": w.begin, "end": w.end, "nll_sum": nll_sum, "n_scored": count})
    return summarize(per_window, time.perf_counter() - started) | {"n_windows_total": len(all_windows),
                                                                   "token_ids_sha256": token_ids_sha256(token_ids)}


@dataclass
class WindowResults:
    """Per-window results of the baseline (name None) and every method, plus their recorders."""

    windows: dict = field(default_factory=dict)  # name -> list of window dicts
    recorders: dict = field(default_factory=dict)

    def add(self, name, window, nll, count, scored_seconds, extra_seconds=0.0):
        self.windows.setdefault(name, []).append({
            "index": window[0], "begin": window[1], "end": window[2], "nll_sum": nll, "n_scored": count,
            "scored_seconds": scored_seconds, "seconds": scored_seconds + extra_seconds})


def is_peer(method) -> bool:
    """A peer that builds its own cache from the prefilled keys and values (prefill-compress)."""
    return hasattr(method, "build_cache")


def check_shapes(model, methods: dict) -> None:
    """Fail before any window runs when a method cannot compress this model's cache."""
    from kvcore.model import kv_shape

    shape = kv_shape(model.config)
    for method in methods.values():
        if hasattr(method, "check_layers"):
            method.check_layers(shape["num_layers"], shape["num_kv_heads"])
        elif hasattr(method, "check_shape"):
            method.check_shape((1, shape["num_kv_heads"], 1, shape["head_dim"]))


def method_ropes(model, methods: dict, pre_rope) -> dict:
    """name -> Rope for the quant and compose methods whose keys are quantized before RoPE (option
    pre_rope; a compose method's kept keys are quantized before RoPE, at their own positions)."""
    chosen = [n for n, m in methods.items() if getattr(m, "family", None) in ("quant", "compose")
              and (pre_rope is True or (not isinstance(pre_rope, bool) and n in pre_rope))]
    rope = Rope(model) if pre_rope else None
    return {n: rope if n in chosen else None for n in methods}


def evaluate_methods(model, token_ids: list[int], methods: dict, *, protocol: str, max_length: int, stride: int,
                     layout: str = "sliding", tokenizer=None, device: str = "cpu",
                     selected: list[int] | None = None, options: dict | None = None,
                     progress: str | None = None, windows: list | None = None, batch: int | None = None,
                     baseline: dict | None = None) -> dict:
    """Baseline and compressed perplexity of `token_ids` for each method under `protocol`.

    `windows` (windows.Window list) replaces the layout's, e.g. one window scoring a given
    continuation after its prompt (kvcore.evaluation.score). `batch`: windows per forward of a
    baseline run without methods (the `baseline` job; None: `batched.window_batch`, 1 on the CPU).
    `baseline`: window index -> (NLL sum, scored count) of this baseline computed before, one
    window per forward (the run's baseline job): those windows skip the baseline's own forward
    (its scored feed under prefill-compress) and take these numbers, with 0 seconds.

    Returns {"baseline": summary, "methods": {name: summary}, "token_ids_sha256", ...} where a
    summary is `nll.summarize(...)` plus `metrics` (records.pooled_metrics) and `metric_parts`.
    """
    import torch

    from kvcore.progress import each

    options = check_options(options)
    check_protocol("baseline", None, protocol)
    for name, method in methods.items():
        check_protocol(name, method, protocol)
    check_shapes(model, {n: m for n, m in methods.items() if not is_peer(m)})
    ropes = method_ropes(model, methods, options["pre_rope"])
    scorers = make_scorers(methods.values(), options, tokenizer)

    all_windows = layout_windows(len(token_ids), max_length, stride, layout) if windows is None else windows
    chosen = range(len(all_windows)) if selected is None else selected
    ids = torch.tensor([token_ids], device=device)
    run = WindowResults(recorders={name: Recorder() for name in methods})
    started = time.perf_counter()
    model.eval()
    batch = window_batch(model, device, max_length) if batch is None else batch
    with torch.inference_mode():
        groups = baseline_batches(chosen, all_windows, batch, protocol, methods, max_length, stride)
        unit = "windows" if all(len(group) == 1 for group in groups) else "window batches"
        for group in each(groups, progress, unit):
            if len(group) > 1:  # the baseline of several windows in one forward (kvcore.evaluation.batched)
                w = all_windows[group[0]]
                if protocol == "fake-quant":
                    fake_quant_baseline(model, ids, all_windows, group, run, device)
                else:
                    n_ctx, _ = split_window(w.end - w.begin, w.target_len, max_length, stride)
                    prefill_compress_baseline(model, ids, all_windows, group, run, device, n_ctx, options)
                continue
            i = group[0]
            w = all_windows[i]
            for recorder in run.recorders.values():
                recorder.window = i
            window_ids = ids[:, w.begin:w.end]
            known = None if baseline is None else baseline[i]
            if protocol == "fake-quant":
                fake_quant_window(model, window_ids, w, i, methods, run, ropes, device, known)
            else:
                prefill_compress_window(model, window_ids, w, i, methods, run, ropes, device, max_length, stride,
                                        scorers, tokenizer, options, known)
    result = {"protocol": protocol, "layout": layout, "seconds": time.perf_counter() - started,
              "token_ids_sha256": token_ids_sha256(token_ids), "baseline": summarize(run.windows[None]),
              "methods": {}}
    for name in methods:
        parts = run.recorders[name].raw()
        result["methods"][name] = summarize(run.windows[name]) | {"metrics": run.recorders[name].metrics(),
                                                                  "metric_parts": parts}
    for summary in (result["baseline"], *result["methods"].values()):
        summary["n_windows_total"] = len(all_windows)
    return result


def baseline_batches(chosen, all_windows, batch: int, protocol: str, methods: dict, max_length: int,
                     stride: int) -> list[list[int]]:
    """The windows in the order they run, grouped where the baseline runs several per forward:
    only without methods (a method's windows run one at a time, and its baseline beside it, so
    the two keep one code path, identity stays bit-identical and latencies compare), windows of
    one length, and under prefill-compress never a first window that scores its own context."""
    if batch <= 1 or methods:
        return [[i] for i in chosen]

    def same(w):
        length = w.end - w.begin
        n_ctx, context_scored = split_window(length, w.target_len, max_length, stride)
        if protocol != "fake-quant" and (n_ctx < 1 or context_scored):
            return ("alone", w.begin)
        return (length, w.target_len if protocol == "fake-quant" else n_ctx)

    return batches(chosen, all_windows, batch, same)


def fake_quant_window(model, window_ids, w, index, methods, run, ropes, device, known=None):
    """One window under fake-quant; `known`: the baseline's (NLL sum, count), computed before."""
    key = (index, w.begin, w.end)
    labels = window_ids.clone()
    labels[:, :-w.target_len] = -100

    def forward(cache):
        with Timer(device) as t:
            logits = model(input_ids=window_ids, past_key_values=cache, use_cache=True).logits
        return (*scored_nll(logits, labels), t.seconds)

    run.add(None, key, *(forward(cache_from(model, [], [])) if known is None else (*known, 0.0)))
    for name, method in methods.items():
        if is_peer(method):
            raise UsageError(f"method {name!r}: external caches are measured under prefill-compress only")
        run.add(name, key, *forward(fake_quant_cache(model, method, run.recorders[name], ropes[name])))


def prefill_compress_window(model, window_ids, w, index, methods, run, ropes, device, max_length, stride,
                            scorers, tokenizer, options, known=None):
    """One window under prefill-compress; `known`: the baseline's (NLL sum, count), computed before."""
    import torch

    key = (index, w.begin, w.end)
    length = window_ids.shape[1]
    n_ctx, context_scored = split_window(length, w.target_len, max_length, stride)
    if n_ctx < 1:  # nothing before the targets to compress: every method scores the plain window
        with Timer(device) as t:
            nll, count = plain_window(model, window_ids, w.target_len)
        for name in [None, *methods]:
            run.add(name, key, nll, count, t.seconds)
        return

    ctx, targets = window_ids[:, :n_ctx], window_ids[:, n_ctx:]
    # the whole context is prefilled (and later compressed); a first window's context tokens
    # 1..n_ctx-1 are scored from that prefill, as nothing precedes them
    pre = prefill_context(model, ctx, scorers, options, tokenizer, device=device,
                          context_targets=window_ids[:, 1:n_ctx] if context_scored else None)
    # the first target is predicted by the prefill's last logits: the same for every method
    first_nll, first_count = target_nll(pre.last_logits[:, None], targets[:, :1])
    feed = targets[:, :-1]
    positions = torch.arange(n_ctx, n_ctx + feed.shape[1], device=feed.device)[None]

    def score(cache, hidden):
        nll, count = pre.context_nll[0] + first_nll, pre.context_nll[1] + first_count
        with Timer(device) as t:
            if feed.shape[1]:
                with attention_pass(model, PassState(hidden=hidden)):
                    logits = model(input_ids=feed, past_key_values=cache, use_cache=True,
                                   position_ids=positions).logits
                more, n = target_nll(logits, targets[:, 1:])
                nll, count = nll + more, count + n
        return nll, count, t.seconds

    if known is None:
        run.add(None, key, *score(cache_from(model, pre.keys, pre.values), {}), pre.seconds)
    else:
        run.add(None, key, *known, 0.0)
    scores: dict = {}
    for name, method in methods.items():
        with Timer(device) as t_compress:
            if is_peer(method):
                cache, hidden = method.build_cache(model, pre.keys, pre.values, run.recorders[name]), {}
            else:
                compressed = compress_context(method, pre, scorers, options, index=index, scores=scores,
                                              recorder=run.recorders[name], rope=ropes[name])
                cache, hidden = compressed.cache(model), compressed.hidden
        nll, count, seconds = score(cache, hidden)
        run.add(name, key, nll, count, seconds, t_compress.seconds)
