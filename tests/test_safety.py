"""Nothing a user types may delete their files, escape the query sandbox or take the machine down.

One table per class of fault (issue: 306 faults injected as a hostile or careless user):
outputs that would destroy something, unbounded resources, links and manifest entries
leading out of a run, writes through the Python API, wrong-shape run files, and the
grid/verb mistakes. Everything runs on a synthetic run under a temporary directory.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcore.cli import main
from kvcore.errors import KvcoreError, UsageError

SLOW_SQL = "SELECT count(*) FROM kv a, kv b, kv c, kv d WHERE hash(a.pos, b.pos, c.pos, d.pos) = 0"  # hours


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finalized synthetic run (2 shards) with a ppl and a compress result, never modified."""
    from kvcore.query.synthetic import write_synthetic_run

    run = tmp_path_factory.mktemp("pristine") / "results" / "synthetic" / "random"
    write_synthetic_run(run, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=8, n_sequences=6, seq_len=16,
                        shard_size=3, vocab=50)
    for kind in ("ppl", "compress"):
        (run / kind).mkdir()
        (run / kind / "int4-g64.json").write_text(json.dumps({"method": "int4-g64", "compression_ratio": 3.5}))
    return run


@pytest.fixture
def run(pristine, tmp_path):
    copy = tmp_path / "results" / "synthetic" / "random"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


@pytest.fixture
def shard(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {f"layer_{i}_{k}": torch.randn(1, 2, 64, 64, generator=g).half() for i in range(2)
               for k in ("key", "value")}
    meta = {"model": "m", "dataset": "d", "num_layers": "2", "num_kv_heads": "2", "num_heads": "4",
            "head_dim": "64", "seq_len": "64", "dtype": "float16", "seq_ids": "[0]", "seq_lengths": "[64]"}
    path = tmp_path / "in" / "part-00000.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata=meta)
    return path


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcore: error: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink() or p.is_dir() or p.read_bytes())
            for p in sorted(root.rglob("*"))}


# ---- 1. outputs never delete to make room ---------------------------------------------------------------------

@pytest.fixture
def precious(tmp_path):
    """A user's directory of work: it must survive every command below."""
    d = tmp_path / "work"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("precious")
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return d


OUTPUT_CASES = [  # (argv, what is refused); {run} {shard} {dir} are filled in
    (["query", "{run}", "--list-tokens", "--export-csv", "{dir}"], "existing directory"),
    (["query", "{run}", "--list-tokens", "--export-parquet", "{dir}"], "existing directory"),
    (["query", "{run}", "--list-tokens", "--export-csv", "{run}/kv/layer=0/data.parquet"], "inside"),
    (["query", "{run}", "--list-tokens", "--export-csv", "{run}/mine.csv"], "inside"),
    (["query", "{run}", "--list-tokens", "--export-csv", "{run}/../../x.csv", "--export-parquet",
      "{run}/../../x.csv"], "same file"),
    (["compress", "{shard}", "{dir}", "--method", "int4-g64"], "existing directory"),
    (["compress", "{shard}", "{shard}", "--method", "int4-g64"], "would overwrite the input"),
    (["compress", "{shard}", "{run}/kv/part-00000.safetensors", "--method", "int4-g64"], "would overwrite the extracted run"),
    (["compress", "{shard}", "{dir}/../c.safetensors", "--method", "int4-g64", "--metrics", "{dir}"], "existing directory"),
    (["decompress", "{shard}", "{dir}"], "existing directory"),
    (["validate", "--quick", "--method", "int4-g64", "--out", "{dir}"], "existing directory"),
    (["tasks", "plot", "{dir}/notes.txt", "--out", "{dir}/notes.txt"], "would overwrite the input"),
]


@pytest.mark.parametrize("argv, refused", OUTPUT_CASES, ids=[" ".join(c[0][:2] + c[0][-2:-1]) for c in OUTPUT_CASES])
def test_an_output_never_replaces_a_directory_an_input_or_a_run_file(argv, refused, run, shard, precious, capsys):
    before, run_before = snapshot(precious), snapshot(run)
    argv = [a.format(run=run, shard=shard, dir=precious) for a in argv]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and refused in one_error_line(err)
    assert snapshot(precious) == before and snapshot(run) == run_before
    assert not list(precious.parent.glob(".*tmp-*")) and not list(run.rglob(".*tmp-*"))  # no debris


