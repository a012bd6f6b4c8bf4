"""Perplexity under a compressed KV cache: the `fake-quant` and `prefill-compress` protocols.

Both reuse the sliding windows of `kvcore.perplexity` and the compression methods of
`kvcore.compress` (one implementation: quantization is always `method.fake`, eviction is
always `method.select` over a scorer's scores, pruning is `method.kept_heads`). Each
evaluation runs the uncompressed baseline through the same code path in the same job, so
identity compression reproduces its baseline bit for bit, and latency is compared on
the same device.

fake-quant
    One forward per window with a cache whose `update()` replaces every K/V written
    into it by `method.fake(...)` before attention reads it, so every query (scored or
    not) sees compressed keys and values, its own included (KVQuant's measurement).
    The baseline is the same forward with a plain cache, equal to the HF guide's plain
    forward. Per-channel groups span the window's tokens from its first; sink/recent
    windows of a quant method are the window's first/last tokens. Latency here is the
    simulated forward (quantize + dequantize on every write), not a deployable speed.

prefill-compress
    Per window: the window's context (its tokens before the scored targets) is
    prefilled minus its last token; that cache is compressed (quantized, sparsified,
    evicted or pruned); then [last context token, targets[:-1]] are fed against it with
    their true position ids, so every scored prediction reads the compressed context
    while the targets' own entries stay exact (how kvpress and transformers'
    QuantizedCache measure). Evicted tokens are physically removed from the cache
    (uniform budget: every head keeps k tokens) or, where heads keep different counts
    (global budget) or single heads are pruned, padded and masked out of attention;
    layers pruned entirely hold no context at all. Keys keep the RoPE of their original
    positions.

    The first window of the `sliding` layout has no earlier context: its first
    max_length - stride tokens are the context (scored from the uncompressed prefill,
    as nothing precedes them to compress) and the rest are the targets. With identity
    compression the result equals the plain HF-guide evaluation to float tolerance.

Window layouts (`layout`):
    sliding   the HF guide's windows (DESIGN.md): targets tile the text.
    chunks    disjoint windows of max_length tokens, each scoring its last `stride`
              against the max_length - stride before it (kvpress's protocol; the
              issue's comparison: 8192 tokens, 1024/512 -> 8 windows).

Attention for the eviction scorers is computed here from Q and K inside the attention
call (our own `kvcore` attention function, registered with transformers), in chunks of
queries (at most `attention_floats` floats at a time), never as a stored attention map.
The same function applies per-head masks and the bottom-right causal mask that a cache
of evicted tokens needs. Batch size is 1 (one window at a time).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvcore.errors import KvcoreError, UsageError

PROTOCOLS = ("fake-quant", "prefill-compress")
LAYOUTS = ("sliding", "chunks")
ATTENTION_NAME = "kvcore"
FLOAT16_BYTES = 2

# family -> protocols that make sense for it, the first is the primary one
FAMILY_PROTOCOLS = {
    "none": ("fake-quant", "prefill-compress"),
    "quant": ("fake-quant", "prefill-compress"),
    "sparsify": ("fake-quant", "prefill-compress"),
    "evict": ("prefill-compress",),
    "prune": ("prefill-compress",),
}

DEFAULT_OPTIONS = {
    "pre_rope": False,  # quantize keys before RoPE (undone and redone around method.fake): true, or method names
    "seed": 0,  # the random scorer's seed
    "scorers": {},  # scorer name -> options, e.g. {"snapkv": {"window": 64}}
    "attention_floats": 1 << 24,  # scorer attention computed in chunks of at most this many floats
    # budget `global`: one threshold per layer ("layer", as kvcore.compress documents it) or one
    # across every layer and head ("model", KVzip's and kvpress's default); both via select_keep
    "global_scope": "layer",
}
GLOBAL_SCOPES = ("layer", "model")


def protocols_for(family: str) -> tuple[str, ...]:
    return FAMILY_PROTOCOLS[family]


def check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise UsageError(f"unknown perplexity option {unknown[0]!r} (valid: {', '.join(DEFAULT_OPTIONS)})")
    options = {**DEFAULT_OPTIONS, **options}
    if options["global_scope"] not in GLOBAL_SCOPES:
        raise UsageError(f"global_scope must be one of {', '.join(GLOBAL_SCOPES)} (got {options['global_scope']!r})")
    return options


# --------------------------------------------------------------------------- attention


@dataclass
class _PassState:
    """What the kvcore attention function does in the current forward pass."""

    hidden: dict = field(default_factory=dict)  # layer -> bool [n, n_kv, cached]: True = masked out
    observer: Any = None  # _Observer collecting attention statistics, or None


_CURRENT: _PassState | None = None


def _causal(q: int, k: int, device):
    """Bottom-right aligned causal mask [q, k]: query i sees keys j <= i + (k - q)."""
    import torch

    return torch.arange(k, device=device)[None, :] <= torch.arange(q, device=device)[:, None] + (k - q)


def kvcore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with a bottom-right causal mask (new tokens follow the cache, whatever it holds),
    per-head masks for evicted/pruned slots, and optional attention statistics."""
    import torch
    import torch.nn.functional as F

    state = _CURRENT or _PassState()
    n, n_heads, q, d = query.shape
    n_kv, k = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(d)
    layer = getattr(module, "layer_idx", None)
    allowed = _causal(q, k, query.device)
    if state.observer is not None:
        state.observer.observe(layer, query, key, scaling, allowed)
    hidden = state.hidden.get(layer)
    if hidden is not None:
        visible = torch.cat([~hidden, hidden.new_ones((n, n_kv, k - hidden.shape[-1]))], dim=-1)
        mask = allowed[None, None] & visible.repeat_interleave(group, dim=1)[:, :, None, :]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                             value.repeat_interleave(group, 1), attn_mask=mask, scale=scaling)
    elif q == k:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=group > 1)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                             enable_gqa=group > 1)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def kvcore_attention_pass(model, state: _PassState | None = None):
    """Run the model's attention through `kvcore_attention` with `state`, then restore."""
    global _CURRENT
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kvcore_attention)
    configs = {id(model.config): model.config}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    previous = _CURRENT
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_NAME
        _CURRENT = state or _PassState()
        yield
    finally:
        _CURRENT = previous
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]


