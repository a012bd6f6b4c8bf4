"""Line-based progress of long jobs: one line per block of work with its count, rate and ETA.

A workflow job's stdout/stderr go to its log (kvcore.jobs.run_job), which would leave the
console silent for minutes; so run_job names the console it found (`to_console`) and each
progress line goes to the job's stderr (its log) and to that console, prefixed there with the
job's name. Lines are throttled, at most one every `EVERY` seconds per progress plus the
last one, and never use carriage returns, so a log reads as plain lines. Outside a job a
progress writes to stderr, unless it is `jobs_only` (library calls that never showed progress
stay silent for their callers), and nothing is written under `kvcore --quiet` (KVCORE_QUIET=1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

EVERY = 10.0  # seconds between two lines of one progress (the last line always comes)
_console = None  # (stream, job name) while run_job runs a job
QUIET_VARIABLE = "KVCORE_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET_VARIABLE) == "1"


def be_quiet() -> None:
    """No progress or library chatter from here on (this process and its children);
    kvcore's own warnings and errors still print."""
    os.environ[QUIET_VARIABLE] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # also transformers' "Loading weights" bars
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TQDM_DISABLE"] = "1"
    import warnings

    from kvcore.errors import KvcoreWarning

    warnings.filterwarnings("ignore")  # libraries' deprecation notices...
    warnings.filterwarnings("default", category=KvcoreWarning)  # ...but not kvcore's own


@contextlib.contextmanager
def to_console(stream, name: str):
    """While the block runs, progress lines also go to `stream`, as "kvcore: {name}: {line}"."""
    global _console
    previous, _console = _console, (stream, name)
    try:
        yield
    finally:
        _console = previous


def duration(seconds: float) -> str:
    """1h02m, 2m24s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`update(n)` after each block; a line when `every` seconds passed since the last one, or at the end.

    `clock` is injectable so tests need not wait."""

    def __init__(self, label: str, total: int | None, unit: str, *, every: float = EVERY, clock=time.monotonic,
                 jobs_only: bool = False):
        self.label, self.total, self.unit, self.every, self.clock = label, total, unit, every, clock
        self.jobs_only = jobs_only
        self.done = 0
        self.start = self.last = clock()

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        text = f"{self.label}: {count}, {rate:.3g} {self.unit}/s"
        if self.total and self.done >= self.total:
            return f"{text}, done in {duration(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every and not (self.total and self.done >= self.total):
            return
        if (self.jobs_only or quiet()) and _console is None:
            return
        self.last = now
        line = self.line(now)
        print(line, file=sys.stderr, flush=True)
        if _console is not None and _console[0] is not sys.stderr:
            print(f"kvcore: {_console[1]}: {line}", file=_console[0], flush=True)


def each(items, label: str | None, unit: str, *, jobs_only: bool = False):
    """Yield `items` (a sized collection), one progress update after each (no progress when `label` is None)."""
    if label is None:
        yield from items
        return
    progress = Progress(label, len(items), unit, jobs_only=jobs_only)
    for item in items:
        yield item
        progress.update()
