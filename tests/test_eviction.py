"""Eviction scorers (kvcore.eviction): shapes, per-head counts, always-kept windows, kvzip's prompt."""

from __future__ import annotations

import pytest
import torch

from kvcore.compress import parse_method
from kvcore.errors import UsageError
from kvcore.eviction import SCORERS, make_scorer
from kvcore.eviction.base import AttentionReceived, ScoreInputs
from kvcore.eviction.kvzip import FIRST_PROMPT, NEXT_PROMPT, template_suffix
from kvcore.model import kv_shape, load_model
from kvcore.evaluation.attention import Observer, PassState, attention_pass
from kvcore.evaluation.cache import cache_from, cached_tensors, gather_kept
from kvcore.evaluation.context import compress_context
from kvcore.evaluation.options import check_options
from kvcore.evaluation.prefill import ContextPrefill, layer_scores as prefill_layer_scores, reconstruction_pass


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(tiny_models["llama"], "cpu", "float32")


def layer_scores(model, tokenizer, name, n_ctx=40, seed=0, **options):
    """Prefill n_ctx random tokens and score every layer with scorer `name`, the way
    prefill-compress does (its own attention statistics, kvzip's reconstruction pass)."""
    ids = torch.randint(0, model.config.vocab_size, (1, n_ctx + 1), generator=torch.Generator().manual_seed(seed))
    scorer = make_scorer(name, **options)
    stats = {}
    prefix = n_ctx
    sets = {scorer.query_key: scorer.query_start(prefix)} if scorer.queries in ("context", "window") else {}
    observer = Observer(sets, prefix, 1 << 12, stats) if sets else None  # tiny chunks: chunking runs
    cache = cache_from(model, [], [])
    with torch.inference_mode(), attention_pass(model, PassState(observer=observer)):
        model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True)
    keys, values = cached_tensors(cache)
    if scorer.queries == "repeat":
        with torch.inference_mode():
            reconstruction_pass(model, cache, ids[:, :prefix], scorer, tokenizer, stats, check_options(None))
        assert all(layer.keys.shape[2] == prefix for layer in cache.layers)  # the pass left nothing behind
    opts = check_options({"seed": seed})
    prefilled = ContextPrefill(keys, values, stats, None, (0.0, 0), 0.0)
    return prefill_layer_scores(scorer, prefilled, 0, opts), keys


@pytest.mark.parametrize("name", SCORERS)
def test_scores_shape_and_top_k_per_head(llama, name):
    model, tokenizer, _ = llama
    shape = kv_shape(model.config)
    scores, keys = layer_scores(model, tokenizer, name)
    assert len(scores) == shape["num_layers"]
    for s in scores:
        assert s.shape == (1, shape["num_kv_heads"], 40) and s.dtype == torch.float32
        assert torch.isfinite(s).all()
    method = parse_method(f"evict-{name}-0.5-s4-r6")
    for s in scores:
        keep = method.select(s)
        assert (keep.sum(-1) == 20).all()  # uniform: exactly k per head
        assert keep[..., :4].all() and keep[..., -6:].all()  # sinks and recent window always kept
    glob = parse_method(f"evict-{name}-0.25-s2-r3-global")
    for s in scores:
        keep = glob.select(s)
        assert int(keep.sum()) == 10 * shape["num_kv_heads"]  # one threshold: total fixed, per head free
        assert keep[..., :2].all() and keep[..., -3:].all()


def test_attention_scores_are_real_attention(llama):
    """h2o's statistics match an eager softmax(QK^T) computed independently, via output_attentions."""
    model, tokenizer, _ = llama
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    scores, _ = layer_scores(model, tokenizer, "h2o", n_ctx=24, seed=2)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=ids[:, :24], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, a in enumerate(att):  # a: [1, heads, q, k]
        received = a.sum(dim=2) / torch.arange(24, 0, -1)
        want = received.reshape(1, -1, group, 24).mean(2)
        torch.testing.assert_close(scores[layer], want, rtol=1e-4, atol=1e-6)