def test_export_to_dot_inside_a_directory_keeps_every_file(run, precious, capsys, monkeypatch):
    monkeypatch.chdir(precious)
    before = snapshot(precious)
    code, _, err = cli(capsys, "query", run, "--list-tokens", "--export-csv", ".")
    assert code == 2 and "existing directory" in one_error_line(err)
    assert snapshot(precious) == before


def test_a_named_file_is_replaced_atomically_and_an_empty_directory_target_is_kept_safe(run, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    out.write_text("old")
    code, _, err = cli(capsys, "query", run, "--list-tokens", "--export-csv", out)
    assert code == 0 and csv_rows(out.read_text())[0][:2] == ["model", "dataset"] and "wrote" in err
    from kvcore.atomic import atomic_path

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="existing directory"), atomic_path(empty) as tmp:
        tmp.write_text("a file never lands on a directory")
    assert empty.is_dir() and not list(tmp_path.glob(".empty.tmp-*"))


# ---- 2./3. threads, memory, spill and time are bounded; Ctrl-C stops a query -------------------------------

@pytest.mark.parametrize("option, value, fragment", [
    ("--threads", "100000", "--threads must be a whole number from 1 to"),
    ("--threads", "0", "--threads must be a whole number from 1 to"),
    ("--timeout", "0", "--timeout must be a number of seconds above 0"),
    ("--timeout", "nan", "--timeout must be a number of seconds above 0"),
    ("--timeout", "-5", "--timeout must be a number of seconds above 0"),
    ("--memory-limit", "lots", "--memory-limit must be a size such as 4GB"),
    ("--memory-limit", "1KB", "--memory-limit must be a size such as 4GB"),
    ("--memory-limit", "1000TB", "--memory-limit must be a size such as 4GB"),
])
def test_limits_out_of_range_are_one_line(option, value, fragment, run, capsys):
    code, _, err = cli(capsys, "query", run, "--info", option, value)
    assert code == 2 and fragment in one_error_line(err)


