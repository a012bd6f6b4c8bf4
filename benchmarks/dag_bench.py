"""How long Snakemake takes to start and build this workflow's DAG (issue 18: a no-op rerun <= 5 s),
side by side with the floor: Python's own start, and `snakemake -n` on an empty Snakefile.

Every measurement is a fresh process; each repeat runs all of them once, in turn, and the table
gives medians over the repeats. `--checkout DIR` (repeatable; default this checkout) measures
checkouts of kvcore with their own Snakefile, configs and kvcore (PYTHONPATH=DIR), so another
commit, unpacked with `git archive REV | tar -x -C DIR`, is measured in the same run as this one.
Per (checkout, config): `dry run` is `snakemake -n` in an empty directory (the whole DAG, every
job to run); with `--rerun`, the workflow first runs to completion in a directory of its own, then
`no-op rerun` is `snakemake --cores 1` there, which must find nothing to do. With `--workdir DIR`
the directories stay (DIR/run-{i}-{config}, i the checkout's place in the list) and a later
invocation reuses a complete run; copy resources/ into DIR/run-0-config/ first to skip the
downloads of the embedded default.

    nice python benchmarks/dag_bench.py --config configs/tiny-test.yaml config.yaml --repeats 5
    nice python benchmarks/dag_bench.py --config configs/tiny-test.yaml --rerun --checkout . --checkout /tmp/base
    nice python benchmarks/dag_bench.py --config config.yaml --rerun --workdir /tmp/dag-runs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMPTY_SNAKEFILE = "rule all:\n    input: [],\n"


def snakemake(snakefile: Path, workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args]


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(cmd: list[str], workdir: Path, checkout: Path | None = None, expect: str | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of `cmd` run in `workdir` (`python -m` puts the current directory before
    PYTHONPATH: started in a checkout it would import that checkout's kvcore); exits when it fails
    or its output lacks `expect`. On a shared machine the CPU seconds vary less than the wall."""
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else dict(os.environ)
    start, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    seconds = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode != 0 or (expect and expect not in done.stdout + done.stderr):
        sys.exit(f"dag_bench: error: {' '.join(cmd)} (exit {done.returncode}) did not print {expect!r}:\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def measurements(args, root: Path) -> dict[str, tuple]:
    """name -> the arguments of `timed`: (command, work directory, checkout for PYTHONPATH, text its
    output must hold)."""
    floor = root / "empty"
    floor.mkdir(exist_ok=True)
    (floor / "Snakefile").write_text(EMPTY_SNAKEFILE)
    found = {"python -c pass": ([sys.executable, "-c", "pass"], floor),
             "snakemake -n, empty Snakefile (floor)": (snakemake(floor / "Snakefile", floor, "-n"), floor)}
    for i, checkout in enumerate(args.checkout):
        for config in args.config:
            configfile = ["--configfile", str(checkout / config)]
            label = f"{checkout.name} {config}"
            dry = root / f"dry-{i}-{Path(config).stem}"
            dry.mkdir(exist_ok=True)
            found[f"{label}: dry run"] = (snakemake(checkout / "Snakefile", dry, *configfile, "-n", "--cores", "1"),
                                          dry, checkout, "This was a dry-run")
            if args.rerun:
                done = root / f"run-{i}-{Path(config).stem}"
                done.mkdir(exist_ok=True)
                print(f"dag_bench: running {label} to completion in {done} ...", file=sys.stderr, flush=True)
                timed(snakemake(checkout / "Snakefile", done, *configfile, "--cores", str(args.cores),
                                "--resources", "gpu=1"), done, checkout)
                found[f"{label}: no-op rerun"] = (snakemake(checkout / "Snakefile", done, *configfile, "--cores", "1"),
                                                  done, checkout, "Nothing to be done")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["configs/tiny-test.yaml", "config.yaml"],
                    help="config files, relative to each checkout")
    ap.add_argument("--checkout", type=Path, action="append", help="a kvcore checkout (default: this one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rerun", action="store_true", help="also time a no-op rerun after a complete run")
    ap.add_argument("--cores", type=int, default=2, help="cores of the complete run (--rerun)")
    ap.add_argument("--workdir", type=Path, help="keep the work directories here (default: a temporary one); "
                    "a complete run found there is reused")
    args = ap.parse_args()
    args.checkout = [c.resolve() for c in args.checkout or [REPO]]

    with tempfile.TemporaryDirectory(prefix="dag_bench-") as tmp:
        root = args.workdir.resolve() if args.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        found = measurements(args, root)
        seconds = {name: [] for name in found}
        for _ in range(args.repeats):
            for name, measured in found.items():
                seconds[name].append(timed(*measured))

    def median(name, which):
        return statistics.median(run[which] for run in seconds[name])

    floor = [median("snakemake -n, empty Snakefile (floor)", which) for which in (0, 1)]
    print(f"medians of {args.repeats} runs each, taking turns (load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n")
    print("| measurement | wall s | wall min-max s | wall minus the floor s | CPU s | CPU minus the floor s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, runs in seconds.items():
        wall, cpu = median(name, 0), median(name, 1)
        print(f"| {name} | {wall:.2f} | {min(r[0] for r in runs):.2f}-{max(r[0] for r in runs):.2f} | "
              f"{wall - floor[0]:+.2f} | {cpu:.2f} | {cpu - floor[1]:+.2f} |")


if __name__ == "__main__":
    main()
