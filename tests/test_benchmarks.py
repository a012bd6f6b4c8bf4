"""The extraction benchmark still runs end to end (tiny shape, CPU): its numbers are not checked
here (performance is measured in benchmarks/, never in tests), only that every mode and probe
runs and prints or writes what it claims to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "benchmarks" / "extract_bench.py"
SMALL = ["--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "16", "--repeats", "1"]


def bench(tmp_path, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(BENCH), *SMALL, "--dir", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_side_by_side_modes_write_their_numbers(tmp_path):
    out = tmp_path / "bench.json"
    text = bench(tmp_path, "--batches", "2", "--disk-mb", "8", "--rss-batches", "2", "4",
                 "--modes", "forward", "kvcore", "naive", "--rss-modes", "kvcore", "--json", str(out))
    result = json.loads(out.read_text())["shapes"][0]
    assert set(result["ratios"]) == {"3/1", "3/4"}
    modes = result["modes"]
    assert all(m["tokens_per_s"] > 0 for m in modes.values())
    # kvcore writes the cache in the model's dtype (safetensors) plus the Parquet rows
    assert modes["kvcore"]["written_bytes_per_token"] > result["kv_bytes_per_token"]
    assert modes["kvcore"]["rss_peak_mb_by_batches"]["4"] > 0 and "limit for 3 (kvcore)" in text


def test_codec_table_writer_probe_and_end_to_end_run(tmp_path):
    codecs = bench(tmp_path, "--codecs", "--batches", "1")
    assert codecs.count("kvcore (parquet_options)") == 3  # float32 random, bf16 values, float16 storage
    probe = bench(tmp_path, "--writer-scaling", "--batches", "2", "--workers", "1", "2", "--max-pending", "2")
    assert probe.count("safetensors + Parquet") == 3 and "safetensors only" in probe
    out = tmp_path / "e2e.json"
    bench(tmp_path, "--e2e", "100", "--json", str(out))
    e2e = json.loads(out.read_text())
    assert e2e["tokens"] == 112 and e2e["bytes_written"] > 0  # 7 sequences of 16