class _Observer:
    """Attention received by the first `n_keys` cached tokens from chosen queries.

    `sets`: name -> index of the first observed query of the pass. Statistics per
    layer: sum and max over the observed queries per query head ([n, n_kv, group,
    n_keys]) and, per key, how many observed queries could see it; passes add up.
    """

    def __init__(self, sets: dict[str, int], n_keys: int, floats: int, stats: dict | None = None):
        self.sets, self.n_keys, self.floats = sets, n_keys, floats
        self.stats = stats if stats is not None else {}

    def observe(self, layer, query, key, scaling, allowed):
        import torch

        n, n_heads, q, d = query.shape
        n_kv, k = key.shape[1], key.shape[2]
        group = n_heads // n_kv
        kf = key.float()
        chunk = max(1, self.floats // (n_heads * k))
        for name, start in self.sets.items():
            total = self.stats.setdefault(name, {}).get(layer)
            s = torch.zeros((n, n_kv, group, self.n_keys), device=query.device)
            m = torch.zeros_like(s)
            for c0 in range(start, q, chunk):
                c1 = min(q, c0 + chunk)
                qc = query[:, :, c0:c1].float().reshape(n, n_kv, group, c1 - c0, d)
                logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf).mul_(scaling)
                logits.masked_fill_(~allowed[c0:c1], -math.inf)
                p = logits.softmax(dim=-1)[..., : self.n_keys]
                s += p.sum(dim=-2)
                m = torch.maximum(m, p.amax(dim=-2))
            count = allowed[start:, : self.n_keys].sum(dim=0)
            if total is not None:
                s, m, count = s + total[0], torch.maximum(m, total[1]), count + total[2]
            self.stats[name][layer] = (s, m, count)


# --------------------------------------------------------------------------- caches


