"""One model argument everywhere: a prepared name, a directory or a hub id (tiny offline stand-ins)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvcore.cli import main
from kvcore.errors import KvcoreError, UsageError
from kvcore.sources.resolve import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
V1 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tiny_models, tmp_path, monkeypatch):
    """A Hugging Face cache holding `org/tiny` (main and tag v1) built from a tiny saved model,
    with the hub switched off: what a machine that downloaded the model once sees."""
    repo = tmp_path / "hf-cache" / "models--org--tiny"
    for commit, ref in ((COMMIT, "main"), (V1, "v1")):
        shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit, ignore=shutil.ignore_patterns("manifest.json"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return repo


def _logits(model_dir):
    from kvcore.model import load_model

    model, _, _ = load_model(model_dir, "cpu", "float32")
    with torch.no_grad():
        return model(torch.arange(1, 9)[None]).logits


def test_hub_id_and_path_resolve_to_the_same_model(hub_cache, tiny_models, tmp_path):
    resources = tmp_path / "resources"
    by_id = resolve_model("org/tiny", None, resources)
    assert by_id == resources / "models" / "org--tiny"
    manifest = json.loads((by_id / "manifest.json").read_text())
    assert manifest["spec"] == {"source": "hf", "repo_id": "org/tiny"}
    assert manifest["provenance"]["commit"] == COMMIT
    pinned = resolve_model("org/tiny@v1", None, resources)
    assert pinned.name == "org--tiny@v1"
    assert json.loads((pinned / "manifest.json").read_text())["provenance"]["commit"] == V1
    by_path = resolve_model(str(hub_cache / "snapshots" / COMMIT), None, resources)
    assert by_path == hub_cache / "snapshots" / COMMIT  # a directory is used in place
    reference = _logits(tiny_models["llama"])
    for model_dir in (by_id, pinned, by_path):
        assert torch.equal(_logits(model_dir), reference)
    assert resolve_model("org--tiny", None, resources) == by_id  # prepared: its name works too
    with pytest.raises(KvcoreError, match="could not download org/absent@main"):
        resolve_model("org/absent", None, resources)


def test_config_shorthand_and_unknown_model(hub_cache, tmp_path):
    from kvcore.config import expand_models

    config = {"models": {"mine": "org/tiny@v1", "here": str(hub_cache)}}
    expand_models(config)
    assert config["models"] == {"mine": {"source": "hf", "repo_id": "org/tiny", "revision": "v1"},
                                "here": {"source": "local", "path": str(hub_cache)}}
    with pytest.raises(UsageError, match="models.bad must be a model directory"):
        expand_models({"models": {"bad": "no hub id"}})
    with pytest.raises(UsageError) as error:
        resolve_model("gpt2", Path(__file__).resolve().parent.parent / "config.yaml", tmp_path / "resources")
    message = str(error.value)
    assert "valid prepared names: smollm2-135m" in message and "hub id org/name[@revision]" in message
    assert "directory" in message and "\n" not in message


def test_every_model_command_takes_a_hub_id(hub_cache, tmp_path, monkeypatch, capsys):
    """extract, validate, tasks and download resolve --model the same way (resources/ of the cwd)."""
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--model", "org/tiny"]) == 0
    assert "resources/models/org--tiny" in capsys.readouterr().out
    assert main(["extract", "--model", "org/tiny", "--prompt", "hello there", "--out", "run"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "org--tiny"
    import kvcore.evaluation.perplexity as perplexity
    import kvcore.tasks.evaluate as tasks

    seen = []
    monkeypatch.setattr(perplexity, "validate_method",
                        lambda model_dir, *a, **k: seen.append(model_dir) or {"passed": True})
    monkeypatch.setattr(tasks, "run_task", lambda model_dir, *a, **k: seen.append(model_dir) or {})
    monkeypatch.setattr("kvcore.sources.datasets.joined_text", lambda path: "some text")
    (tmp_path / "text.parquet").write_bytes(b"")
    assert main(["validate", "--method", "int4-g64", "--model", "org/tiny", "--dataset", "text.parquet",
                 "--json"]) == 0
    assert main(["tasks", "local", "--model", "org/tiny", "--method", "knorm", "--path", "qa.jsonl", "--json"]) == 0
    assert [str(p) for p in seen] == ["resources/models/org--tiny"] * 2
    assert main(["extract", "--model", "nobody", "--prompt", "x", "--out", "run2"]) == 2
    assert "valid prepared names: org--tiny" in capsys.readouterr().err
