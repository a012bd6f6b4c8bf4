"""The hub sources' real code paths, fed by tiny local stand-ins (no network here)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvcore.errors import KvcoreError
from kvcore.sources import prepare_dataset, prepare_model


def test_hf_dataset_through_datasets_load_dataset(tmp_path):
    """datasets.load_dataset on a local Parquet folder: rows kept as they are, empty lines included."""
    folder = tmp_path / "wikitext-like"
    folder.mkdir()
    rows = ["", " = Title = \n", "", " Some text . \n", " More text . \n"]
    pq.write_table(pa.table({"text": rows}), folder / "test.parquet")
    out = prepare_dataset("wt", {"source": "hf", "path": str(folder)}, tmp_path / "ds")
    from kvcore.sources.datasets import joined_text

    assert joined_text(out / "text.parquet") == "\n\n".join(rows)  # exactly the HF guide's join
    with pytest.raises(KvcoreError, match="no column 'content'"):
        prepare_dataset("wt", {"source": "hf", "path": str(folder), "text_field": "content"},
                        tmp_path / "ds2")


def test_hf_model_through_snapshot_download(tiny_models, tmp_path, monkeypatch):
    """snapshot_download is the hub; stand it in with a copy of a tiny local model."""
    import huggingface_hub

    calls = {}

    def fake_snapshot(repo_id, revision, allow_patterns):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        snapshot = tmp_path / "snapshot"
        shutil.copytree(tiny_models["llama"], snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = prepare_model("tl", {"source": "hf", "repo_id": "org/tiny", "revision": "abc"}, tmp_path / "m")
    assert calls["repo_id"] == "org/tiny" and calls["revision"] == "abc"
    assert "*.safetensors" in calls["allow_patterns"] and not any("bin" in p for p in calls["allow_patterns"])
    from kvcore.model import load_model

    model, tokenizer, _ = load_model(out, "cpu", "float32")
    assert model.config.num_key_value_heads == 2

    def no_weights(repo_id, revision, allow_patterns):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "config.json").write_text("{}")
        return str(tmp_path / "bare")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_weights)
    with pytest.raises(KvcoreError, match="no \\*.safetensors weights"):
        prepare_model("tl", {"source": "hf", "repo_id": "org/pickles"}, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_local_model_directory(tiny_models, tmp_path):
    out = prepare_model("loc", {"source": "local", "path": str(tiny_models["gpt2"])}, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    with pytest.raises(KvcoreError, match="no config.json"):
        prepare_model("loc", {"source": "local", "path": str(tmp_path / "nothing")}, tmp_path / "m3")