def test_scorer_semantics(llama):
    model, tokenizer, _ = llama
    knorm, keys = layer_scores(model, tokenizer, "knorm")
    assert torch.equal(knorm[0], -keys[0].norm(dim=-1))
    stream, _ = layer_scores(model, tokenizer, "streamingllm")
    keep = parse_method("evict-streamingllm-0.25-s4").select(stream[0])
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3] + list(range(34, 40))  # sinks + most recent
    a, _ = layer_scores(model, tokenizer, "random", seed=1)
    b, _ = layer_scores(model, tokenizer, "random", seed=1)
    c, _ = layer_scores(model, tokenizer, "random", seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    snap, _ = layer_scores(model, tokenizer, "snapkv", window=8)
    assert (snap[0][..., -8:] == snap[0].max()).all()  # the observation window is always kept


def test_kvzip_scores_are_max_over_group_and_queries():
    scorer = make_scorer("kvzip")
    mx = torch.rand(1, 2, 3, 7)
    att = AttentionReceived(sum=mx * 5, max=mx, count=torch.ones(7))
    out = scorer(ScoreInputs(layer=0, keys=torch.zeros(1, 2, 7, 4), values=torch.zeros(1, 2, 7, 4), attention=att))
    assert torch.equal(out, mx.amax(dim=2))


def test_kvzip_prompt_comes_from_the_models_tokenizer(llama):
    model, tokenizer, _ = llama
    suffix = template_suffix(tokenizer)
    # the tiny model's own template: "<|user|>\n{content}\n" then "<|assistant|>\n"
    assert tokenizer.chat_template and suffix == "\n<|assistant|>\n"
    ctx = torch.arange(10, 30)[None]
    chunks = make_scorer("kvzip", chunk_size=8).reconstruction_chunks(tokenizer, ctx)
    assert len(chunks) == 3
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert chunks[0][0].tolist() == enc(FIRST_PROMPT) + enc(suffix) + list(range(10, 18))
    # later chunks: "starting with" + the previous chunk's last 8 tokens
    assert chunks[1][0].tolist() == enc(NEXT_PROMPT) + list(range(10, 18)) + enc(suffix) + list(range(18, 26))
    saved, tokenizer.chat_template = tokenizer.chat_template, None  # without a template: a plain "\n"
    try:
        assert template_suffix(tokenizer) == "\n"
    finally:
        tokenizer.chat_template = saved
    # chunks shrink to fit the model's position limit
    room = len(enc(NEXT_PROMPT)) + 8 + len(enc(suffix)) + 5
    assert max(c.shape[1] for c in make_scorer("kvzip").reconstruction_chunks(tokenizer, ctx, room)) <= room


def test_the_scorers_that_need_the_model_are_those_reading_attention():
    from kvcore.eviction import MODEL_SCORERS, SCORERS, needs_model, scorer_class

    assert [s for s in SCORERS if scorer_class(s).queries is not None] == list(MODEL_SCORERS)
    assert [needs_model(s) for s in SCORERS] == [s in MODEL_SCORERS for s in SCORERS]
    with pytest.raises(UsageError, match="unknown eviction scorer"):
        needs_model("nope")


def test_unknown_scorer_and_options():
    with pytest.raises(UsageError, match="valid: kvzip"):
        make_scorer("oracle")
    with pytest.raises(UsageError, match="unknown option 'windw'"):
        make_scorer("snapkv", windw=3)
    with pytest.raises(UsageError, match="window must be an integer"):
        make_scorer("snapkv", window=0)


def test_gather_kept_shrinks_or_masks():
    k = torch.arange(2 * 6, dtype=torch.float32).reshape(1, 2, 6, 1)
    keep = torch.tensor([[[1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]]], dtype=torch.bool)
    k2, v2, hidden = gather_kept(k, k, keep)
    assert hidden is None and k2[0, 0, :, 0].tolist() == [0, 2, 4] and k2[0, 1, :, 0].tolist() == [7, 8, 9]
    keep[0, 1, 3] = False
    k2, _, hidden = gather_kept(k, k, keep)
    assert k2.shape[2] == 3 and hidden[0].tolist() == [[False] * 3, [False, False, True]]


def test_one_threshold_across_layers(llama):
    """budget model: the layers' heads compete under one threshold (KVzip's default)."""
    model, tokenizer, _ = llama
    shape = kv_shape(model.config)
    scores, keys = layer_scores(model, tokenizer, "kvzip")
    prefilled = ContextPrefill(keys, keys, {}, None, (0.0, 0), 0.0)
    out = compress_context(parse_method("evict-kvzip-0.25-s2-model"), prefilled, {"kvzip": make_scorer("kvzip")},
                           check_options(None), scores={"kvzip": scores})
    kept = [int(k.shape[2] * k.shape[1]) - (int(out.hidden[i].sum()) if i in out.hidden else 0)
            for i, k in enumerate(out.keys)]
    assert kept == [int(m.sum()) for m in out.keep]
    assert sum(kept) == 10 * shape["num_kv_heads"] * shape["num_layers"]
    assert len(set(kept)) > 1  # layers keep different counts: one threshold over all of them
    with pytest.raises(UsageError, match="budget"):  # the old evaluator option is gone: the method says it
        check_options({"global_scope": "model"})
