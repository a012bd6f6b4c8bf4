"""Run one workflow job: its output goes to the job's log, a user error to one line.

Workflow scripts stay thin: they read the `snakemake` object and call `run_job` with a
kvcore function. kvcore itself never imports Snakemake.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

from kvcore.errors import KvcoreError, one_line


def run_job(log: str | None, job: Callable[[], object]) -> None:
    """Call `job()` with stdout/stderr appended to `log`; exit 1 with one line on KvcoreError."""
    console = sys.stderr
    sink = open(log, "w") if log else contextlib.nullcontext(sys.stderr)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    with sink as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            job()
        except KvcoreError as error:
            message = f"kvcore: error: {one_line(error)}"
            print(message, file=stream)
            if stream is not console:
                print(message, file=console)
            sys.exit(1)