def test_the_connection_is_bounded_and_spills_outside_the_working_directory(run, tmp_path, monkeypatch):
    import kvcore
    from kvcore.query.limits import cores, total_memory

    monkeypatch.chdir(tmp_path)
    with kvcore.open_run(run, memory_limit="25%") as r:
        spill = r._spill  # noqa: SLF001 - the test inspects where DuckDB spills
        settings = dict(r._con.execute(  # noqa: SLF001
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('threads', 'memory_limit', "
            "'temp_directory')").fetchall())
        assert int(settings["threads"]) == cores()
        assert settings["temp_directory"] == str(spill) and spill.is_dir()
        assert not str(spill).startswith(str(tmp_path))
        limit_gib = float(settings["memory_limit"].split()[0])
        assert abs(limit_gib * 2**30 - 0.25 * total_memory()) / total_memory() < 0.02, settings
    assert not spill.exists() and not (tmp_path / ".tmp").exists()


def test_output_cut_short_by_the_reader_ends_quietly(run):
    """`kvcore query ... | head`: a closed pipe is the reader's choice, not an error."""
    query = subprocess.Popen([sys.executable, "-m", "kvcore", "query", str(run), "--format", "csv",
                              "--sql", "SELECT a.pos, b.pos FROM kv a, kv b"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    query.stdout.read(100)
    query.stdout.close()  # like `head -c 100`: far less than the ~1 MB the query prints
    _, err = query.communicate(timeout=60)
    assert query.returncode == 0 and err.decode() == ""


def test_a_run_never_closed_still_removes_its_spill_directory(run):
    import gc

    import kvcore

    r = kvcore.open_run(run)
    spill = r._spill  # noqa: SLF001 - the test inspects where DuckDB spills
    assert spill.is_dir()
    del r
    gc.collect()
    assert not spill.exists()


def test_a_query_past_its_time_limit_stops_with_one_line(run, capsys):
    start = time.monotonic()
    code, _, err = cli(capsys, "query", run, "--sql", SLOW_SQL, "--timeout", "0.5")
    assert time.monotonic() - start < 5
    assert code == 1 and "time limit of 0.5 s" in one_error_line(err)


def test_the_time_limit_covers_streamed_exports_and_the_api(run, tmp_path):
    import kvcore
    from kvcore.query.limits import QueryStopped

    with kvcore.open_run(run, timeout=0.3) as r:
        for attempt in (lambda: r.sql(SLOW_SQL), lambda: r.execute(SLOW_SQL).fetchall(),
                        lambda: r.reader(SLOW_SQL).read_all()):
            start = time.monotonic()
            with pytest.raises(QueryStopped):
                attempt()
            assert time.monotonic() - start < 3
        assert r.sql("SELECT count(*) AS n FROM tokens").n[0] == 6 * 16  # still usable afterwards


def test_ctrl_c_stops_a_query_within_a_second_with_one_line(run):
    proc = subprocess.Popen([sys.executable, "-m", "kvcore", "query", str(run), "--sql", SLOW_SQL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.parent)
    time.sleep(4)  # past start-up (imports, views): the query itself is running
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 1.0
    assert proc.returncode == 130 and err.strip() == "kvcore: interrupted", err


# ---- 4. links and manifest entries that lead out of the run ------------------------------------------------

def _link_out(run, secret):
    (run / "ppl" / "evil.json").symlink_to(secret)


def _stats_link_out(run, secret):
    (run / "stats").mkdir(exist_ok=True)
    (run / "stats" / "evil.parquet").symlink_to(secret)


def _manifest_escape(run, secret):
    path = run / "shards" / "kv-00001.json"
    m = json.loads(path.read_text())
    m["files"][0] = "kv/layer=0/../../../../../elsewhere/kv/layer=0/part-00001.parquet"
    path.write_text(json.dumps(m))


def _manifest_absolute(run, secret):
    path = run / "shards" / "kv-00001.json"
    m = json.loads(path.read_text())
    m["files"][0] = str(secret)
    path.write_text(json.dumps(m))


def _metadata_escape(run, secret):
    path = run / "metadata.json"
    m = json.loads(path.read_text())
    m["files"][0] = "kv/layer=0/../../../../../elsewhere/kv/layer=0/data.parquet"
    path.write_text(json.dumps(m))


def _tokens_link_out(run, secret):
    (run / "tokens.parquet").unlink()
    (run / "tokens.parquet").symlink_to(secret)


@pytest.mark.parametrize("plant, fragment", [
    (_link_out, "outside the run directory"), (_stats_link_out, "outside the run directory"),
    (_manifest_escape, "leaves the run directory"), (_manifest_absolute, "leaves the run directory"),
    (_metadata_escape, "leaves the run directory"), (_tokens_link_out, "outside the run directory"),
])
def test_paths_leading_out_of_the_run_are_refused(plant, fragment, run, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    plant(run, secret)
    code, out, err = cli(capsys, "query", run, "--sql", f"SELECT * FROM read_text('{secret}')")
    assert code == 1 and fragment in one_error_line(err) and "hunter2" not in out + err


def test_a_link_inside_the_run_to_its_own_file_is_read(run, capsys):
    (run / "ppl" / "alias.json").symlink_to(run / "ppl" / "int4-g64.json")
    code, out, _ = cli(capsys, "query", run, "--sql", "SELECT method FROM ppl ORDER BY method", "--format", "csv")
    assert code == 0 and csv_rows(out) == [["method"], ["alias"], ["int4-g64"]]


# ---- 5. the Python API cannot write --------------------------------------------------------------------------

def test_the_python_api_has_no_path_to_write(run):
    import kvcore

    target = run / "ppl" / "int4-g64.json"
    before = target.read_text()
    with kvcore.open_run(run) as r:
        result = r.execute("SELECT 1 AS x")
        for name in ("query", "create_view", "execute", "sql", "insert_into", "to_csv", "write_csv", "to_table"):
            assert not hasattr(result, name), name
        assert result.fetchall() == [(1,)]
        for sql in (f"COPY (SELECT 1) TO '{target}'", "CREATE VIEW kv AS SELECT 1",
                    "CREATE OR REPLACE VIEW kv AS SELECT 1", "SET enable_external_access = true",
                    f"ATTACH '{run}/x.db'", "SELECT 1; COPY (SELECT 2) TO 'x.csv'"):
            with pytest.raises(KvcoreError):
                r.sql(sql)
        assert r.sql("SELECT count(*) AS n FROM kv").n[0] > 1
    assert target.read_text() == before


# ---- 6./7. wrong-shape, missing and unreadable run files ---------------------------------------------------------

def _write(rel, text):
    def plant(run):
        (run / rel).write_text(text)
    return plant


def _drop_shard(run):
    (run / "shards" / "kv-00001.json").unlink()


def _manifest_without_files(run):
    path = run / "shards" / "kv-00000.json"
    m = json.loads(path.read_text())
    del m["files"]
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("plant, fragment", [
    (_write("metadata.json", "[]"), "metadata.json is a JSON list, expected an object"),
    (_write("metadata.json", "{not json"), "unreadable metadata.json"),
    (_write("shards/kv-00000.json", "[1, 2]"), "the shard manifest is a JSON list"),
    (_manifest_without_files, "not a shard manifest"),
    (_drop_shard, "missing: shards/kv-00001.json"),
])
def test_wrong_shape_or_missing_run_files_are_one_line(plant, fragment, run, capsys):
    plant(run)
    code, _, err = cli(capsys, "query", run, "--sql", "SELECT count(*) FROM kv")
    assert code == 1 and fragment in one_error_line(err)


def test_one_unreadable_result_json_leaves_the_other_views_open(run, capsys):
    (run / "ppl" / "broken.json").write_bytes(b"\xff\xfe{")
    code, out, err = cli(capsys, "query", run, "--sql", "SELECT count(*) AS n FROM kv", "--format", "csv")
    assert code == 0 and csv_rows(out)[1] == [str(6 * 16 * 2 * 2)]
    assert err.startswith("kvcore: warning: ") and "broken.json" in err and err.count("\n") == 1
    code, out, _ = cli(capsys, "query", run, "--sql", "SELECT method FROM ppl", "--format", "csv")
    assert code == 0 and csv_rows(out) == [["method"], ["int4-g64"]]


@pytest.mark.parametrize("argv", [["--sql", "SELECT '\udcff'"], ["--sql", b"SELECT \xc3\x28".decode(errors="surrogateescape")]])
def test_sql_that_is_not_utf8_is_one_line(argv, run, capsys):
    code, _, err = cli(capsys, "query", run, *argv)
    assert code == 1 and "not valid UTF-8" in one_error_line(err)


def test_shell_input_that_is_not_utf8_is_one_line(run):
    proc = subprocess.run([sys.executable, "-m", "kvcore", "query", str(run), "--shell"],
                          input=b"SELECT '\xff';\nSELECT 41 + 1 AS answer;\n", capture_output=True, cwd=run.parent)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "42" in proc.stdout.decode()
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "Traceback" not in err


# ---- 12./13. the README's grid example and verbs given 0 -------------------------------------------------------

def test_the_grid_with_ppl_and_compress_json_opens(run, tmp_path, capsys):
    shutil.copytree(run, tmp_path / "results" / "synthetic" / "other")
    for meta_path in [tmp_path / "results" / "synthetic" / "other" / "metadata.json"]:
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "dataset": "other"}))
    code, out, err = cli(capsys, "query", tmp_path / "results", "--sql",
                         "SELECT dataset, method FROM ppl ORDER BY dataset", "--format", "csv")
    assert code == 0, err
    assert csv_rows(out) == [["dataset", "method"], ["other", "int4-g64"], ["random", "int4-g64"]]
    assert cli(capsys, "query", tmp_path / "results", "--info")[0] == 0


def test_result_jsons_with_only_a_method_or_their_own_filename_key_open(run, capsys):
    (run / "ppl" / "bare.json").write_text(json.dumps({"method": "bare"}))
    (run / "ppl" / "named.json").write_text(json.dumps({"method": "named", "filename": "x.json", "delta": 1.5}))
    code, out, err = cli(capsys, "query", run, "--sql", "SELECT method, filename, delta FROM ppl ORDER BY method",
                         "--format", "csv")
    assert code == 0, err
    assert csv_rows(out) == [["method", "filename", "delta"], ["bare", "", ""], ["int4-g64", "", ""],
                             ["named", "x.json", "1.5"]]
    (run / "ppl" / "named.json").unlink()
    (run / "ppl" / "int4-g64.json").write_text(json.dumps({"method": "int4-g64"}))
    code, out, _ = cli(capsys, "query", run, "--sql", "SELECT * FROM ppl ORDER BY method", "--format", "csv")
    assert code == 0 and csv_rows(out) == [["model", "dataset", "method"], ["synthetic", "random", "bare"],
                                           ["synthetic", "random", "int4-g64"]]


@pytest.mark.parametrize("argv, header", [(["--layer-summary", "0"], "head"), (["--token-summary", "0"], "layer")])
def test_verbs_given_zero_run_that_verb(argv, header, run, capsys):
    code, out, _ = cli(capsys, "query", run, *argv, "--format", "csv")
    assert code == 0 and header in csv_rows(out)[0] and "n_shards" not in out