def _cache_from(model, keys, values):
    """A DynamicCache holding the given per-layer tensors (no copy)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, k, v in zip(cache.layers, keys, values):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


class _Rope:
    """Undo and redo a LLaMA-style model's RoPE on cached keys (pre-RoPE quantization)."""

    def __init__(self, model):
        self.emb = getattr(getattr(model, "model", None), "rotary_emb", None)
        if self.emb is None:
            raise UsageError("pre_rope: the model has no rotary position embedding (e.g. GPT-2 uses learned positions)")

    def cos_sin(self, x, start: int):
        import torch

        pos = torch.arange(start, start + x.shape[2], device=x.device)[None]
        cos, sin = self.emb(x, pos)
        return cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)

    @staticmethod
    def _half(x):
        import torch

        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def quantize(self, method, keys, start: int):
        cos, sin = self.cos_sin(keys, start)
        raw = keys * cos - self._half(keys) * sin  # rotate back by -theta(pos)
        q = method.fake(raw, "key")
        return q * cos + self._half(q) * sin


class _Recorder:
    """Per method: error statistics and stored bytes of everything it compressed.

    Kept per window (`window` is set before each one) and pooled in window order by
    `kvcore.perplexity.pooled_metrics`, so shards of windows merge to the same numbers.
    """

    def __init__(self):
        self.parts: dict = {}  # window index -> (ErrorStats, nbytes, fp16_nbytes)
        self.window = None

    def add(self, method, x, y, kind, layer=None):
        import torch

        from kvcore.compress.metrics import ErrorStats

        errors, nbytes, fp16_nbytes = self.parts.get(self.window) or (ErrorStats(), 0, 0)
        errors.update(x, y)
        self.parts[self.window] = (errors, nbytes + method.packed_nbytes(tuple(x.shape), torch.float16, kind,
                                                                          layer=layer),
                                   fp16_nbytes + x.numel() * FLOAT16_BYTES)

    def raw(self) -> list[dict]:
        """The per-window sums, JSON-ready (what a perplexity shard file keeps)."""
        from kvcore.perplexity import metric_part

        return [metric_part(i, *part) for i, part in sorted(self.parts.items())]

    def metrics(self) -> dict:
        from kvcore.perplexity import pooled_metrics

        return pooled_metrics(self.raw())


def _fake(method, x, kind, layer, start, rope):
    if kind == "key" and rope is not None and method.family == "quant":
        return rope.quantize(method, x, start)
    if method.family == "prune":
        return method.fake(x, kind, layer=layer)
    return method.fake(x, kind)


def _fake_quant_cache(model, method, recorder, rope):
    """A DynamicCache whose every layer compresses what is written to it on update()."""
    from transformers.cache_utils import DynamicLayer

    class FakeQuantLayer(DynamicLayer):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def update(self, key_states, value_states, *args, **kwargs):
            start = self.get_seq_length()
            k = _fake(method, key_states, "key", self.index, start, rope)
            v = _fake(method, value_states, "value", self.index, start, None)
            recorder.add(method, key_states, k, "key", self.index)
            recorder.add(method, value_states, v, "value", self.index)
            return super().update(k, v)

    cache = _cache_from(model, [], [])
    cache.layers = [FakeQuantLayer(i) for i in range(len(cache.layers))]
    return cache


# --------------------------------------------------------------------------- windows


def split_window(length: int, target_len: int, max_length: int, stride: int) -> tuple[int, bool]:
    """(n_ctx, context_scored): the context length of a window under prefill-compress and
    whether its own tokens are scored (a first window, whose prefill is uncompressed).
    n_ctx < 2 means there is nothing to compress: the window is scored plainly."""
    if target_len < length:
        return length - target_len, False
    return min(max_length - stride, length - 1), True


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _target_nll(logits, targets) -> tuple[float, int]:
    """Sum of NLL of targets [1, T] under logits [1, T, V] (logits[t] predicts targets[t])."""
    import torch

    logp = torch.log_softmax(logits[0].float(), dim=-1)
    nll = -logp.gather(1, targets[0][:, None]).squeeze(1)
    return float(nll.double().sum()), int(targets.shape[1])


