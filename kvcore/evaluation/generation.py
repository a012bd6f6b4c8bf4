"""A compression method inside your own `model(...)` / `model.generate()` calls.

Two entry points, both the evaluation's own objects (no second copy):

- `compressed_cache(model, method)`: a transformers DynamicCache whose layers store
  `method.fake` of every K/V written (`cache.CompressingLayer`, the cache the fake-quant
  protocol scores with). Pass it as `past_key_values=`. Families whose primary protocol is
  fake-quant only (quant, sparsify, none): eviction and pruning need the whole prefill.
- `with apply(model, method):` every forward of `model` runs with the method, as the
  method's primary protocol measures it: write-time families get compressing layers in the
  cache of the first forward; evict / prune families compress the prompt once, at prefill,
  through the one context-compression path (`prefill.prefill_context` +
  `context.compress_context`, as perplexity's prefill-compress and the tasks do), then
  decode against the smaller cache with the tokens' true positions. The wrapper is removed
  in `finally` (kvpress's `with press(model)`).

Under `apply`, an evicting prefill returns the logits of the prompt's last position only
(what `generate()` reads), works on one unpadded sequence (batch 1), and later forwards of
that cache run through kvcore's attention (per-head masks where heads keep different counts).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

from kvcore.errors import UsageError
from kvcore.evaluation.attention import PassState, attention_pass
from kvcore.evaluation.cache import Rope, cache_from, compress_layers, fake_quant_cache
from kvcore.evaluation.context import compress_context
from kvcore.evaluation.options import FAMILY_PROTOCOLS, check_options
from kvcore.evaluation.prefill import make_scorers, prefill_context
from kvcore.evaluation.protocols import check_shapes


def as_method(method, spec: dict | None = None):
    """A kvcore.compress Method from a Method, a preset name, or a name plus spec."""
    from kvcore.compress import parse_method

    if isinstance(method, str):
        return parse_method(method, spec)
    if spec is not None or not hasattr(method, "family"):
        raise UsageError(f"method must be a preset name, a name and a spec, or a kvcore.compress Method "
                         f"(got {type(method).__name__})")
    return method


def writes_compressed(method) -> bool:
    """True when the method's primary protocol compresses every write (fake-quant)."""
    return FAMILY_PROTOCOLS[method.family][0] == "fake-quant"


def _rope(model, pre_rope: bool):
    return Rope(model) if pre_rope else None


def compressed_cache(model, method, spec: dict | None = None, *, pre_rope: bool = False):
    """A DynamicCache for `model` that stores `method.fake` of every K/V written to it.

    `pre_rope` quantizes keys before RoPE (LLaMA-style models). UsageError for methods that
    compress a whole prefilled context (evict, prune): use `apply(model, method)` for those."""
    m = as_method(method, spec)
    if not writes_compressed(m):
        raise UsageError(f"method {m.name!r}: family {m.family} compresses a prefilled context, not each write; "
                         f"use `with kvcore.apply(model, {m.name!r}): model.generate(...)`")
    check_shapes(model, {m.name: m})
    return fake_quant_cache(model, m, None, _rope(model, pre_rope))


class Applied:
    """The forward wrapper `apply` installs (one per `with` block)."""

    def __init__(self, model, method, tokenizer, options: dict, pre_rope: bool):
        self.model, self.method, self.tokenizer, self.options = model, method, tokenizer, options
        quantizes = writes_compressed(method) or method.family == "compose"
        self.rope = _rope(model, pre_rope) if quantizes else None
        self.scorers = make_scorers([method], options, tokenizer)
        self.original = model.forward
        self.busy = False  # the prefill's own forwards (and kvzip's pass) run unwrapped
        self.hidden = weakref.WeakKeyDictionary()  # evicted cache -> per-layer masks of padded slots

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        self.forward = functools.wraps(self.original)(forward)  # generate() reads the model's signature

    def _forward(self, *args, **kwargs):
        if self.busy:
            return self.original(*args, **kwargs)
        key = "cache" if "cache" in kwargs else "past_key_values"
        if kwargs.get("use_cache") is False:
            raise UsageError(f"method {self.method.name!r} works on the KV cache: call the model without "
                             "use_cache=False inside kvcore.apply")
        cache = kwargs.get(key)
        if cache is None:
            cache = kwargs[key] = cache_from(self.model, [], [])
        if cache in self.hidden:  # decode against a cache evicted at prefill
            kwargs.pop("attention_mask", None)  # kvcore's attention aligns the new tokens itself
            with attention_pass(self.model, PassState(hidden=self.hidden[cache])):
                return self.original(*args, **kwargs)
        if not hasattr(cache, "layers") or cache.get_seq_length() > 0:
            return self.original(*args, **kwargs)
        if writes_compressed(self.method):
            compress_layers(cache, self.method, None, self.rope)
            return self.original(*args, **kwargs)
        return self._prefill(cache, args[0] if args else kwargs.get("input_ids"), kwargs.get("attention_mask"))

    def _prefill(self, cache, ids, attention_mask):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        name = self.method.name
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            raise UsageError(f"method {name!r} compresses the prompt at prefill: give input_ids of one sequence [1, n]")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise UsageError(f"method {name!r} compresses the prompt at prefill: it must not be padded")
        self.busy = True
        try:
            pre = prefill_context(self.model, ids, self.scorers, self.options, self.tokenizer)
            compressed = compress_context(self.method, pre, self.scorers, self.options, rope=self.rope)
        finally:
            self.busy = False
        for layer, k, v in zip(cache.layers, compressed.keys, compressed.values):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        self.hidden[cache] = compressed.hidden
        out = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=pre.last_logits[:, None], **{out: cache})


@contextmanager
def apply(model, method, spec: dict | None = None, *, tokenizer=None, options: dict | None = None,
          pre_rope: bool = False):
    """Run every forward of `model` (and so `model.generate()`) with `method` inside the block.

    `tokenizer`: needed by the kvzip scorer (its reconstruction prompt); `options`: the
    evaluator's (scorer options, seed; see evaluation.options); `pre_rope`: quant and compose
    methods quantize keys before RoPE."""
    m = as_method(method, spec)
    options = check_options(options)
    check_shapes(model, {m.name: m})
    applied = Applied(model, m, tokenizer, options, pre_rope)
    had_own = "forward" in model.__dict__
    model.forward = applied.forward
    try:
        yield applied
    finally:
        if had_own:
            model.forward = applied.original
        else:
            del model.forward
