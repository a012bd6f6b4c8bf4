"""Give each job its own GPU on a multi-GPU host, before CUDA starts.

Snakemake counts GPUs (`--resources gpu=2`) but does not say *which* GPU a job gets, so
two extraction shards started together would both land on device 0. A job therefore
claims a free device itself: one lock file per GPU, held with `fcntl.flock` for as long
as the job runs, then `CUDA_VISIBLE_DEVICES` is set to that device so the job's CUDA
context only ever sees it (as `cuda:0`).

    from kvcore.gpus import claim_gpu

    with claim_gpu() as gpu:        # "3", or None on a machine without GPUs
        model = load_model(...)     # CUDA starts here, on the claimed device only

* The candidates are the devices in `CUDA_VISIBLE_DEVICES` when it is set (SLURM sets it
  to the job's allocation, a user may narrow it), else every `/dev/nvidia<N>` (or
  `nvidia-smi -L`). Nothing here initialises CUDA.
* A lock is a kernel `flock`, so a job that is killed (even SIGKILL) releases its GPU at
  once; no stale lock survives a crash.
* Locks live in `$KVCORE_GPU_LOCK_DIR`, default `/tmp/kvcore-gpu-locks-<uid>`: local to
  the host, as GPUs are.
* When every candidate is taken the claim waits: with `--resources gpu=N` above the GPU
  count, jobs import while another holds the GPU, then queue here (kvcore.jobs.run_job waits
  as long as it takes; `timeout` seconds, then KvcoreError, for a caller that may not wait).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from kvcore.errors import KvcoreError

ENV_LOCK_DIR = "KVCORE_GPU_LOCK_DIR"


def default_lock_dir() -> Path:
    return Path(os.environ.get(ENV_LOCK_DIR) or Path(tempfile.gettempdir()) / f"kvcore-gpu-locks-{os.getuid()}")


def visible_gpus() -> list[str]:
    """Device ids a job may claim, without initialising CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    nodes = sorted((p.name[len("nvidia"):] for p in Path("/dev").glob("nvidia[0-9]*")), key=int)
    if nodes:
        return nodes
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return re.findall(r"^GPU (\d+):", out, flags=re.M)
    return []


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _try_lock(path: Path):
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


@contextlib.contextmanager
def claim_gpu(timeout: float | None = 3600.0, lock_dir: str | os.PathLike | None = None,
              poll: float = 0.1) -> Iterator[str | None]:
    """Hold one free GPU for the duration of the block; yield its id (None without GPUs).
    `timeout` None: wait as long as it takes. `poll`: how often a waiting claim tries the locks
    (a freed GPU sits idle up to that long).

    Sets CUDA_VISIBLE_DEVICES to the claimed id inside the block and restores it after.
    """
    candidates = visible_gpus()
    if not candidates:
        yield None
        return
    if _cuda_started():
        raise RuntimeError("claim_gpu() must run before CUDA is initialised in this process")
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    held = None
    while held is None:
        for gpu in candidates:
            fh = _try_lock(lock_dir / f"gpu-{gpu}.lock")
            if fh is not None:
                held = (gpu, fh)
                break
        else:
            if deadline is not None and time.monotonic() >= deadline:
                raise KvcoreError(f"no free GPU among {','.join(candidates)} after {timeout:.0f}s "
                                  f"(locks in {lock_dir}); run fewer GPU jobs at once (--resources gpu=N)")
            time.sleep(poll)
    gpu, fh = held
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield gpu
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        fh.close()  # releases the flock