class _Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- evaluation


@dataclass
class _Run:
    """Per-window results of the baseline and every method, plus their recorders."""

    windows: dict = field(default_factory=dict)  # name -> list of window dicts
    recorders: dict = field(default_factory=dict)

    def add(self, name, window, nll, count, scored_seconds, extra_seconds=0.0):
        self.windows.setdefault(name, []).append({
            "index": window[0], "begin": window[1], "end": window[2], "nll_sum": nll, "n_scored": count,
            "scored_seconds": scored_seconds, "seconds": scored_seconds + extra_seconds})


def evaluate_methods(model, token_ids: list[int], methods: dict, *, protocol: str, max_length: int, stride: int,
                     layout: str = "sliding", tokenizer=None, device: str = "cpu",
                     selected: list[int] | None = None, options: dict | None = None,
                     progress: str | None = None) -> dict:
    """Baseline and compressed perplexity of `token_ids` for each method under `protocol`.

    `methods`: name -> a kvcore.compress Method (or an object with `build_cache(model,
    keys, values)` returning a transformers Cache, for peers such as QuantizedCache under
    prefill-compress). Windows are shared: one prefill per window serves every method.
    Returns {"baseline": summary, "methods": {name: summary}} where a summary is
    `perplexity.summarize(...)` plus scored_seconds and metrics.
    """
    import torch
    from tqdm.auto import tqdm

    from kvcore.perplexity import layout_windows, summarize

    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    options = check_options(options)
    for name, method in methods.items():
        family = getattr(method, "family", None)
        if family is not None and protocol not in FAMILY_PROTOCOLS[family]:
            raise UsageError(f"method {name!r}: family {family} has no {protocol} protocol "
                             f"(valid: {', '.join(FAMILY_PROTOCOLS[family])})")
    _check_shapes(model, methods)
    pre_rope = options["pre_rope"]
    rope = _Rope(model) if pre_rope else None
    ropes = {name: rope if pre_rope is True or (not isinstance(pre_rope, bool) and name in pre_rope) else None
             for name in methods}
    scorers = _scorers(methods, options)
    if any(s.queries == "repeat" for s in scorers.values()) and tokenizer is None:
        raise UsageError("the kvzip scorer needs the model's tokenizer (to build its reconstruction prompt)")

    all_windows = layout_windows(len(token_ids), max_length, stride, layout)
    chosen = range(len(all_windows)) if selected is None else selected
    ids = torch.tensor([token_ids], device=device)
    run = _Run(recorders={name: _Recorder() for name, m in methods.items() if not _external(m)})
    started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for i in tqdm(chosen, desc=progress, unit="window", disable=progress is None):
            w = all_windows[i]
            key = (i, w.begin, w.end)
            for recorder in run.recorders.values():
                recorder.window = i
            window_ids = ids[:, w.begin:w.end]
            if protocol == "fake-quant":
                _fake_quant_window(model, window_ids, w.target_len, key, methods, run, ropes, device)
            else:
                _prefill_compress_window(model, window_ids, w.target_len, key, methods, run, ropes, device,
                                         max_length, stride, scorers, tokenizer, options)
    seconds = time.perf_counter() - started

    def summary(name):
        per_window = run.windows[name]
        out = summarize(per_window, sum(w["seconds"] for w in per_window))
        out["scored_seconds"] = sum(w["scored_seconds"] for w in per_window)
        out["n_windows_total"] = len(all_windows)
        return out

    result = {"protocol": protocol, "layout": layout, "seconds": seconds, "baseline": summary(None), "methods": {}}
    for name in methods:
        result["methods"][name] = summary(name)
        if name in run.recorders:
            result["methods"][name]["metrics"] = run.recorders[name].metrics()
            result["methods"][name]["metric_parts"] = run.recorders[name].raw()
    return result


def _external(method) -> bool:
    """A peer that builds its own cache from the prefilled keys and values (prefill-compress)."""
    return hasattr(method, "build_cache")


