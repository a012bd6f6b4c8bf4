"""Progress lines of long jobs (kvcore.progress): throttled, plain lines, in the job's log and on the console."""

from __future__ import annotations

import io
import re
import sys

from kvcore.progress import Progress, duration, each


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_one_line_per_interval_plus_the_last_with_count_rate_and_eta(capsys):
    clock = Clock()
    progress = Progress("perplexity q fake-quant", 10, "windows", every=10.0, clock=clock)
    for _ in range(10):
        clock.now += 3.0  # a window every 3 s: lines at 12 s, 24 s, and the last at 30 s
        progress.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["perplexity q fake-quant: 4/10 windows, 0.333 windows/s, ETA 18s",
                     "perplexity q fake-quant: 8/10 windows, 0.333 windows/s, ETA 6s",
                     "perplexity q fake-quant: 10/10 windows, 0.333 windows/s, done in 30s"]


def test_a_fast_job_writes_only_its_last_line_and_no_carriage_return(capsys):
    assert list(each(range(500), "compress q", "layers")) == list(range(500))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "500/500 layers" in err


def test_inside_a_job_lines_go_to_the_log_and_the_console(tmp_path, monkeypatch):
    from kvcore.jobs import run_job

    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    log = tmp_path / "logs" / "stats" / "m" / "d.log"
    monkeypatch.chdir(tmp_path)
    run_job("logs/stats/m/d.log", lambda: list(each([1, 2, 3], "stats", "tok", jobs_only=True)))
    text, took = log.read_text().splitlines(keepends=True)  # the job's progress, then its time (log only)
    assert text.startswith("stats: 3/3 tok, ") and text.endswith(", done in 0s\n")
    assert re.fullmatch(r"kvcore: job took [\d.]+ s wall, [\d.]+ s CPU, peak RSS \d+ MB\n", took)
    assert console.getvalue() == "kvcore: stats/m/d: " + text  # named by the job's log
    # outside a job, a jobs_only progress stays silent; the others write to stderr
    list(each([1], "stats", "tok", jobs_only=True))
    assert console.getvalue().count("\n") == 1


def test_durations():
    assert [duration(s) for s in (0.4, 12, 144, 3720)] == ["0s", "12s", "2m24s", "1h02m"]


def test_a_job_turns_other_libraries_tqdm_bars_off(tmp_path, monkeypatch):
    """transformers' weight-loading bar is a \\r stream: a job's log gets none (tqdm reads TQDM_DISABLE on import)."""
    import subprocess

    code = ("import sys; from kvcore.jobs import run_job; "
            "run_job(sys.argv[1], lambda: [None for _ in __import__('tqdm.auto').auto.tqdm(range(3), desc='bar')])")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.log")], check=True, cwd=tmp_path)
    assert re.fullmatch(r"kvcore: job took [\d.]+ s wall, [\d.]+ s CPU, peak RSS \d+ MB\n", (tmp_path / "job.log").read_text())
