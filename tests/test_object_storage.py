"""Results in object storage, for real: a local S3 server (moto), the tiny workflow with
snakemake-storage-plugin-s3, the objects compared with a local run's files, and
`kvcore query s3://...` reading the Parquet in the bucket in place (docs/cluster.md)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.exceptions
import pytest

from conftest import REPO
from kvcore.errors import KvcoreError
from test_workflow import snakemake

BUCKET, PREFIX = "kvcore-test", "tiny"
RUN = "results/tiny-gpt2/random-words"
# One model's extraction, a compression and its perplexity (the whole grid would take minutes):
# the model directory, the Parquet layer files, safetensors and JSON all go through the bucket.
TARGETS = [f"{RUN}/metadata.json", f"{RUN}/compress/kivi4-g32.json", f"{RUN}/ppl/kivi4-g32.json"]
TIMINGS = re.compile(r"seconds|per_second|latency_ratio|time_ms")  # measured: they differ between two runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the AWS_* variables pointing at it; stopped by its pid."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
                env.setenv(name, value)
            client = boto3.client("s3")
            for _ in range(300):
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except botocore.exceptions.EndpointConnectionError:  # not listening yet
                    assert server.poll() is None, log.read_text()
                    time.sleep(0.1)
            else:
                raise AssertionError(f"the moto server did not answer on port {port}: {log.read_text()}")
            yield client
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def objects(client, prefix: str) -> dict[str, bytes]:
    """{key below prefix/: content} of every object there."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            found[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return found


def workdir_with_config(tmp_path_factory, name: str) -> Path:
    work = tmp_path_factory.mktemp(name)
    shutil.copy(REPO / "configs" / "tiny-test.yaml", work / "config.yaml")
    return work


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    work = workdir_with_config(tmp_path_factory, "local")
    snakemake(work, "--", *TARGETS)  # `--`: --resources before takes several values
    return work


@pytest.fixture(scope="module")
def stored(s3, tmp_path_factory):
    """The same targets with every input and output in s3://BUCKET/PREFIX: {key: content}."""
    work = workdir_with_config(tmp_path_factory, "staging")
    # as docs/cluster.md shows it (the plugin's options take several values: the endpoint as --opt=value)
    snakemake(work, "--default-storage-provider", "s3", "--default-storage-prefix", f"s3://{BUCKET}/{PREFIX}",
              f"--storage-s3-endpoint-url={os.environ['AWS_ENDPOINT_URL']}", "--", *TARGETS)
    assert not (work / "results").exists()  # nothing in the working directory: the outputs are in the bucket
    return objects(s3, PREFIX)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMINGS.search(k)}
    return [without_timings(v) for v in value] if isinstance(value, list) else value


def test_the_bucket_holds_exactly_the_local_runs_files(stored, local_run):
    local = {str(p.relative_to(local_run)): p for top in ("results", "resources", "logs")
             for p in (local_run / top).rglob("*") if p.is_file()}
    assert set(stored) == set(local)
    assert any(k.startswith(f"{RUN}/kv/layer=") and k.endswith(".parquet") for k in stored)
    differ = []
    for key, body in stored.items():
        if key.startswith("logs/"):
            continue  # logs and benchmarks hold times
        if key.startswith((f"{RUN}/ppl/", f"{RUN}/compress/")) and key.endswith(".json"):  # speeds differ
            same = without_timings(json.loads(body)) == without_timings(json.loads(local[key].read_text()))
        else:  # Parquet included: the writer embeds nothing run-specific
            same = body == local[key].read_bytes()
        if not same:
            differ.append(key)
    assert differ == []


def kvcore_query(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcore", "query", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


KV_SQL = "SELECT layer, head, seq_id, pos, token, key_norm, value_norm, key, value FROM kv ORDER BY ALL"


def test_kvcore_query_reads_the_parquet_in_the_bucket_in_place(stored, local_run):
    remote = kvcore_query(f"s3://{BUCKET}/{PREFIX}", "--sql", KV_SQL, "--format", "csv")
    here = kvcore_query(str(local_run / RUN), "--sql", KV_SQL, "--format", "csv")
    assert remote.returncode == 0 and here.returncode == 0, remote.stderr + here.stderr
    assert remote.stdout == here.stdout
    assert len(list(csv.reader(io.StringIO(remote.stdout)))) == 1 + 2 * 4 * 6 * 32  # layers x heads x seqs x pos
    info = kvcore_query(f"s3://{BUCKET}/{PREFIX}", "--info", "--format", "json")
    row = json.loads(info.stdout)[0]
    assert row["path"] == f"s3://{BUCKET}/{PREFIX}/{RUN}" and row["n_sequences"] == 6, info.stderr


def test_open_run_on_a_bucket_equals_the_local_run(stored, local_run):
    import kvcore

    with kvcore.open_run(f"s3://{BUCKET}/{PREFIX}/{RUN}") as remote, kvcore.open_run(local_run / RUN) as here:
        assert remote.coordinate(1, 3, 17, seq=5).equals(here.coordinate(1, 3, 17, seq=5))
        assert remote.sql("SELECT method, compressed_perplexity FROM ppl").equals(
            here.sql("SELECT method, compressed_perplexity FROM ppl"))


def copy_run(client, stored: dict[str, bytes], prefix: str, edit=lambda key, body: body) -> None:
    for key, body in stored.items():
        if key.startswith(RUN + "/"):
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=edit(key, body))


def test_only_the_runs_own_keys_are_read(s3, stored):
    import kvcore

    def leave(key, body):  # a manifest that names a file outside its run
        if not key.endswith("shards/kv-00000.json"):
            return body
        manifest = json.loads(body)
        manifest["files"][0] = "../../../elsewhere.parquet"
        return json.dumps(manifest).encode()

    copy_run(s3, stored, "escape", leave)
    s3.put_object(Bucket=BUCKET, Key="escape/results/tiny-gpt2/elsewhere.parquet", Body=stored[f"{RUN}/tokens.parquet"])
    with pytest.raises(KvcoreError, match="leaves the run directory"):
        kvcore.open_run(f"s3://{BUCKET}/escape/{RUN}")
    # a sibling prefix that starts with the run's name is another run, not part of this one
    copy_run(s3, stored, "sibling")
    s3.put_object(Bucket=BUCKET, Key=f"sibling/{RUN}-old/shards/kv-00007.json", Body=b"{}")
    with kvcore.open_run(f"s3://{BUCKET}/sibling/{RUN}") as run:
        assert run.runs[0].n_shards == 2


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcore: error: "), done.stderr
    return lines[0]


def test_a_prefix_without_a_run_or_an_unreachable_bucket_is_one_error_line(stored):
    assert "no object under this prefix" in error_line(kvcore_query(f"s3://{BUCKET}/nothing-here"))
    assert "no such bucket" in error_line(kvcore_query("s3://no-such-bucket/x"))
    assert "not a run directory" in error_line(kvcore_query(f"s3://{BUCKET}/{PREFIX}/logs"))
    closed = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    assert "cannot read the bucket" in error_line(kvcore_query(f"s3://{BUCKET}/{PREFIX}", env=closed))


def test_without_s3fs_the_error_says_what_to_install(monkeypatch, capsys):
    from kvcore.cli import main

    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now raises ImportError
    assert main(["query", f"s3://{BUCKET}/{PREFIX}"]) == 2
    assert "pip install 'kvcore[s3]'" in capsys.readouterr().err
