"""Whatever a user types gets one line, a non-zero exit and nothing left behind (issue 15, user faults).

Each case runs `kvcore` in-process in a scratch directory holding a few inputs (a tiny
model, a Parquet and a safetensors file, JSON of the wrong shape, configs with one
mistake) and checks: exit 2 (1 for a broken model directory), exactly one stderr line
`kvcore: error: ...` naming the problem, no traceback, and every file as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from test_reliability import assert_one_clear_line, snapshot

TINY_TEXT = (REPO / "configs" / "tiny-test.yaml").read_text()
TINY = yaml.safe_load(TINY_TEXT)
TOP_K_LINE = TINY_TEXT.splitlines().index("  top_k: 5") + 1
DUPLICATE = f"duplicate key 'top_k' at line {TOP_K_LINE + 1} (first at line {TOP_K_LINE}); give each key once"
TASK_RESULT = {"method": "knorm", "primary_metric": "f1", "n_examples": 2, "baseline": {"f1": 0.5},
               "results": [{"keep_ratio": 0.5, "f1": 0.4}], "f1": {"0.5": 0.4}}


def kvcore(*argv: str) -> subprocess.CompletedProcess:
    """`kvcore ARGV` in this process (no interpreter start per case), as a CompletedProcess."""
    from kvcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def tiny_config(**sections) -> str:
    """The tiny test config as YAML text, with `sections` replaced."""
    return yaml.safe_dump({**TINY, **sections}, sort_keys=False)


@pytest.fixture(scope="module")
def work(tiny_models, tmp_path_factory):
    """A directory of inputs: a tiny model, binary files, ill-shaped JSON, one-mistake configs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("user-errors")
    pq.write_table(pa.table({"text": ["some words to read"]}), root / "x.parquet")
    shutil.copytree(tiny_models["gpt2"], root / "m")
    for name, tokenizer in (("binary-tokenizer", (root / "x.parquet").read_bytes()), ("shapeless-tokenizer", b"{}")):
        shutil.copytree(tiny_models["gpt2"], root / name)
        (root / name / "tokenizer.json").write_bytes(tokenizer)
    save_file({"a": torch.zeros(3)}, str(root / "x.safetensors"))
    files = {
        "list.json": "[1, 2]",
        "shapeless.json": json.dumps({"method": "knorm"}),
        "bad-score.json": json.dumps({**TASK_RESULT, "results": [{"keep_ratio": 0.5, "f1": "high"}]}),
        "f1.json": json.dumps(TASK_RESULT),
        "accuracy.json": json.dumps({**TASK_RESULT, "primary_metric": "accuracy", "baseline": {"accuracy": 1},
                                     "results": [{"keep_ratio": 0.5, "accuracy": 1}], "accuracy": {"0.5": 1}}),
        "answers.jsonl": json.dumps({"context": "c", "question": "q", "answers": {"a": 1}}) + "\n",
        "list.yaml": "[1, 2]\n",
        "nan.yaml": tiny_config(perplexity={**TINY["perplexity"], "threshold": float("nan")}),
        "duplicate.yaml": TINY_TEXT.replace("  top_k: 5\n", "  top_k: 5\n  top_k: 3\n"),
        "layers.yaml": tiny_config(models={"tiny-gpt2": {**TINY["models"]["tiny-gpt2"], "config": {"n_layer": -1}}}),
        "heads.yaml": tiny_config(models={"tiny-gpt2": {**TINY["models"]["tiny-gpt2"], "config": {"n_head": 3}}}),
        "seq-len.yaml": tiny_config(extract={**TINY["extract"], "seq_len": 10**9}),
        "shard-size.yaml": tiny_config(extract={**TINY["extract"], "shard_size": 10**9}),
        "max-tokens.yaml": tiny_config(perplexity={**TINY["perplexity"], "max_tokens": 10**12}),
        "max-length.yaml": tiny_config(perplexity={**TINY["perplexity"], "max_length": 10**9}),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    kvcore("extract", "--model", root / "m", "--prompt", "a b c", "--out", root / "run")
    return root


@pytest.fixture
def inside(work, monkeypatch):
    monkeypatch.chdir(work)
    return work


def assert_refused(argv: list[str], *fragments: str, root, code: int = 2) -> str:
    """One clear line naming `fragments`, exit `code` (2: usage), and `root` exactly as before;
    returns the line."""
    before = snapshot(root)
    done = kvcore(*argv)
    assert_one_clear_line(done, *fragments)
    assert done.returncode == code, done.stderr
    assert snapshot(root) == before
    return done.stderr.strip().splitlines()[-1]


# --- (6) binary files given as text, and valid JSON of the wrong shape -------------------------------------

BINARY_AS_TEXT = "is not UTF-8 text"
SHAPES = [
    (["extract", "--model", "m", "--text-file", "x.parquet", "--out", "o"], "--text-file x.parquet " + BINARY_AS_TEXT),
    (["download", "--config", "x.parquet", "--resources", "res"], "config file x.parquet " + BINARY_AS_TEXT),
    (["tasks", "local", "--model", "m", "--path", "x.parquet", "--method", "knorm"],
     "local task file x.parquet " + BINARY_AS_TEXT),
    (["tasks", "table", "x.safetensors"], "task result x.safetensors is not valid JSON"),
    (["tasks", "plot", "x.safetensors", "--out", "p.png"], "task result x.safetensors is not valid JSON"),
    (["validate", "--method", "int4-ch", "--model", "m", "--dataset", "x.safetensors"],
     "x.safetensors is not a dataset's text.parquet"),
    (["tasks", "needle", "--model", "m", "--dataset", "x.safetensors", "--method", "knorm", "--lengths", "64"],
     "x.safetensors is not a dataset's text.parquet"),
    (["tasks", "table", "list.json"], "task result list.json: (top level): [1, 2] is not of type 'object'"),
    (["tasks", "plot", "shapeless.json", "--out", "p.png"], "'primary_metric' is a required property"),
    (["tasks", "table", "bad-score.json"], "task result bad-score.json: results.0.f1: 'high' is not of type"),
    (["tasks", "table", "f1.json", "accuracy.json"], "mix primary metrics (accuracy, f1)"),
    (["tasks", "local", "--model", "m", "--path", "answers.jsonl", "--method", "knorm"],
     "answers.jsonl:1: missing 'answers'"),
    (["download", "--config", "list.yaml"], "config file list.yaml: expected a mapping of settings (got list)"),
    (["extract", "--model", "m", "--prompt", "hi", "--out", "o", "--top-k", "600"],
     "top_k must be an integer from 1 to the model's vocabulary size"),
]


@pytest.mark.parametrize("argv, message", SHAPES, ids=[" ".join(m.split()[:4]) for _, m in SHAPES])
def test_a_file_of_the_wrong_kind_or_shape_is_one_line(inside, argv, message):
    assert_refused(argv, message, root=inside)


@pytest.mark.parametrize("model, message", [
    ("binary-tokenizer", "could not load the tokenizer in binary-tokenizer: UnicodeDecodeError:"),
    ("shapeless-tokenizer", "could not load the tokenizer in shapeless-tokenizer: KeyError: 'added_tokens'"),
])
def test_a_broken_model_directory_is_one_line(inside, model, message):
    assert_refused(["extract", "--model", model, "--prompt", "hi", "--out", "o"], message, root=inside, code=1)


def test_a_task_table_of_the_right_shape_still_prints(inside):
    done = kvcore("tasks", "table", "f1.json")
    assert done.returncode == 0, done.stderr
    assert "| knorm | 0.400 |" in done.stdout


# --- (9) every numeric option: negative, zero, nan, inf, huge -------------------------------------------------

EXTRACT = ["extract", "--model", "m", "--out", "o"]
VALIDATE = ["validate", "--method", "int4-ch", "--model", "m", "--dataset", "x.parquet"]
NEEDLE = ["tasks", "needle", "--model", "m", "--dataset", "x.parquet", "--method", "knorm"]
LOCAL = ["tasks", "local", "--model", "m", "--path", "answers.jsonl", "--method", "knorm"]
INTEGERS = ["-5", "0", "1.5", "nan", "99999999999"]
NUMBERS = ["-1", "nan", "inf", "-inf", "1e999", "x"]
OPTIONS = [  # (command, option, valid range as printed, values to refuse)
    (EXTRACT + ["--prompt", "hi"], "--top-k", "an integer from 1 to 1000", INTEGERS),
    (EXTRACT + ["--prompt", "hi"], "--seed", "an integer from 0 to 4294967295", ["-1", "nan", str(2**32)]),
    (EXTRACT, "--random", "an integer from 1 to 1000000", INTEGERS),
    (VALIDATE, "--max-tokens", "an integer from 2 to 100000000", ["-5", "0", "1", "nan", "99999999999"]),
    (VALIDATE, "--max-length", "an integer from 2 to 1048576", INTEGERS),
    (VALIDATE, "--stride", "an integer from 1 to 1048576", INTEGERS),
    (VALIDATE, "--threshold", "a finite number > 0", ["0", *NUMBERS]),
    (NEEDLE, "--lengths", "an integer from 32 to 1048576", ["16", *INTEGERS]),
    (NEEDLE, "--depths", "a finite number >= 0 and <= 1", ["1.5", *NUMBERS]),
    (NEEDLE, "--n", "an integer from 1 to 1000000", INTEGERS),
    (NEEDLE, "--keep", "a finite number > 0 and <= 1", ["0", "1.01", *NUMBERS]),
    (NEEDLE, "--max-new-tokens", "an integer from 1 to 4096", INTEGERS),
    (LOCAL, "--seed", "an integer from 0 to 4294967295", ["-1", "nan"]),
    (LOCAL, "--n", "an integer from 1 to 1000000", INTEGERS),
]
CASES = [(cmd, option, valid, value) for cmd, option, valid, values in OPTIONS for value in values]


@pytest.mark.parametrize("command, option, valid, value", CASES,
                         ids=[f"{c[0]}-{c[1] if c[0] == 'tasks' else ''}{o}={v}" for c, o, _, v in CASES])
def test_a_numeric_option_out_of_range_is_a_usage_error(inside, command, option, valid, value):
    line = assert_refused([*command, f"{option}={value}"], root=inside)
    assert line.endswith(f"argument {option}: must be {valid} (got {value!r})"), line


@pytest.mark.parametrize("argv, message", [
    (VALIDATE + ["--stride", "2000"], "--stride (2000) must not exceed --max-length (1024)"),
    (["metrics", "run/kv/part-00000.safetensors", "--method", "int8-ch", "--threshold", "min_snr_db=.nan"],
     "threshold min_snr_db must be a finite number (got nan)"),
    (["metrics", "run/kv/part-00000.safetensors", "--method", "int8-ch", "--threshold", "max_rmse=-1"],
     "threshold max_rmse must be a finite number from 0 up (got -1)"),
    (["compress", "run/kv/part-00000.safetensors", "c.safetensors", "--method", "int8-ch",
      "--threshold", "min_cosine_similarity=2"], "threshold min_cosine_similarity must be a finite number from -1 to 1"),
])
def test_options_that_bound_each_other_or_take_key_value_numbers(inside, argv, message):
    assert_refused(argv, message, root=inside)


def test_the_cli_bounds_are_the_config_schemas():
    from kvcore.cli import options
    from kvcore.config import load_schema

    schema = load_schema()
    props = schema["properties"]
    assert props["perplexity"]["properties"]["max_tokens"]["maximum"] == options.MAX_TOKENS
    assert props["perplexity"]["properties"]["max_length"]["maximum"] == options.MAX_LENGTH
    assert props["extract"]["properties"]["seq_len"]["maximum"] == options.MAX_LENGTH
    assert props["extract"]["properties"]["top_k"]["maximum"] == options.MAX_TOP_K
    assert props["tasks"]["properties"]["max_new_tokens"]["maximum"] == options.MAX_NEW_TOKENS
    assert schema["$defs"]["seed"]["maximum"] == options.MAX_SEED
    suite = props["tasks"]["properties"]["suite"]["additionalProperties"]["properties"]
    assert suite["n_per_cell"]["maximum"] == suite["n_examples"]["maximum"] == options.MAX_EXAMPLES
    (random,) = [branch["then"]["properties"] for branch in schema["$defs"]["dataset"]["allOf"]
                 if branch["if"]["properties"]["source"].get("const") == "random"]
    assert random["min_words"]["maximum"] == random["max_words"]["maximum"] == options.MAX_WORDS


# --- (8) config checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ("nan.yaml", "config: perplexity.threshold must be a finite number (got nan)"),
    ("duplicate.yaml", "duplicate.yaml: " + DUPLICATE),
    ("layers.yaml", "config: models.tiny-gpt2.config.n_layer: -1 is less than the minimum of 1"),
    ("seq-len.yaml", "config: extract.seq_len: 1000000000 is greater than the maximum of 1048576"),
    ("shard-size.yaml", "config: extract.shard_size: 1000000000 is greater than the maximum of 1000000"),
    ("max-tokens.yaml", "config: perplexity.max_tokens: 1000000000000 is greater than the maximum of 100000000"),
    ("max-length.yaml", "config: perplexity.max_length: 1000000000 is greater than the maximum of 1048576"),
    ("heads.yaml", "random-init: transformers refuses the gpt2 config {'n_head': 3}: `embed_dim` must be divisible"),
])
def test_a_config_mistake_is_one_line_naming_the_key(inside, config, message):
    assert_refused(["download", "--config", config, "--resources", "res", "--model", "tiny-gpt2"], message,
                   root=inside)


