"""The whole workflow from an empty results directory: wall time per rule and in total, how
busy the GPU was (in all and in each job that holds it), host peak RSS per job, and a no-op rerun; then
the issue-18 targets.

Runs `snakemake` (this checkout's Snakefile) in a fresh work directory on `--config`, samples
the GPU with `nvidia-smi` every `--sample` seconds while it runs, reads the jobs' start and
finish times from Snakemake's log, when each GPU job held its GPU from the job's log (the
`kvcore: claimed GPU` / `released GPU` lines of kvcore.jobs.run_job) and their peak RSS from the
rules' `benchmark:` files (max_rss, MB: sampled, every second for 30 s, then every 30 s) and from
the job's log (run_job's last line: the kernel's peak, which the target reads too), then runs Snakemake again with nothing to do and times that.

    python benchmarks/workflow_bench.py --config configs/gpu-bench.yaml --workdir /tmp/wf --cores 16 --gpus 4

`--gpus N` is `--resources gpu=N`: N model jobs in flight; on one GPU, one holds it (the lock of
kvcore.gpus) while the others import torch and transformers (docs/gpu.md).

Targets (issue 18, one H200): total <= 3 x the extraction jobs' total (each extract job's wall
less its wait for the GPU) and <= 240 s; no job leaves the GPU idle for more than 5 s at a
stretch while it holds it; host peak RSS of every compress job <= 2 GB; a no-op rerun <= 5 s.
Writes the raw numbers to --json.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_RULES = ("extract", "perplexity", "perplexity_shard", "compress_evict", "tasks")  # rules with resources gpu=1
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
FINISHED = re.compile(r"^Finished job(?:id:)? (\d+)")
LOG = re.compile(r"^\s+log: (\S+)")
CLAIMED = re.compile(r"^kvcore: claimed GPU \S+ .* at ([\d.]+), after ([\d.]+) s of imports and ([\d.]+) s of waiting")
RELEASED = re.compile(r"^kvcore: released GPU \S+ at ([\d.]+)")
PEAK = re.compile(r"^kvcore: job took .* peak RSS (\d+) MB")


class GpuSampler(threading.Thread):
    """(time, utilization %, memory MiB) of GPU 0 every `interval` seconds, from nvidia-smi."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []
        self.started = time.time()
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", f"-lms={int(interval * 1000)}",
                                          "--id=0"], stdout=subprocess.PIPE, text=True)

    def run(self):
        if self.proc is None:
            return
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def parse_jobs(log: str) -> list[dict]:
    """Jobs from Snakemake's log: rule, wildcards, start and finish (epoch seconds, 1 s resolution)."""
    jobs, stamp, pending = {}, None, None
    for line in log.splitlines():
        if m := STAMP.match(line.strip()):
            stamp = datetime.strptime(" ".join(m[1].split()), "%a %b %d %H:%M:%S %Y").timestamp()
        elif m := RULE.match(line.strip()):
            pending = {"rule": m[1], "start": stamp, "wildcards": ""}
        elif pending is not None and (m := JOBID.match(line)):
            jobs[m[1]] = pending
        elif pending is not None and (m := WILDCARDS.match(line)):
            pending["wildcards"] = m[1]
        elif pending is not None and (m := LOG.match(line)):
            pending["log"] = m[1]
        elif m := FINISHED.match(line.strip()):
            if m[1] in jobs:
                jobs[m[1]]["end"] = stamp
    return [j for j in jobs.values() if j.get("end") is not None]


def gpu_hold(job_log: Path) -> dict:
    """When a job held its GPU, from its log: claimed/released (epoch s), its imports and its wait
    (s) before the claim; {} for a job that claimed none."""
    if not job_log.is_file():
        return {}
    hold = {}
    for line in job_log.read_text(errors="replace").splitlines():
        if m := CLAIMED.match(line):
            hold.update(claimed=float(m[1]), imports_s=float(m[2]), waited_s=float(m[3]))
        elif m := RELEASED.match(line):
            hold["released"] = float(m[1])
    return hold if {"claimed", "released"} <= hold.keys() else {}


