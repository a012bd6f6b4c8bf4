"""The tiny workflow on a real one-node SLURM cluster, through snakemake-executor-plugin-slurm.

The test owns its whole cluster: it writes slurm.conf and gres.conf into a temporary
directory, starts munged, slurmctld and slurmd in the foreground as child processes
(its own munge key and socket, free ports, nothing in /etc touched), runs the workflow
with `--profile profiles/slurm`, compares every result with a local run, and stops each
daemon it started by process id.

The node is CPU-only but advertises two GPUs (gres/gpu backed by /dev/null-like
character devices made in the temporary directory), so the profile's GPU request
(`gpu=1` -> `sbatch --gpus=1`) is really scheduled and SLURM really sets
CUDA_VISIBLE_DEVICES; the config keeps the models on the CPU.

Needs root (slurmd runs jobs as the submitting user, munged wants its own key). When
Debian's slurm-wlm/munge or the executor plugin are missing it installs them
(apt-get, pip); it skips only when that is impossible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]  # what slurm-wlm pulls in, minus slurmdbd
PLUGIN = "snakemake-executor-plugin-slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
# How long something took differs run to run; so do the last bits of a perplexity when the job
# has another number of CPU threads (a 1-CPU SLURM job vs a 2-core local run sum in another order).
FLOAT_REL_TOL = 1e-6


def _is_timing(key: str) -> bool:
    return key == "seconds" or key.endswith(("_seconds", "per_second", "_ms"))


def assert_json_equal(a, b, where: str = "") -> None:
    """Equal apart from timings, floats to FLOAT_REL_TOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a if not _is_timing(k)}
        assert keys == {k for k in b if not _is_timing(k)}, where
        for k in keys:
            assert_json_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=FLOAT_REL_TOL) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _install() -> None:
    """Install what is missing, or skip saying why it cannot be."""
    if os.environ.get("KVCORE_SKIP_SLURM"):
        pytest.skip("KVCORE_SKIP_SLURM is set")
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs Linux and root (slurmd, munged)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        if not shutil.which("apt-get"):
            pytest.skip("slurm-wlm/munge are not installed and there is no apt-get to install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.skip(f"cannot install {' '.join(APT_PACKAGES)}: {done.stderr.strip()[-300:]}")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", PLUGIN], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot pip install {PLUGIN}: {done.stderr.strip()[-300:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 256
    return 2048


class Cluster:
    """munged + slurmctld + slurmd on localhost, configured and owned by the test."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    # snakemake-executor-plugin-slurm-jobstep (0.6.1) strips every SLURM_* variable,
                    # SLURM_CONF included, before its nested `srun`; a cluster configured only through
                    # SLURM_CONF then fails with "Could not establish a configuration source". Real
                    # sites use /etc/slurm/slurm.conf; here a wrapper `srun` puts SLURM_CONF back.
                    "PATH": f"{root / 'bin'}:{os.environ.get('PATH', '')}"}

    def write_config(self) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        for d in ("munge-key", "munge-run", "state", "spool", "log", "bin", "dev"):
            (r / d).mkdir()
        key = r / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "munge-key").chmod(0o700)
        for i in range(2):  # two "GPUs": character devices like /dev/null
            os.mknod(r / "dev" / f"fakegpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        srun = r / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)
        self.conf.write_text(f"""\
ClusterName=kvcoretest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge-run' / 'munge.sock'}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_mem_mb()} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={r / 'dev'}/fakegpu[0-1]\n")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  stdin=subprocess.DEVNULL)))

    def start(self) -> None:
        r = self.root
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={r / 'munge-key' / 'munge.key'}",
                               f"--socket={r / 'munge-run' / 'munge.sock'}", f"--pid-file={r / 'munged.pid'}",
                               f"--seed-file={r / 'munge-run' / 'seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait(lambda: (r / "munge-run" / "munge.sock").exists(), "munged socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i"])
        self._start("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait(lambda: self.sinfo() in ("idle", "mixed"), "the node to become idle")

    def sinfo(self) -> str:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return done.stdout.strip()

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted((self.root / "log").glob("*")))

    def jobs(self) -> list[dict]:
        """Every job slurmctld still remembers (MinJobAge=600), as {field: value}."""
        out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=self.env).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        """Stop every daemon this test started, by process id, slurmd first."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def _tiny_config() -> dict:
    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["models"] = {"tiny-gpt2": config["models"]["tiny-gpt2"]}  # 8 jobs instead of 15
    # device auto (the CPU here, as no CUDA starts on the fake GPUs): a cluster run then declares
    # gpu=1 for the model jobs; with device cpu they would ask SLURM for no GPU (jobs.gpu_resource)
    for stage in ("extract", "perplexity"):
        config[stage]["device"] = "auto"
    return config


def _table_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, tensor bytes): the file's bytes apart from the header's key order, which
    safetensors' Rust writer takes from a HashMap and so varies from process to process."""
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def compare_runs(local: Path, other: Path) -> None:
    """Same files; JSON equal apart from timings (floats to FLOAT_REL_TOL); Parquet row-identical;
    safetensors tensor bytes and header identical (the header's key order aside, see safetensors_parts)."""
    results = sorted(p.relative_to(local) for p in (local / "results").rglob("*") if p.is_file())
    assert results == sorted(p.relative_to(other) for p in (other / "results").rglob("*") if p.is_file())
    for rel in results:
        a, b = local / rel, other / rel
        if rel.suffix == ".json":
            assert_json_equal(json.loads(a.read_text()), json.loads(b.read_text()), str(rel))
        elif rel.suffix == ".parquet":
            assert _table_rows(a) == _table_rows(b), rel
        elif rel.suffix == ".safetensors":
            assert safetensors_parts(a) == safetensors_parts(b), rel


def test_the_tiny_workflow_on_a_local_slurm_cluster_matches_a_local_run(tmp_path):
    _install()
    local, remote = tmp_path / "local", tmp_path / "slurm"
    for work in (local, remote):
        work.mkdir()
        (work / "config.yaml").write_text(yaml.safe_dump(_tiny_config(), sort_keys=False))
    # Fixed targets (extraction, perplexity, compression), so rules added to `all` later do not
    # lengthen this test: 8 jobs, 4 levels deep.
    run = "results/tiny-gpt2/random-words"
    base = [*SNAKEMAKE, f"{run}/metadata.json", f"{run}/ppl/baseline.json", f"{run}/compress/baseline.json",
            "--configfile", "config.yaml"]

    # The local run goes alongside: the SLURM run mostly waits between its status checks.
    local_run = subprocess.Popen([*base, "--directory", str(local), "--cores", "2", "--resources", "gpu=1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=local)
    cluster = Cluster(tmp_path / "cluster")
    cluster.write_config()
    try:
        cluster.start()
        # The profile as users run it; only what a 2-core CI runner needs is overridden.
        small = ["--default-resources", "gpu=0", "runtime=10", "mem_mb=500", "cpus_per_task=1",
                 "--set-resources", *[f"{rule}:cpus_per_task=1" for rule in ("tokenize", "extract", "perplexity",
                                                                               "compress")],
                 *[f"{rule}:mem_mb=1000" for rule in ("extract", "perplexity", "compress")],
                 "--set-threads", "tokenize=1", "compress=1"]
        cmd = [*base, "--directory", str(remote), "--profile", str(REPO / "profiles" / "slurm"), *small,
               "--jobs", "4", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
               "--latency-wait", "5"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=remote, env=cluster.env, timeout=900)
        assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{cluster.logs()}"

        jobs = cluster.jobs()
        by_rule = {}
        for job in jobs:
            rule = job.get("Comment", "").removeprefix("rule_").split("_wildcards")[0]
            by_rule.setdefault(rule, []).append(job)
        # one sbatch job per rule instance
        assert len(by_rule.get("extract", [])) == 2, sorted(by_rule)
        assert set(by_rule) == {"download_model", "download_dataset", "tokenize", "extract", "finalize_extraction",
                                "perplexity", "compress"}, sorted(by_rule)
        assert all(j["JobState"] == "COMPLETED" for j in jobs)
        for rule, rule_jobs in by_rule.items():  # GPU rules asked SLURM for a GPU, the others did not
            wants_gpu = rule in ("extract", "perplexity")
            assert all(("gres:gpu:1" in j.get("TresPerJob", "")) == wants_gpu for j in rule_jobs), (rule, rule_jobs)
    finally:
        cluster.stop()
        local_output = local_run.communicate(timeout=900)[0]
    assert all(proc.poll() is not None for _, proc in cluster.procs)
    assert local_run.returncode == 0, local_output[-4000:]
    compare_runs(local, remote)
