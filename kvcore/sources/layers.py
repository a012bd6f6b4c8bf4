"""A model's layer count before it is downloaded: what the workflow needs to name the Parquet
files of an extraction when it builds the DAG.

Kept out of kvcore.sources.models so that its imports (kvcore.model) are not code inputs of
the download rule: editing them must not download the models again.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvcore.errors import UsageError
from kvcore.sources.models import ARCHITECTURES

# The layer count of a pinned GGUF, so the workflow can name the Parquet files of its extraction
# before the wheel is downloaded (the file is pinned by hash, so its shape is as fixed as the hash).
PINNED_LAYERS = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": 30,  # SmolLM2-135M-Instruct Q4_1
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": 18,  # Gemma-3-270M Q4_K_M (4 parts)
}


def num_layers(name: str, spec: dict, model_dir: str | Path) -> int:
    """How many layers model `name` has, known before it is extracted (before it is downloaded
    where the spec tells): from `model_dir`'s config.json once prepared, else from the spec.

    The workflow declares one Parquet file per layer and shard as the extraction's outputs, so
    it needs this number when it builds the DAG.
    """
    from types import SimpleNamespace

    from kvcore.model import layer_count

    config = _config_of(spec, Path(model_dir) / "config.json")
    if config is None:
        raise UsageError(f"model '{name}': its number of layers is needed before it is downloaded (to declare "
                         f"the Parquet files extraction writes); download it first (`kvcore download --model "
                         f"{name}`), or name the layers to store in extract.parquet_layers")
    return layer_count(SimpleNamespace(**config))


def _config_of(spec: dict, prepared: Path) -> dict | None:
    """The model's config.json as a dict, without downloading weights; None when it cannot be known."""
    if prepared.is_file():
        return json.loads(prepared.read_text())
    source = spec.get("source")
    if source == "random-init":
        return {**ARCHITECTURES.get(spec.get("architecture", "gpt2"), {}), **spec.get("config", {})}
    if source == "local":
        path = Path(spec["path"]) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    if source == "wheel" and spec.get("sha256") in PINNED_LAYERS:
        return {"num_hidden_layers": PINNED_LAYERS[spec["sha256"]]}
    if source == "hf":
        try:  # config.json only: a few kB, cached by huggingface_hub for later runs
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(spec["repo_id"], "config.json",
                                                   revision=spec.get("revision", "main"))).read_text())
        except Exception:  # offline and not cached: hub errors are many types
            return None
    return None
