"""benchmarks/ppl_bench.py keeps every finished window: a run stopped after one window and
continued with --resume writes the same records as one uninterrupted run (tiny random model, CPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

# no quanto peer: optimum-quanto is the `bench` extra, not installed by `make test`
METHODS = "int2-g32-ch,evict-kvzip-0.5-s4-model"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ppl_bench", REPO / "benchmarks" / "ppl_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untimed(x):
    """`x` without wall-clock fields (the only ones two runs of the same windows may differ in)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items()
                if "second" not in k and "latency" not in k and k not in ("command", "torch_threads")}
    return [untimed(v) for v in x] if isinstance(x, list) else x


def test_resumed_run_equals_uninterrupted(bench, tiny_models, lee_news_dir, tmp_path):
    def run(out, *extra, methods=METHODS):
        return bench.main(["--model", str(tiny_models["llama"]), "--dataset", str(lee_news_dir / "text.parquet"),
                           "--max-tokens", "256", "--max-length", "64", "--stride", "32",
                           "--protocols", "prefill-compress", "--methods", methods, "--out", str(out), *extra])

    run(tmp_path / "whole")
    run(tmp_path / "split", "--stop-after", "1")
    path = tmp_path / "split" / "prefill-compress.json"
    partial = json.loads(path.read_text())
    assert partial["meta"]["n_windows_done"] == 1 and partial["records"]["int2-g32-ch"]["n_windows"] == 1
    with pytest.raises(SystemExit, match="kvcore: error: .* holds 1 of 4 windows .* --resume"):
        run(tmp_path / "split")
    with pytest.raises(SystemExit, match="kvcore: error: --resume: .* another methods"):
        run(tmp_path / "split", "--resume", methods="int2-g32-ch")
    assert json.loads(path.read_text()) == partial  # a refused run leaves the file as it was
    run(tmp_path / "split", "--resume")
    whole = json.loads((tmp_path / "whole" / "prefill-compress.json").read_text())
    split = json.loads(path.read_text())
    assert whole["records"]["evict-kvzip-0.5-s4-model"]["n_windows"] == 4
    assert split["windows"][0] == partial["windows"][0]  # kept, timings included: not run again
    assert untimed(split) == untimed(whole)
    assert whole["records"]["int2-g32-ch"]["paired"]["delta_percent_ci95"]  # the paired CI is there to compare
