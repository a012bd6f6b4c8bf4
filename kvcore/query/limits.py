"""What one query may take from the machine: threads, memory, spill space and time.

DuckDB's own defaults suit a database server, not a command a user types: every core (or
as many threads as asked for), 80 % of RAM, spilling into `.tmp` in the working
directory, no time limit, and a Ctrl-C that is noticed only when the Python client gets
round to it. kvcore bounds each of them and stops a query with `connection.interrupt()`,
which DuckDB honours within milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from typing import Iterator

from kvcore.errors import KvcoreError, UsageError

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_FRACTION = 0.5
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class QueryStopped(KvcoreError):
    """A query ended by its time limit."""


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None, name: str = "threads") -> int:
    """DuckDB's thread count: all cores by default; more threads than cores is refused."""
    n = cores()
    if threads is None:
        return n
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= n:
        raise UsageError(f"{name} must be a whole number from 1 to {n} (the cores this machine gives kvcore); "
                         f"got {threads!r}")
    return threads


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit_bytes(limit: str | int | None, name: str = "memory_limit") -> int:
    """A memory limit as bytes: None (half the RAM), a byte count, '4GB', '512MiB' or '25%'."""
    ram = total_memory()
    if limit is None:
        return int(ram * DEFAULT_MEMORY_FRACTION)
    usage = (f"{name} must be a size such as 4GB, 512MiB or 25% (of this machine's "
             f"{ram / 2**30:.1f} GiB), at least 64MiB and at most all of it; got {limit!r}")
    if isinstance(limit, bool):
        raise UsageError(usage)
    if isinstance(limit, int):
        value = limit
    else:
        m = _SIZE.match(str(limit))
        if not m:
            raise UsageError(usage)
        number, unit = float(m[1]), (m[2] or "b").lower()
        value = int(ram * number / 100) if unit == "%" else int(number * _UNITS[unit])
    if not 64 * 2**20 <= value <= ram:
        raise UsageError(usage)
    return value


def check_timeout(timeout: float | None, name: str = "timeout") -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 7 * 86400:
        raise UsageError(f"{name} must be a number of seconds above 0 and at most a week; got {timeout!r}")
    return float(timeout)


class QueryGuard:
    """While a query runs: stop it when its time is up, or on Ctrl-C, within milliseconds.

    DuckDB runs the query in C with the GIL released, so a Python signal handler would run
    only after it finished. Instead a watcher thread waits on the signal wake-up fd (written
    by the C-level handler the moment SIGINT arrives) and on the deadline, and calls
    `interrupt()`. The SIGINT is then raised as KeyboardInterrupt where the query returns.
    """

    def __init__(self, interrupt, timeout_s: float):
        self.interrupt, self.timeout_s = interrupt, timeout_s
        self.active = threading.Lock()  # re-entry (a fetch inside a guarded call) adds no second guard

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.active.acquire(blocking=False):
            yield
            return
        try:
            with self._watch() as why:
                try:
                    yield
                except Exception:
                    if why:  # DuckDB's "Interrupted!" is ours: say why instead
                        break_out(why[0], self.timeout_s)
                    raise
            if why:
                break_out(why[0], self.timeout_s)
        finally:
            self.active.release()

    @contextlib.contextmanager
    def _watch(self) -> Iterator[list]:
        why: list[str] = []
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        in_main = threading.current_thread() is threading.main_thread()  # signals reach only that one
        if in_main:
            old_handler = signal.signal(signal.SIGINT, lambda *_: why.append("interrupt") if not why else None)
            old_fd = signal.set_wakeup_fd(write_fd)
        done = threading.Event()

        def watch():
            import select

            ready, _, _ = select.select([read_fd], [], [], self.timeout_s)
            if done.is_set():
                return
            if not why:
                why.append("interrupt" if ready else "timeout")
            self.interrupt()

        watcher = threading.Thread(target=watch, name="kvcore-query-guard", daemon=True)
        watcher.start()
        try:
            yield why
        finally:
            done.set()
            os.write(write_fd, b"\0")  # wake the watcher so it ends now
            watcher.join()
            if in_main:  # (None: a handler not set from Python, which cannot be put back)
                signal.set_wakeup_fd(old_fd)
                signal.signal(signal.SIGINT, signal.default_int_handler if old_handler is None else old_handler)
            os.close(read_fd)
            os.close(write_fd)


def break_out(why: str, timeout_s: float):
    if why == "interrupt":
        raise KeyboardInterrupt
    raise QueryStopped(f"query stopped after its time limit of {timeout_s:g} s "
                       "(--timeout SECONDS, or open_run(..., timeout=...), raises it)")
