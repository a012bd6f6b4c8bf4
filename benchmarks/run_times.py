"""Where a finished workflow run's time went: wall and CPU seconds per rule, from its logs.

Wall seconds are each job's `benchmark:` file (`logs/benchmarks/**.tsv`, column `s`); CPU
seconds are the `kvcore: job took … s CPU` line each job's log ends with (kvcore.jobs.run_job;
Snakemake's own `cpu_time` samples every 30 s after the first 30 and misses the rest, so it is
only the fallback). The run's total wall time is Snakemake's first to last log timestamp.

    python benchmarks/run_times.py /tmp/clone            # the directory `make run` ran in
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from datetime import datetime
from pathlib import Path

JOB_LINE = re.compile(r"kvcore: job took ([\d.]+) s wall, ([\d.]+) s CPU")
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", re.M)
RULE_BENCHMARK = re.compile(r"^(?:local)?rule (\w+):$(?:\n {4}.*)*?\n {4}benchmark: (\S+)", re.M)


def job_times(workdir: Path, log_text: str = "") -> dict[str, list[tuple[str, float, float]]]:
    """rule -> [(job, wall s, CPU s)] of every benchmark file under workdir/logs/benchmarks; the
    rule named by Snakemake's log (`log_text`), else the file's first folder."""
    named = {bench: rule for rule, bench in RULE_BENCHMARK.findall(log_text)}
    rules: dict[str, list] = {}
    for tsv in sorted((workdir / "logs" / "benchmarks").rglob("*.tsv")):
        job = tsv.relative_to(workdir / "logs" / "benchmarks").with_suffix("")
        with open(tsv) as fh:
            row = list(csv.DictReader(fh, delimiter="\t"))[-1]
        log = workdir / "logs" / job.with_suffix(".log")
        found = JOB_LINE.search(log.read_text()) if log.is_file() else None
        cpu = float(found[2]) if found else float(row["cpu_time"]) if row["cpu_time"] not in ("", "NA") else 0.0
        rule = named.get(tsv.relative_to(workdir).as_posix(), job.parts[0])
        rules.setdefault(rule, []).append((job.as_posix(), float(row["s"]), cpu))
    return rules


def run_wall(log: Path) -> float | None:
    """Seconds from the first to the last timestamp of a Snakemake log (None without two)."""
    stamps = [datetime.strptime(" ".join(s.split()), "%a %b %d %H:%M:%S %Y") for s in STAMP.findall(log.read_text())]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="the directory the workflow ran in")
    ap.add_argument("--log", type=Path, help="Snakemake's console output (default: the newest .snakemake/log)")
    ap.add_argument("--jobs", action="store_true", help="also list every job")
    args = ap.parse_args()
    logs = sorted((args.workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    log = args.log or (logs[-1] if logs else None)
    rules = job_times(args.workdir, log.read_text() if log else "")
    if not rules:
        sys.exit(f"run_times: error: no benchmark files under {args.workdir / 'logs' / 'benchmarks'}")
    print("| rule | jobs | wall s (sum) | wall s (longest job) | CPU s (sum) |\n|---|---:|---:|---:|---:|")
    for rule, jobs in sorted(rules.items(), key=lambda kv: -sum(j[2] for j in kv[1])):
        print(f"| {rule} | {len(jobs)} | {sum(j[1] for j in jobs):.0f} | {max(j[1] for j in jobs):.0f} "
              f"| {sum(j[2] for j in jobs):.0f} |")
    every = [j for jobs in rules.values() for j in jobs]
    print(f"| all | {len(every)} | {sum(j[1] for j in every):.0f} | | {sum(j[2] for j in every):.0f} |")
    wall = run_wall(log) if log else None
    if wall is not None:
        print(f"\nthe run: {wall:.0f} s wall ({log})")
    if args.jobs:
        for job, wall_s, cpu in sorted(every):
            print(f"  {job}: {wall_s:.1f} s wall, {cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