def _check_shapes(model, methods):
    from kvcore.model import kv_shape

    shape = kv_shape(model.config)
    for method in methods.values():
        if getattr(method, "family", None) == "prune":
            method.check_layers(shape["num_layers"], shape["num_kv_heads"])
        elif getattr(method, "family", None) in ("quant", "sparsify"):
            method.check_shape((1, shape["num_kv_heads"], 1, shape["head_dim"]))


def _scorers(methods, options) -> dict:
    from kvcore.eviction import make_scorer

    out = {}
    for method in methods.values():
        if getattr(method, "family", None) == "evict" and method.scorer not in out:
            out[method.scorer] = make_scorer(method.scorer, **options["scorers"].get(method.scorer, {}))
    return out


def _fake_quant_window(model, window_ids, target_len, key, methods, run, ropes, device):
    from kvcore.perplexity import scored_nll

    labels = window_ids.clone()
    labels[:, :-target_len] = -100

    def forward(cache):
        with _Timer(device) as t:
            logits = model(input_ids=window_ids, past_key_values=cache, use_cache=True).logits
        return (*scored_nll(logits, labels), t.seconds)

    nll, count, seconds = forward(_cache_from(model, [], []))
    run.add(None, key, nll, count, seconds)
    for name, method in methods.items():
        if _external(method):
            raise UsageError(f"method {name!r}: external caches are measured under prefill-compress only")
        nll, count, seconds = forward(_fake_quant_cache(model, method, run.recorders[name], ropes[name]))
        run.add(name, key, nll, count, seconds)


def _prefill_compress_window(model, window_ids, target_len, key, methods, run, ropes, device, max_length, stride,
                             scorers, tokenizer, options):
    import torch

    from kvcore.perplexity import plain_window

    length = window_ids.shape[1]
    n_ctx, context_scored = split_window(length, target_len, max_length, stride)
    if n_ctx < 2:  # nothing before the targets to compress: every method scores the plain window
        with _Timer(device) as t:
            nll, count = plain_window(model, window_ids, target_len)
        for name in [None, *methods]:
            run.add(name, key, nll, count, t.seconds)
        return

    prefix = n_ctx - 1  # cached context tokens
    ctx, feed, targets = window_ids[:, :prefix], window_ids[:, prefix:length - 1], window_ids[:, n_ctx:]
    # a first window: the prefill's predictions of context tokens 1..n_ctx-1 are scored too
    pre = prefill_context(model, ctx, scorers, options, tokenizer, device=device,
                          context_targets=window_ids[:, 1:n_ctx] if context_scored else None)
    keys, values, stats = pre.keys, pre.values, pre.stats
    context_nll, context_count = pre.context_nll

    def score(cache_, hidden):
        with _Timer(device) as t, kvcore_attention_pass(model, _PassState(hidden=hidden)):
            logits = model(input_ids=feed, past_key_values=cache_, use_cache=True,
                           position_ids=torch.arange(prefix, prefix + feed.shape[1], device=feed.device)[None]).logits
        nll, count = _target_nll(logits, targets)
        return nll + context_nll, count + context_count, t.seconds

    nll, count, seconds = score(_cache_from(model, keys, values), {})
    run.add(None, key, nll, count, seconds, pre.seconds)
    scores_cache: dict = {}
    for name, method in methods.items():
        with _Timer(device) as t_compress:
            if not _external(method):
                ckeys, cvalues, hidden = _compress(method, keys, values, scorers, stats, scores_cache, key[0],
                                                   run.recorders[name], ropes[name], options)
                cache_ = _cache_from(model, ckeys, cvalues)
            else:
                cache_, hidden = method.build_cache(model, keys, values), {}
        nll, count, seconds = score(cache_, hidden)
        run.add(name, key, nll, count, seconds, t_compress.seconds)


@dataclass
class ContextPrefill:
    """A context prefilled once for every scorer (see `prefill_context`)."""

    keys: list  # per layer [1, n_kv, n, head_dim]: the prefill's own entries
    values: list
    stats: dict  # scorer query_key -> layer -> attention statistics (`_Observer`)
    context_nll: tuple  # (NLL sum, count) of `context_targets`, (0.0, 0) without them
    seconds: float  # the prefill forward alone (not the reconstruction passes)


