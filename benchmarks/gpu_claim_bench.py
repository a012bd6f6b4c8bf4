"""N GPU jobs started together on one GPU, as Snakemake starts them with `--resources gpu=N`: each
job's imports, its wait for the GPU and how long it held it, and how long the GPU sat idle while a
job held it (nvidia-smi samples), read from the jobs' logs as benchmarks/workflow_bench.py reads them.

Each job is `kvcore.jobs.run_job` on device cuda in a fresh process: it imports torch and
transformers' model code, claims the GPU (kvcore.gpus), then runs `--work` seconds of bfloat16
matrix products, so the GPU is busy from the claim on but for starting CUDA.

    python benchmarks/gpu_claim_bench.py --jobs 4 --work 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_bench import GpuSampler, busy_fraction, gpu_hold, longest_idle  # noqa: E402

JOB = """
import sys, time
from kvcore.jobs import run_job


def work():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + float(sys.argv[2])
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


run_job(sys.argv[1], work, "cuda")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--work", type=float, default=3.0, help="seconds of GPU work per job")
    ap.add_argument("--sample", type=float, default=0.1, help="GPU sampling interval, seconds")
    args = ap.parse_args()
    sampler = GpuSampler(args.sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"job{i}.log" for i in range(args.jobs)]
        started = time.time()
        procs = [subprocess.Popen([sys.executable, "-c", JOB, str(log), str(args.work)]) for log in logs]
        codes = [p.wait() for p in procs]
        wall = time.time() - started
        sampler.stop()
        if any(codes):
            sys.exit(f"gpu_claim_bench: a job failed (exit codes {codes})")
        holds = sorted((gpu_hold(log) for log in logs), key=lambda h: h["claimed"])
    print(f"{args.jobs} jobs started together, {args.work} s of GPU work each: {wall:.1f} s wall\n")
    print("| job (in claim order) | imports (s) | waited (s) | held (s) | longest GPU idle while held (s) | GPU busy while held |\n"
          "|---|---:|---:|---:|---:|---:|")
    for i, h in enumerate(holds):
        idle = longest_idle(sampler.samples, h["claimed"], h["released"], args.sample)
        busy = busy_fraction(sampler.samples, h["claimed"], h["released"])
        print(f"| {i} | {h['imports_s']:.1f} | {h['waited_s']:.1f} | {h['released'] - h['claimed']:.1f} | {idle:.1f} "
              f"| {'' if busy is None else f'{busy:.0%}'} |")
    gaps = [b["claimed"] - a["released"] for a, b in zip(holds, holds[1:])]
    print(f"\nGPU held from {holds[0]['claimed'] - started:.1f} s to {holds[-1]['released'] - started:.1f} s; "
          f"longest stretch held by no job in between: {max([0.0, *gaps]):.2f} s")


if __name__ == "__main__":
    main()
