"""The two perplexity protocols (kvcore.evaluation.protocols) on tiny models, and one slow check on SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvcore.compress import parse_method
from kvcore.errors import UsageError
from kvcore.model import load_model
from kvcore.evaluation.protocols import evaluate, evaluate_methods
from kvcore.evaluation.windows import layout_windows, split_window


# head_dim of the tiny models is 16: quantize along tokens (channel axis) there
QUANT = ["int8-ch", "int4-g32-ch", "sparse-0.5"]


@pytest.fixture
def loaded(tiny_model_dir):
    model, tokenizer, device = load_model(tiny_model_dir, "cpu", "float32")
    ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    return model, tokenizer, ids


def run(model, ids, methods, protocol, tokenizer=None, max_length=64, stride=32, **kw):
    methods = {name: parse_method(name) for name in methods}
    return evaluate_methods(model, ids, methods, protocol=protocol, max_length=max_length, stride=stride,
                            tokenizer=tokenizer, **kw)


@pytest.mark.parametrize("protocol", ["fake-quant", "prefill-compress"])
def test_identity_gives_exactly_the_baseline(loaded, protocol):
    model, tokenizer, ids = loaded
    result = run(model, ids, ["none"], protocol)
    base, ident = result["baseline"], result["methods"]["none"]
    assert ident["perplexity"] == base["perplexity"]
    assert [w["nll_sum"] for w in ident["windows"]] == [w["nll_sum"] for w in base["windows"]]
    # and the protocol's baseline is the plain HF-guide evaluation of the same tokens
    plain = evaluate(model, ids, 64, 32)
    assert base["n_scored"] == plain["n_scored"]
    assert base["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(64, 32), (50, 17), (64, 64)])
def test_prefill_compress_baseline_matches_plain_windows(loaded, max_length, stride):
    model, _, ids = loaded
    base = run(model, ids, [], "prefill-compress", max_length=max_length, stride=stride)["baseline"]
    plain = evaluate(model, ids, max_length, stride)
    assert base["n_scored"] == plain["n_scored"]
    assert base["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)


def test_keep_ratio_one_is_the_baseline(loaded):
    model, tokenizer, ids = loaded
    result = run(model, ids, ["evict-h2o-1.0", "evict-kvzip-1.0-s4-global"], "prefill-compress", tokenizer)
    for name in ("evict-h2o-1.0", "evict-kvzip-1.0-s4-global"):
        assert result["methods"][name]["perplexity"] == result["baseline"]["perplexity"]


def test_sinks_only_keeps_true_positions(tiny_models):
    """Keep only 4 sink tokens of a 48-token context: the first target is scored from the
    whole context's prefill (its last logits), the others read the sinks at positions 0..3
    and sit at their own positions. Reference: a plain forward over the context for the first
    target, one over [sinks, targets[:-1]] with explicit positions for the rest."""
    for arch in ("llama", "gpt2"):
        model, _, _ = load_model(tiny_models[arch], "cpu", "float32")
        ids = torch.randint(0, model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(5)).tolist()
        # chunks layout: one window of 96 tokens, 48 context + 48 targets
        method = {"sinks": parse_method("evict-streamingllm-0.01-s4")}
        result = evaluate_methods(model, ids, method, protocol="prefill-compress", max_length=96, stride=48,
                                  layout="chunks")
        got = result["methods"]["sinks"]["windows"][0]["nll_sum"]

        ctx = 48
        x = torch.tensor([ids[:4] + ids[ctx:95]])
        pos = torch.tensor([list(range(4)) + list(range(ctx, 95))])
        with torch.no_grad():
            first = model(input_ids=torch.tensor([ids[:ctx]])).logits[0, -1:]
            logits = torch.cat([first, model(input_ids=x, position_ids=pos).logits[0, 4:]])
        target = torch.tensor(ids[ctx:96])
        want = float(-torch.log_softmax(logits.double(), -1).gather(1, target[:, None]).sum())
        assert got == pytest.approx(want, rel=1e-5), arch
        # and it is not the baseline: the other context tokens really were dropped
        assert result["baseline"]["windows"][0]["nll_sum"] != pytest.approx(want, rel=1e-5)


def test_fake_quant_8_bit_within_one_percent(loaded):
    model, _, ids = loaded
    result = run(model, ids, QUANT + ["int2-g32-ch"], "fake-quant")
    base = result["baseline"]["perplexity"]
    assert abs(result["methods"]["int8-ch"]["perplexity"] / base - 1) < 0.01
    for name in QUANT:  # every write is compressed: nothing stays exact
        m = result["methods"][name]
        assert m["perplexity"] != base and m["metrics"]["rmse"] > 0
    assert result["methods"]["int8-ch"]["metrics"]["bits_per_element"] < 9
    assert result["methods"]["int2-g32-ch"]["metrics"]["bits_per_element"] == pytest.approx(3.0, abs=0.3)


def test_prefill_compress_changes_the_result_not_the_scored_tokens(loaded):
    model, _, ids = loaded
    result = run(model, ids, ["int2-g32-ch", "prune-l0"], "prefill-compress")
    for name in ("int2-g32-ch", "prune-l0"):
        assert result["methods"][name]["perplexity"] != result["baseline"]["perplexity"]
        assert result["methods"][name]["n_scored"] == result["baseline"]["n_scored"]


def test_the_whole_context_is_compressed_and_the_first_target_read_from_the_prefill(tiny_models):
    """As kvpress and QuantizedCache do it: every context token is compressed, the last one
    included, and the first target is scored from the prefill's last logits. Reference: one
    forward over the context, then the targets against the compressed context by hand."""
    from kvcore.evaluation.cache import cache_from

    model, _, _ = load_model(tiny_models["llama"], "cpu", "float32")
    ids = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(9)).tolist()
    method = parse_method("int2-g32-ch")
    result = evaluate_methods(model, ids, {"q": method}, protocol="prefill-compress", max_length=64, stride=32,
                              layout="chunks")
    got = result["methods"]["q"]["windows"][0]["nll_sum"]
    with torch.no_grad():
        cache = cache_from(model, [], [])
        first = model(input_ids=torch.tensor([ids[:32]]), past_key_values=cache, use_cache=True).logits[0, -1:]
        keys = [method.fake(layer.keys, "key", layer=i) for i, layer in enumerate(cache.layers)]
        values = [method.fake(layer.values, "value", layer=i) for i, layer in enumerate(cache.layers)]
        assert not torch.equal(keys[0][:, :, -1], cache.layers[0].keys[:, :, -1])  # the last token is lossy
        rest = model(input_ids=torch.tensor([ids[32:63]]), past_key_values=cache_from(model, keys, values),
                     position_ids=torch.arange(32, 63)[None], use_cache=True).logits[0]
    logp = torch.log_softmax(torch.cat([first, rest]).double(), -1)
    want = float(-logp.gather(1, torch.tensor(ids[32:64])[:, None]).sum())
    assert got == pytest.approx(want, rel=1e-6)
    assert result["baseline"]["windows"][0]["nll_sum"] != pytest.approx(want, rel=1e-4)


def test_pruned_layer_holds_no_context(tiny_models):
    """Dropping a whole layer's cache = that layer's targets see only themselves."""
    from kvcore.evaluation.context import compress_context
    from kvcore.evaluation.options import check_options
    from kvcore.evaluation.prefill import ContextPrefill

    method = parse_method("prune-l0-h1.0")
    keys = [torch.randn(1, 2, 10, 16) for _ in range(2)]
    out = compress_context(method, ContextPrefill(keys, keys, {}, None, (0.0, 0), 0.0), {}, check_options(None))
    assert out.keys[0].shape[2] == 0 and out.keys[1].shape[2] == 10
    assert out.hidden[1][0, 0].all() and not out.hidden[1][0, 1].any()


def test_layouts_and_window_split():
    assert [(w.begin, w.end, w.target_len) for w in layout_windows(8192, 1024, 512, "chunks")][:2] == \
        [(0, 1024, 512), (1024, 2048, 512)]
    assert len(layout_windows(8192, 1024, 512, "chunks")) == 8
    assert split_window(1024, 512, 1024, 512) == (512, False)
    assert split_window(1024, 1024, 1024, 512) == (512, True)  # the first sliding window
    assert split_window(64, 64, 64, 64) == (0, True)  # stride = max_length: nothing to compress
    with pytest.raises(UsageError, match="layout"):
        layout_windows(100, 32, 16, "diagonal")
    with pytest.raises(UsageError, match="at least"):
        layout_windows(100, 128, 64, "chunks")


def test_protocol_checks(loaded):
    model, _, ids = loaded
    with pytest.raises(UsageError, match="no fake-quant protocol"):
        run(model, ids, ["evict-knorm-0.5"], "fake-quant")
    with pytest.raises(UsageError, match="tokenizer"):
        run(model, ids, ["evict-kvzip-0.5"], "prefill-compress", tokenizer=None)
    with pytest.raises(UsageError, match="protocol must be"):
        run(model, ids, [], "prefill")


def test_record_has_design_fields_and_both_protocols(tiny_models, tmp_path):
    from kvcore.evaluation.nll import token_ids_sha256
    from kvcore.evaluation.perplexity import validate_method

    loaded = load_model(tiny_models["llama"], "cpu", "float32")
    ids = torch.randint(0, 500, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    settings = {"max_length": 64, "stride": 32, "threshold": 0.5}
    record = validate_method(None, ids, "int4-g32-ch", None, settings, loaded=loaded)
    design = ["baseline_perplexity", "compressed_perplexity", "delta", "delta_percent", "compression_ratio", "rmse",
              "snr_db", "cosine_similarity", "passed", "threshold", "protocol", "max_length", "stride", "n_tokens",
              "dtype", "seconds", "tokens_per_second"]
    assert all(key in record for key in design)
    assert record["protocol"] == "fake-quant" and set(record["protocols"]) == {"fake-quant", "prefill-compress"}
    assert record["protocols"]["prefill-compress"]["protocol"] == "prefill-compress"
    assert len(record["paired"]["delta_percent_per_window"]) == len(record["windows"])
    assert record["latency_ratio"] > 0
    assert record["token_ids_sha256"] == token_ids_sha256(ids) != token_ids_sha256(ids[:-1])
    assert record["bits_basis"] == "fp16" and "kept_fraction" not in record
    json.dumps(record)
    evict = validate_method(None, ids, "evict-knorm-0.5", None, settings, loaded=loaded)
    assert evict["protocol"] == "prefill-compress" and list(evict["protocols"]) == ["prefill-compress"]
    assert 7.5 < evict["bits_per_element"] < 8.5  # half the tokens kept + a 1-bit mask per token and head
    assert evict["kept_fraction"] == pytest.approx(0.5, abs=0.02) and len(evict["kept_by_layer"]) == 2
    model_wide = validate_method(None, ids, "evict-knorm-0.5-model", None, settings, loaded=loaded)
    assert model_wide["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert model_wide["kept_by_layer"] != evict["kept_by_layer"]  # one threshold: layers keep different shares
    base = validate_method(None, ids, "baseline", None, settings, loaded=loaded)
    assert base["delta"] == 0 and base["passed"]


@pytest.mark.slow
def test_smollm2_two_bits_worse_than_four_bits(smollm2_dir, lee_news_dir):
    """Sanity ordering on real weights (SmolLM2-135M, Lee corpus, 2 windows of 256 tokens,
    128 scored each; 4-bit may land a hair under the baseline, so only the ordering is checked)."""
    from kvcore.evaluation.perplexity import eval_token_ids
    from kvcore.sources.datasets import joined_text

    model, tokenizer, _ = load_model(smollm2_dir, "cpu", "float32")
    ids = eval_token_ids(tokenizer, joined_text(lee_news_dir / "text.parquet"), 512)
    result = run(model, ids, ["kivi2-g64", "kivi4-g64"], "fake-quant", max_length=256, stride=128, layout="chunks")
    base = result["baseline"]["perplexity"]
    two, four = (result["methods"][n]["perplexity"] for n in ("kivi2-g64", "kivi4-g64"))
    assert two > four and two > base * 1.02, (base, four, two)
    assert abs(four / base - 1) < 0.05, (base, four)
    assert math.isfinite(two)


def test_pre_rope_undoes_and_redoes_rope(tiny_models):
    """Keys un-rotated by Rope are the k_proj outputs before RoPE; identity round-trips."""
    from kvcore.evaluation.cache import Rope, cache_from

    model, _, _ = load_model(tiny_models["llama"], "cpu", "float32")
    ids = torch.randint(0, 400, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = cache_from(model, [], [])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        attn = model.model.layers[0].self_attn
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        raw = attn.k_proj(h).view(1, 20, -1, attn.head_dim).transpose(1, 2)
    rope = Rope(model)
    keys = cache.layers[0].keys
    torch.testing.assert_close(rope.unrotate(keys, 0), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope.quantize(parse_method("none"), keys, 0), keys, rtol=1e-5, atol=1e-5)
    ids_list = ids[0].tolist() * 8
    result = evaluate_methods(model, ids_list, {"q": parse_method("int8-ch")}, protocol="fake-quant",
                              max_length=64, stride=32, options={"pre_rope": True})
    assert result["methods"]["q"]["perplexity"] == pytest.approx(result["baseline"]["perplexity"], rel=0.01)
    gpt2, _, _ = load_model(tiny_models["gpt2"], "cpu", "float32")
    with pytest.raises(UsageError, match="rotary"):
        evaluate_methods(gpt2, ids_list, {}, protocol="fake-quant", max_length=64, stride=32,
                         options={"pre_rope": True})


def test_validate_cli_quick(capsys):
    from kvcore.cli import main

    assert main(["validate", "--method", "int8", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "fake-quant" in out and "prefill-compress" in out and "paired per-window" in out
    assert main(["validate", "--method", "int4-g64", "--model", "x"]) == 2
    assert "--dataset" in capsys.readouterr().err
