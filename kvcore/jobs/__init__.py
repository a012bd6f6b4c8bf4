"""Run one workflow job: its output goes to the job's log, a user error to one line.

Workflow scripts stay thin: they read the `snakemake` object and call `run_job` with a
kvcore function. kvcore itself never imports Snakemake.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

from kvcore.errors import KvcoreError, one_line


def run_job(log: str | None, job: Callable[[], object], device: str = "cpu", threads: int | None = None) -> None:
    """Call `job()` with stdout/stderr written to `log`; exit 1 with one line on KvcoreError.

    A job on device "auto" or "cuda" imports torch and transformers' model code, then claims a
    free GPU of this host (kvcore.gpus), waiting for one if need be: jobs started together with
    `--resources gpu=N` land on different GPUs, and with N above the GPU count a job imports while
    another holds the GPU (docs/gpu.md). Its progress lines
    (kvcore.progress) go to the log and to the console, named by the log's path. `threads`
    (the rule's) caps torch's intra-op threads (`torch_threads`). The log ends with the job's
    wall and CPU seconds and its peak RSS (what docs/perplexity.md's run-time table adds up).
    """
    from kvcore.gpus import claim_gpu
    from kvcore.model import import_model_code
    from kvcore.progress import to_console

    # other libraries' tqdm bars (transformers loading weights) would put \r streams in the log; tqdm
    # reads this when it is imported, which in a job happens inside job()
    os.environ.setdefault("TQDM_DISABLE", "1")
    console = sys.stderr
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "w") if log else contextlib.nullcontext(sys.stderr)
    name = Path(log).with_suffix("").as_posix().removeprefix("logs/") if log else "job"
    started, cpu_before = time.perf_counter(), cpu_seconds()
    with sink as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), \
            to_console(console, name):
        try:
            claims = device in ("auto", "cuda")  # an explicit cuda:N is the user's choice
            if claims:  # before the claim, so that the GPU is held only while the job can use it
                import_model_code()
            if threads:
                import torch

                torch.set_num_threads(torch_threads(threads))
            imported = time.perf_counter()
            with claim_gpu(timeout=None) if claims else contextlib.nullcontext() as gpu:
                if gpu is not None:  # in the job's log: which device, and when (benchmarks/workflow_bench.py)
                    print(f"kvcore: claimed GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu}) at {time.time():.2f}, after "
                          f"{imported - started:.1f} s of imports and {time.perf_counter() - imported:.1f} s of "
                          f"waiting", flush=True)
                job()
            if gpu is not None:
                print(f"kvcore: released GPU {gpu} at {time.time():.2f}", flush=True)
            print(f"kvcore: job took {time.perf_counter() - started:.1f} s wall, "
                  f"{cpu_seconds() - cpu_before:.1f} s CPU, peak RSS {peak_rss_mb():.0f} MB", file=stream)
        except (KvcoreError, OSError) as error:  # OSError: disk full, file too large
            message = f"kvcore: error: {one_line(error)}"
            print(message, file=stream)
            if stream is not console:
                print(message, file=console)
            sys.exit(1)


def torch_threads(threads: int) -> int:
    """A job's torch threads: its rule's `threads`, at most the CPUs this process may use (more
    threads than CPUs make each parallel op wait for a descheduled thread)."""
    return max(1, min(int(threads), len(os.sched_getaffinity(0))))


def peak_rss_mb() -> float:
    """This process's peak resident set (MB, the kernel's count: what a sampler can miss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all of its threads) and its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
