"""attn_implementation reaches the model; a Gemma-2-shaped tiny model (eager only) runs through
extract and perplexity, and kvcore's attention keeps its softcap and sliding window."""

from __future__ import annotations

import json

import pytest
import torch

from kvcore.cli import main
from kvcore.errors import KvcoreError


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    from kvcore.sources import prepare_model

    return prepare_model("tiny-gemma2", {"source": "random-init", "architecture": "gemma2"},
                         tmp_path_factory.mktemp("gemma2") / "m")


@pytest.fixture
def loaded_with(monkeypatch):
    """The attn_implementation every model load asked for and got."""
    import kvcore.model

    seen = []
    original = kvcore.model.load_model

    def spy(*args, **kwargs):
        model, tokenizer, device = original(*args, **kwargs)
        seen.append(model.config._attn_implementation)
        return model, tokenizer, device

    monkeypatch.setattr(kvcore.model, "load_model", spy)
    return seen


def test_choice_reaches_the_model(gemma2_dir, tiny_models, tmp_path, loaded_with):
    from kvcore.model import load_model
    from kvcore.sources import prepare_model

    assert load_model(gemma2_dir, "cpu", "float32")[0].config._attn_implementation == "eager"  # required
    assert load_model(tiny_models["llama"], "cpu", "float32")[0].config._attn_implementation == "sdpa"
    assert load_model(tiny_models["llama"], "cpu", "float32", "eager")[0].config._attn_implementation == "eager"
    with pytest.raises(KvcoreError, match="does not support an attention implementation"):
        load_model(gemma2_dir, "cpu", "float32", "sdpa")
    configured = prepare_model("eager-llama", {"source": "random-init", "architecture": "llama",
                                               "attn_implementation": "eager"}, tmp_path / "m")
    assert load_model(configured, "cpu", "float32")[0].config._attn_implementation == "eager"  # from the config


def test_gemma2_through_extract_and_perplexity(gemma2_dir, tmp_path, capsys, loaded_with):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)  # longer than the 16-token window
    assert main(["extract", "--model", str(gemma2_dir), "--prompt", text, "--out", str(tmp_path / "run"),
                 "--attn-implementation", "eager", "--device", "cpu"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["num_layers"] == 2 and meta["head_dim"] == 32
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "run" / "kv").glob("part-*.safetensors"))), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    n_tokens = meta["seq_len"]
    assert n_tokens > 16 and all(n_tokens in shape for shape in shapes.values())  # sliding layers keep every token
    from kvcore.evaluation.perplexity import validate_method

    ids = torch.randint(0, 400, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    record = validate_method(gemma2_dir, ids, "int8-g32", None, {"max_length": 64, "stride": 32, "device": "cpu",
                                                                 "dtype": "float32",
                                                                 "attn_implementation": "eager"})
    assert record["baseline_perplexity"] > 1 and abs(record["delta"]) < 1e-3 * record["baseline_perplexity"]
    assert loaded_with == ["eager", "eager"]


def test_kvcore_attention_keeps_softcap_and_window(gemma2_dir):
    """The evaluation's attention (attention_pass) equals the model's own eager attention, with the
    softcap made to matter (large query/key weights) and more tokens than the sliding window."""
    from kvcore.evaluation.attention import attention_pass
    from kvcore.model import load_model

    model, _, _ = load_model(gemma2_dir, "cpu", "float32")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "q_proj"):
            torch.nn.init.normal_(module.q_proj.weight, std=1.0)
            torch.nn.init.normal_(module.k_proj.weight, std=1.0)
    ids = torch.randint(0, 400, (1, 40))
    with torch.no_grad():
        reference = model(ids).logits
        with attention_pass(model):
            ours = model(ids).logits
        for module in model.modules():  # what ignoring the softcap would give
            if hasattr(module, "attn_logit_softcapping"):
                module.attn_logit_softcapping = None
        uncapped = model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (uncapped - reference).abs().max() > 1e-3