def prefill_context(model, ids, scorers: dict, options: dict, tokenizer=None, *, device=None,
                    context_targets=None) -> ContextPrefill:
    """Prefill `ids` [1, n] at positions 0..n-1 into a fresh cache and run every scorer's
    pass over it: attention statistics of the `context`/`window` query sets during the
    prefill, then each `repeat` scorer's (kvzip's) reconstruction pass, whose own entries
    are dropped again. One prefill serves every scorer and method; shared by the
    prefill-compress protocol and `kvcore.tasks` so both compress identically.

    `context_targets` [1, n]: score them against the prefill's logits (logits[t] predicts
    context_targets[t]); the full logits are dropped before the passes run.
    """
    import torch

    n = ids.shape[1]
    stats: dict = {}
    sets = {s.query_key: s.query_start(n) for s in scorers.values() if s.queries in ("context", "window")}
    observer = _Observer(sets, n, options["attention_floats"], stats) if sets else None
    cache = _cache_from(model, [], [])
    with _Timer(device if device is not None else ids.device) as timer, \
            kvcore_attention_pass(model, _PassState(observer=observer)):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(n, device=ids.device)[None],
                    logits_to_keep=0 if context_targets is not None else 1)
    context_nll = _target_nll(out.logits, context_targets) if context_targets is not None else (0.0, 0)
    del out
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    for scorer in scorers.values():
        if scorer.queries == "repeat":
            _reconstruction_pass(model, cache, ids, scorer, tokenizer, stats, options, n)
            for layer, k, v in zip(cache.layers, keys, values):
                layer.keys, layer.values = k, v  # drop the pass's own entries
    return ContextPrefill(keys, values, stats, context_nll, timer.seconds)


def _reconstruction_pass(model, cache, ctx, scorer, tokenizer, stats, options, prefix):
    import torch

    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    room = None if limit is None else limit - prefix
    position = prefix
    for chunk in scorer.reconstruction_chunks(tokenizer, ctx, room):
        observer = _Observer({scorer.query_key: 0}, prefix, options["attention_floats"], stats)
        with kvcore_attention_pass(model, _PassState(observer=observer)):
            model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1,
                  position_ids=torch.arange(position, position + chunk.shape[1], device=chunk.device)[None])
        for layer in cache.layers:  # crop back to the context before the next chunk
            layer.keys, layer.values = layer.keys[:, :, :prefix], layer.values[:, :, :prefix]


def _compress(method, keys, values, scorers, stats, scores_cache, window_index, recorder, rope, options):
    """(keys, values, hidden) of the compressed context cache for one method."""
    import torch

    family = method.family
    if family == "none":
        for i, (k, v) in enumerate(zip(keys, values)):
            recorder.add(method, k, k, "key", i)
            recorder.add(method, v, v, "value", i)
        return keys, values, {}
    if family in ("quant", "sparsify"):
        out_k, out_v = [], []
        for i, (k, v) in enumerate(zip(keys, values)):
            k2, v2 = _fake(method, k, "key", i, 0, rope), _fake(method, v, "value", i, 0, None)
            recorder.add(method, k, k2, "key", i)
            recorder.add(method, v, v2, "value", i)
            out_k.append(k2)
            out_v.append(v2)
        return out_k, out_v, {}
    if family == "prune":
        out_k, out_v, hidden = [], [], {}
        for i, (k, v) in enumerate(zip(keys, values)):
            recorder.add(method, k, method.fake(k, "key", layer=i), "key", i)
            recorder.add(method, v, method.fake(v, "value", layer=i), "value", i)
            kept = method.kept_heads(i, k.shape[1])
            if not any(kept):  # the whole layer: its cache holds nothing
                out_k.append(k[:, :, :0])
                out_v.append(v[:, :, :0])
                continue
            out_k.append(k)
            out_v.append(v)
            if not all(kept):
                dropped = torch.tensor([not f for f in kept], device=k.device)
                hidden[i] = dropped[None, :, None].expand(k.shape[0], k.shape[1], k.shape[2]).clone()
        return out_k, out_v, hidden
    if family == "evict":
        scorer = scorers[method.scorer]
        if method.scorer not in scores_cache:
            scores_cache[method.scorer] = _layer_scores(scorer, keys, values, stats, window_index, options)
        layer_scores = scores_cache[method.scorer]
        if method.budget == "model" or (method.budget == "global" and options["global_scope"] == "model"):
            # one threshold across every layer and head: the layers' heads side by side
            keeps = method.select(torch.cat(layer_scores, dim=1)).split(keys[0].shape[1], dim=1)
        else:
            keeps = [method.select(s) for s in layer_scores]
        out_k, out_v, hidden = [], [], {}
        for i, (k, v, keep) in enumerate(zip(keys, values, keeps)):
            recorder.add(method, k, method.fake(k, "key", keep), "key", i)
            recorder.add(method, v, method.fake(v, "value", keep), "value", i)
            k2, v2, mask = gather_kept(k, v, keep)
            out_k.append(k2)
            out_v.append(v2)
            if mask is not None:
                hidden[i] = mask
        return out_k, out_v, hidden
    raise KvcoreError(f"method {method.name!r}: family {family} has no prefill-compress protocol")