def log_peak_rss(job_log: Path) -> float | None:
    """The job's own peak RSS (MB; the kernel's count, from run_job's last line), None if not there.
    Snakemake's benchmark samples every second for 30 s, then every 30 s, so it can miss a peak."""
    if not job_log.is_file():
        return None
    found = [float(m[1]) for line in job_log.read_text(errors="replace").splitlines() if (m := PEAK.match(line))]
    return found[-1] if found else None


def longest_idle(samples, start: float, end: float, interval: float) -> float:
    """Longest stretch of 0 % utilization samples inside [start, end] (seconds)."""
    best = run = 0
    for t, util, _ in samples:
        if start <= t <= end:
            run = run + 1 if util == 0 else 0
            best = max(best, run)
    return best * interval


def busy_fraction(samples, start: float, end: float) -> float | None:
    """Fraction of the samples inside [start, end] with the GPU busy (utilization > 0)."""
    inside = [util for t, util, _ in samples if start <= t <= end]
    return sum(1 for u in inside if u > 0) / len(inside) if inside else None


def benchmark_rss(workdir: Path) -> list[dict]:
    """Every benchmark file's wall seconds and max_rss (MB)."""
    out = []
    for path in sorted((workdir / "logs" / "benchmarks").rglob("*.tsv")):
        with open(path) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            rss = rows[-1].get("max_rss", "NA")
            out.append({"file": str(path.relative_to(workdir / "logs" / "benchmarks")),
                        "seconds": float(rows[-1]["s"]), "max_rss_mb": None if rss == "NA" else float(rss)})
    return out


