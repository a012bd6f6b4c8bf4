"""Hypothesis against the two things users type: the workflow config and `kvcore query` arguments.

Whatever they type, kvcore answers with a result or one clear line (KvcoreError /
UsageError, exit 1 or 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from kvcore.errors import KvcoreError

BASE_CONFIGS = [yaml.safe_load((REPO / name).read_text()) for name in ("configs/tiny-test.yaml", "config.yaml")]
KEYS = ["models", "datasets", "extract", "perplexity", "methods", "source", "family", "bits", "seq_len", "stride",
        "max_length", "shard_size", "architecture", "path", "sha256", "device", "dtype", "threshold", "shards",
        "max_tokens", "x", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["cpu", "cuda:0", "float16", "int4", "none", "random"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _paths(child, (*prefix, i))


@st.composite
def mutated_configs(draw):
    config = copy.deepcopy(draw(st.sampled_from(BASE_CONFIGS)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(config))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if op == "replace":
                config = draw(values)
            continue
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(values)
        if not isinstance(config, dict):
            break
    return config


@settings(max_examples=60, deadline=None)
@given(mutated_configs())
def test_any_config_is_accepted_or_refused_in_one_line(config):
    from kvcore.config import check, explain

    try:
        check(config)
    except KvcoreError as error:
        assert "\n" not in str(error).strip(), str(error)
    else:
        assert explain(config) is None


# --- kvcore query arguments ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from kvcore.query.synthetic import write_synthetic_run

    run = tmp_path_factory.mktemp("fuzzrun") / "results" / "synthetic" / "random"
    write_synthetic_run(run, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=8, n_sequences=4, seq_len=8,
                        shard_size=2, vocab=50)
    return run


VERBS = ["--info", "--coordinate", "--list-tokens", "--token-search", "--layer-summary", "--head-summary",
         "--token-summary", "--search-norm", "--nearest", "--sql", "--show-sql", "--explain"]
OPTIONS = ["--seq", "--layer", "--head", "--k", "--by", "--metric", "--model", "--dataset", "--format", "--limit",
           "--threads", "--export-csv", "--export-parquet", "--bogus", "-x"]
SQL = ["SELECT count(*) FROM kv", "SELECT * FROM tokens", "SELECT 1/0", "DROP TABLE kv", "SELEC nonsense",
       "COPY kv TO '/tmp/kvcore-fuzz.csv'", "SELECT * FROM read_csv('/etc/passwd')", "", ";", "PRAGMA version",
       "SELECT layer, avg(key_norm) FROM kv GROUP BY ALL", "INSTALL httpfs", "ATTACH 'x.db'"]
WORDS = st.one_of(st.integers(-5, 40).map(str), st.sampled_from(["key", "value", "cosine", "l2", "json", "csv",
                                                                  "table", "w3", "0.5", "nan", "-1e9", "synthetic",
                                                                  "random", ""]),
                  st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                          max_size=8))


@st.composite
def query_argv(draw, run, out_dir):
    argv = ["query", draw(st.sampled_from([str(run), str(run.parent.parent), str(run / "kv"), "/nonexistent",
                                           str(out_dir)]))]
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(VERBS + OPTIONS))
        argv.append(flag)
        if flag == "--sql":
            argv.append(draw(st.one_of(st.sampled_from(SQL), st.text(max_size=20).filter(lambda s: "\0" not in s))))
        elif flag in ("--export-csv", "--export-parquet"):
            argv.append(str(out_dir / draw(st.sampled_from(["a.csv", "b.parquet", "missing/dir/c.csv"]))))
        elif flag == "--threads":
            argv.append(draw(st.sampled_from(["1", "2", "0", "-1", "x"])))
        else:
            argv += draw(st.lists(WORDS, max_size=3))
    return argv


def _main(argv):
    from kvcore.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # --help / --version
            code = exit_.code or 0
    return code, err.getvalue()


def test_query_arguments_never_escape_as_a_traceback(tiny_run, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fuzzout")

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(query_argv(tiny_run, out_dir))
    def check(argv):
        code, stderr = _main(argv)
        assert code in (0, 1, 2), (argv, code, stderr)
        if code != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("kvcore: error: "), (argv, stderr)

    check()
    assert _main(["query", str(tiny_run), "--sql", "SELECT count(*) AS n FROM kv"])[0] == 0


# --- every subcommand, random argument vectors and random bytes ------------------------------------------------

SUBCOMMANDS = [["download"], ["extract"], ["query"], ["compress"], ["decompress"], ["metrics"], ["validate"],
               ["tasks", "needle"], ["tasks", "local"], ["tasks", "plot"], ["tasks", "table"], ["score"]]
SKIPPED_FLAGS = {"--help", "-h", "--quick", "--shell", "--hub-id"}  # --quick trains nothing but runs a model for
# seconds; --shell reads stdin; --hub-id needs a network. Each is tested on its own elsewhere.


def _flags(command: list[str]) -> list[str]:
    """The options a subcommand's --help lists (its public interface, no argparse internals)."""
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        from kvcore.cli import main

        main([*command, "--help"])
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue())) - SKIPPED_FLAGS)


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory, tiny_run):
    """Every kind of file a user might point a command at, and a directory of their work."""
    import shutil

    root = tmp_path_factory.mktemp("fuzzin")
    rng = __import__("random").Random(0)
    (root / "random.bin").write_bytes(bytes(rng.randrange(256) for _ in range(512)))
    (root / "text.txt").write_text("The quick brown fox.\nThe passkey is 12345.\n")
    shutil.copy(tiny_run / "tokens.parquet", root / "table.parquet")
    (root / "list.json").write_text("[1, 2]")
    (root / "qa.jsonl").write_text('{"context": "a b", "question": "a?", "answers": ["a"]}\n')
    (root / "tiny.yaml").write_text((REPO / "configs" / "tiny-test.yaml").read_text())
    (root / "work").mkdir()
    (root / "work" / "notes.txt").write_text("precious")
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({f"layer_0_{k}": torch.randn(1, 2, 8, 16, generator=g) for k in ("key", "value")},
              str(root / "part-00000.safetensors"),
              metadata={"model": "m", "dataset": "d", "num_layers": "1", "num_kv_heads": "2", "num_heads": "2",
                        "head_dim": "16", "seq_len": "8", "dtype": "float32", "seq_ids": "[0]", "seq_lengths": "[8]"})
    return root