def _layer_scores(scorer, keys, values, stats, window_index, options):
    import torch

    from kvcore.eviction.base import AttentionReceived, ScoreInputs

    out = []
    for i, (k, v) in enumerate(zip(keys, values)):
        attention = None
        if scorer.queries is not None:
            s, m, count = stats[scorer.query_key][i]
            attention = AttentionReceived(sum=s, max=m, count=count)
        generator = torch.Generator().manual_seed(options["seed"] * 1_000_003 + window_index * 1009 + i)
        out.append(scorer(ScoreInputs(layer=i, keys=k, values=v, attention=attention, generator=generator)))
    return out


def gather_kept(keys, values, keep):
    """Physically keep the tokens of `keep` [n, n_kv, seq] in position order.

    Returns (keys, values, hidden): when every head keeps the same count the cache just
    shrinks and hidden is None; otherwise each head is padded to the layer's largest
    count and hidden [n, n_kv, m] marks the padding (masked out of attention).
    """
    import torch

    counts = keep.sum(dim=-1)
    m = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :m]  # kept first, in order
    index = order[..., None].expand(*order.shape, keys.shape[-1])
    k2, v2 = keys.gather(2, index), values.gather(2, index)
    if bool((counts == m).all()):
        return k2, v2, None
    hidden = torch.arange(m, device=keys.device)[None, None, :] >= counts[..., None]
    return k2, v2, hidden


def context_keep(model, ids, method, *, tokenizer=None, options: dict | None = None, index: int = 0) -> list:
    """Per layer, the bool mask [1, n_kv, seq] of the tokens an evict `method` keeps of the
    context `ids` [1, seq], chosen as prefill-compress chooses a window's context:
    `prefill_context` (the scorer's attention statistics, kvzip's reconstruction pass), the
    scorer's scores, then `method.select` (across layers for budget `model` / global_scope `model`).
    `index` seeds the random scorer as a window index does. Used by the workflow's
    compress job to store an evicted cache (kvcore.compress.run)."""
    import torch

    options = check_options(options)
    scorers = _scorers({method.name: method}, options)
    scorer = scorers[method.scorer]
    if scorer.queries == "repeat" and tokenizer is None:
        raise UsageError("the kvzip scorer needs the model's tokenizer (to build its reconstruction prompt)")
    model.eval()
    with torch.inference_mode():
        pre = prefill_context(model, ids, scorers, options, tokenizer)  # the protocol's own prefill
        scores = _layer_scores(scorer, pre.keys, pre.values, pre.stats, index, options)
    if method.budget == "model" or (method.budget == "global" and options["global_scope"] == "model"):
        return list(method.select(torch.cat(scores, dim=1)).split(pre.keys[0].shape[1], dim=1))
    return [method.select(s) for s in scores]
