"""The data rules' jobs: a model or a dataset from its source into resources/."""

from __future__ import annotations

from pathlib import Path


def download_model(name: str, spec: dict, model_dir) -> None:
    from kvcore.sources.models import prepare_model

    prepare_model(name, spec, model_dir)


def download_dataset(name: str, spec: dict, text_parquet) -> None:
    """resources/datasets/{name}/text.parquet and the manifest.json beside it."""
    from kvcore.sources.datasets import prepare_dataset

    prepare_dataset(name, spec, Path(text_parquet).parent)