def _tree(root):
    """Size and mtime of every file (Python's own __pycache__ aside: imports may write it)."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))
            if not p.is_symlink() and "__pycache__" not in p.parts}


@st.composite
def any_argv(draw, inputs, run):
    command = draw(st.sampled_from(SUBCOMMANDS))
    flags = _flags(command)
    paths = [str(p) for p in sorted(inputs.iterdir())] + [str(run), str(run / "kv" / "part-00000.safetensors"),
                                                           "/nonexistent/x", ".", "out.csv", "out/sub/o.json"]
    value = st.one_of(st.sampled_from(paths), WORDS, st.sampled_from(
        ["int4-g64", "kivi2-g32", "kvzip-0.5", "baseline", "knorm", "cpu", "float16", "auto", "nan", "inf",
         "-1", "0", "99999999", "0.5", "bits=3", "family=quant", "tiny-gpt2"]),
        st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape").replace("\0", "")))
    argv = list(command) + draw(st.lists(value, max_size=2))
    for _ in range(draw(st.integers(0, 5)) if flags else 0):
        argv.append(draw(st.sampled_from(flags)))
        argv += draw(st.lists(value, max_size=2))
    return argv


def test_every_subcommand_answers_random_arguments_in_one_line_and_writes_only_where_told(
        fuzz_inputs, tiny_run, tmp_path_factory):
    import os

    watched = [fuzz_inputs, tiny_run, REPO / "kvcore", REPO / "configs", REPO / "workflow", REPO / "results"]
    before = [_tree(root) for root in watched]
    home = os.getcwd()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(any_argv(fuzz_inputs, tiny_run))
    def check(argv):
        cwd = tmp_path_factory.mktemp("fuzzcwd")
        os.chdir(cwd)  # relative outputs (out.csv, resources/, results/) land here
        try:
            code, stderr = _main(argv)
        finally:
            os.chdir(home)
        assert code in (0, 1, 2), (argv, code, stderr)
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("kvcore: warning: ")]
        if code != 0:
            assert len(lines) == 1 and lines[0].startswith("kvcore: error: "), (argv, stderr)
            assert not [p for p in cwd.rglob("*") if ".tmp-" in p.name], (argv, list(cwd.rglob("*")))
        assert "Traceback" not in stderr, (argv, stderr)

    check()
    assert [_tree(root) for root in watched] == before  # inputs, the run and the repository untouched
