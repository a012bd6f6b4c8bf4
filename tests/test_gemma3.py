"""Gemma-3-270M from its four PyPI chunk wheels (configs/gemma3-270m.yaml): prepared, loaded by
transformers' GGUF support, run. Only where the wheels are already in resources/wheels/ (about
240 MB; `kvcore download --config configs/gemma3-270m.yaml --model gemma3-270m` fetches them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((REPO / "configs" / "gemma3-270m.yaml").read_text())["models"]["gemma3-270m"]
WHEELS = REPO / "resources" / "wheels"


def _downloaded() -> bool:
    names = [p.name.lower() for p in WHEELS.glob("*.whl")]
    return all(any(n.startswith(part["package"].replace("-", "_") + "-" + part["version"]) for n in names)
               for part in SPEC["parts"])


pytestmark = [pytest.mark.slow, pytest.mark.gemma3,
              pytest.mark.skipif(not _downloaded(), reason="the Gemma-3 wheels are not in resources/wheels/")]


def test_gemma3_270m_from_chunk_wheels(tmp_path):
    from kvcore.extract import Extractor
    from kvcore.sources import prepare_model

    out = prepare_model("gemma3-270m", SPEC, tmp_path / "gemma3-270m", WHEELS)
    ex = Extractor(out, "cpu", "float32")
    config = ex.model.config
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (
        "gemma3_text", 18, 1, 256)
    assert config.layer_types.count("full_attention") == 3 and config._attn_implementation == "sdpa"
    text = "The capital of France is"
    extraction = ex.extract(text)
    n = len(extraction.tokens)
    assert all(k.shape == (1, n, 256) for k in extraction.keys)  # sliding layers hold every token too
    ids = ex.tokenizer(text, return_tensors="pt")
    generated = ex.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert ex.tokenizer.decode(generated[0][ids["input_ids"].shape[1]:]) == " the capital of the country of France."
