"""Shared fixtures: tiny random-weight models built offline (GPT-2 = MHA, LLaMA = GQA)."""

from __future__ import annotations

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'gpt2': dir, 'llama': dir} of tiny random-init models saved as HF directories."""
    from kvcore.sources import prepare_model

    root = tmp_path_factory.mktemp("models")
    return {arch: prepare_model(f"tiny-{arch}", {"source": "random-init", "architecture": arch}, root / arch)
            for arch in ("gpt2", "llama")}


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model_dir(request, tiny_models):
    return tiny_models[request.param]