def snakemake(workdir: Path, config: Path, cores: int, gpus: int, log: Path) -> tuple[float, str, int]:
    """(wall seconds, log text, exit code); the log is written to `log` as it comes (kept if killed)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), "--cores", str(cores), "--resources", f"gpu={gpus}"]
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - start, log.read_text(), rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="a new (or empty) directory")
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--sample", type=float, default=0.5, help="GPU sampling interval, seconds")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args()
    if args.workdir.exists() and any(args.workdir.iterdir()):
        sys.exit(f"workflow_bench: error: {args.workdir} is not empty (the run must start from nothing)")
    args.workdir.mkdir(parents=True, exist_ok=True)

    sampler = GpuSampler(args.sample)
    sampler.start()
    wall, log, rc = snakemake(args.workdir, args.config.resolve(), args.cores, args.gpus,
                              args.workdir / "snakemake.log")
    sampler.stop()
    if rc != 0:
        print(log[-4000:])
        sys.exit(f"workflow_bench: snakemake failed (exit {rc}) after {wall:.1f} s")
    noop, noop_log, _ = snakemake(args.workdir, args.config.resolve(), args.cores, args.gpus,
                                  args.workdir / "snakemake-noop.log")

    jobs = parse_jobs(log)
    samples = sampler.samples
    for job in jobs:
        job["seconds"] = job["end"] - job["start"]
        if job["rule"] in GPU_RULES or job["rule"].startswith("extract"):
            job.update(gpu_hold(args.workdir / job["log"]) if job.get("log") else {})
            # the GPU is the job's while it holds the lock (a job that claimed none: its whole run)
            start, end = job.get("claimed", job["start"]), job.get("released", job["end"])
            job["gpu_idle_max_s"] = longest_idle(samples, start, end, args.sample)
            job["gpu_busy"] = busy_fraction(samples, start, end)
    rules: dict[str, list] = {}
    for job in jobs:
        rules.setdefault(job["rule"], []).append(job["seconds"])
    rss = benchmark_rss(args.workdir)
    for row in rss:  # the benchmark file's job log: logs/benchmarks/X.tsv -> logs/X.log
        row["log_peak_rss_mb"] = log_peak_rss(args.workdir / "logs" / Path(row["file"]).with_suffix(".log"))

    print(f"workflow {args.config} from an empty directory: {wall:.1f} s wall, {len(jobs)} jobs; "
          f"no-op rerun {noop:.1f} s ({'nothing to be done' if 'Nothing to be done' in noop_log else 'RAN JOBS'})")
    if samples:
        busy = sum(1 for _, u, _ in samples if u > 0) / len(samples)
        print(f"GPU busy (utilization > 0) in {busy:.0%} of {len(samples)} samples every {args.sample} s; "
              f"peak GPU memory {max(m for *_, m in samples):.0f} MiB")
    print("\n| rule | jobs | seconds each (min-max, from the log) | sum |\n|---|---:|---|---:|")
    for rule, secs in sorted(rules.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {rule} | {len(secs)} | {min(secs):.0f}-{max(secs):.0f} | {sum(secs):.0f} |")
    print("\n| job (benchmark file) | seconds | max RSS MB (sampled) | peak RSS MB (kernel, the job's log) |"
          "\n|---|---:|---:|---:|")
    idle_by_key = {(j["rule"], j["wildcards"]): j.get("gpu_idle_max_s") for j in jobs}
    for row in rss:
        peak = "" if row["log_peak_rss_mb"] is None else f"{row['log_peak_rss_mb']:.0f}"
        print(f"| {row['file']} | {row['seconds']:.1f} | {row['max_rss_mb'] or 0:.0f} | {peak} |")
    print("\n| GPU job | seconds | imports (s) | waiting for the GPU (s) | holding it (s) "
          "| longest GPU idle while holding it (s) | GPU busy while holding it |\n|---|---:|---:|---:|---:|---:|---:|")
    gpu_jobs = [j for j in jobs if "gpu_idle_max_s" in j]
    for job in sorted(gpu_jobs, key=lambda j: j.get("claimed", j["start"])):
        busy = "" if job["gpu_busy"] is None else f"{job['gpu_busy']:.0%}"
        held = f"{job['released'] - job['claimed']:.1f}" if "claimed" in job else ""
        print(f"| {job['rule']} {job['wildcards']} | {job['seconds']:.0f} | {job.get('imports_s', '')} "
              f"| {job.get('waited_s', '')} | {held} | {job['gpu_idle_max_s']:.1f} | {busy} |")
    holds = sorted((j["claimed"], j["released"]) for j in gpu_jobs if "claimed" in j)
    if holds:  # the GPU with no job holding it, between the first claim and the last release
        gaps = [b[0] - max(a[1] for a in holds[:i + 1]) for i, b in enumerate(holds[1:])]
        print(f"\nGPU held by a job from {holds[0][0] - sampler.started:.0f} s to "
              f"{max(h[1] for h in holds) - sampler.started:.0f} s of the run; longest stretch held by none "
              f"in between: {max([0.0, *gaps]):.1f} s")

    # extraction as the old runs timed it (from the job's start), less the time it queued for the GPU
    extract_total = sum(j["seconds"] - j.get("waited_s", 0) for j in jobs if j["rule"] == "extract")
    compress_rss = [max(r["max_rss_mb"] or 0, r["log_peak_rss_mb"] or 0) for r in rss if r["file"].startswith("compress/")]
    worst_idle = max((j["gpu_idle_max_s"] for j in gpu_jobs), default=None)
    targets = [
        (f"total {wall:.0f} s <= 3 x extraction {extract_total:.0f} s = {3 * extract_total:.0f} s",
         wall <= 3 * extract_total),
        (f"total {wall:.0f} s <= 240 s", wall <= 240),
        (f"longest GPU idle while a job holds it {worst_idle} s <= 5 s" if samples else "GPU idle: no nvidia-smi samples",
         bool(samples) and worst_idle is not None and worst_idle <= 5),
        (f"compress jobs' peak RSS {max(compress_rss, default=0):.0f} MB <= 2000 MB",
         bool(compress_rss) and max(compress_rss) <= 2000),
        (f"no-op rerun {noop:.1f} s <= 5 s", noop <= 5),
    ]
    print("\ntargets:")
    for text, ok in targets:
        print(f"  {'HOLDS' if ok else 'MISSES'}  {text}")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "noop_s": noop, "jobs": jobs, "rss": rss,
                                         "gpu_samples": samples, "idle": {str(k): v for k, v in idle_by_key.items()},
                                         "targets": [[t, ok] for t, ok in targets]}, indent=1))


if __name__ == "__main__":
    main()