def test_a_duplicate_key_anywhere_kvcore_reads_yaml_is_refused(inside):
    from kvcore.errors import UsageError
    from kvcore.inputs import parse_yaml

    assert_refused(["metrics", "run/kv/part-00000.safetensors", "--method", "q", "--param", "bits={a: 1, a: 2}"],
                   "--param bits: duplicate key 'a' at line 1", root=inside)
    # merge keys (<<) may override what they merge; that is not a duplicate
    assert parse_yaml("base: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "c": {"x": 2}}
    with pytest.raises(UsageError, match="duplicate key 'x' at line 3 .first at line 2."):
        parse_yaml("m:\n  x: 1\n  x: 2\n", "c.yaml")


def test_the_workflow_refuses_a_duplicate_key_before_any_job(work, tmp_path):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--dry-run", "--directory",
           str(tmp_path), "--configfile", str(work / "duplicate.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "duplicate.yaml: " + DUPLICATE in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# --- (10) extract --out: resumable, never deleting a user's files ---------------------------------------------

def extract(out, *args) -> subprocess.CompletedProcess:
    return kvcore("extract", "--model", "m", "--prompt", "a b c", "--out", out, *args)


def test_extract_refuses_a_directory_holding_user_files_even_with_overwrite(inside):
    (inside / "mine").mkdir()
    (inside / "mine" / "notes.txt").write_text("keep me\n")
    (inside / "mine" / "kv").mkdir()
    try:
        for args in ([], ["--overwrite"]):
            assert_refused(["extract", "--model", "m", "--prompt", "hi", "--out", "mine", *args],
                           "--out mine is not a kvcore run directory (it holds notes.txt); nothing was deleted",
                           root=inside)
        assert_refused(["extract", "--model", "m", "--prompt", "hi", "--out", "x.parquet"],
                       "--out x.parquet is not a directory", root=inside)
        # a run whose kv/ is a link to the user's directory: the link is not a run's file
        shutil.copytree("run", "linked")
        shutil.rmtree("linked/kv")
        (inside / "linked" / "kv").symlink_to(inside / "mine")
        assert_refused(["extract", "--model", "m", "--prompt", "hi", "--out", "linked", "--overwrite"],
                       "--out linked is not a kvcore run directory (it holds kv)", root=inside)
    finally:
        shutil.rmtree(inside / "mine")
        shutil.rmtree(inside / "linked", ignore_errors=True)


def test_extract_replaces_a_complete_run_only_with_overwrite(inside):
    shutil.copytree("run", "again")
    try:
        assert_refused(["extract", "--model", "m", "--prompt", "hi", "--out", "again"],
                       "--out again already holds a complete run; pass --overwrite", root=inside)
        done = extract("again", "--overwrite")
        assert done.returncode == 0, done.stderr
        assert (inside / "again" / "metadata.json").is_file()
    finally:
        shutil.rmtree(inside / "again")


def test_a_failed_extract_leaves_nothing_and_its_retry_runs(inside, monkeypatch):
    import kvcore.storage
    from kvcore.errors import KvcoreError

    before = snapshot(inside)
    real = kvcore.storage.finalize_run

    def fail(*args, **kwargs):  # every shard is written by now; the run is not complete
        raise KvcoreError("injected failure")

    monkeypatch.setattr(kvcore.storage, "finalize_run", fail)
    done = extract("new")  # its progress bars are on stderr too: the last line is the error
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == "kvcore: error: injected failure", done.stderr
    assert snapshot(inside) == before and not list(inside.glob(".new*"))
    monkeypatch.setattr(kvcore.storage, "finalize_run", real)
    try:
        assert extract("new").returncode == 0
        # an unfinished run (no metadata.json, a killed writer's debris) is replaced without asking
        (inside / "new" / "metadata.json").unlink()
        (inside / "new" / ".tokens.parquet.tmp-x").write_text("debris")
        done = extract("new")
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in (inside / "new").iterdir()) == sorted(p.name for p in (inside / "run").iterdir())
    finally:
        shutil.rmtree(inside / "new", ignore_errors=True)


# --- (11) file modes --------------------------------------------------------------------------------------------

def test_prepared_models_and_written_tensors_are_readable_by_everyone(tmp_path):
    import torch

    from kvcore.sources import prepare_model
    from kvcore.tensorfile import save_tensors

    umask = os.umask(0o022)
    try:
        out = prepare_model("m", {"source": "random-init", "architecture": "gpt2", "config": {"n_layer": 1}},
                            tmp_path / "models" / "m")
        save_tensors({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*out.iterdir(), tmp_path / "t.safetensors"]}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {"0o644"}, modes
