"""`kvcore query RUN --shell`: an SQL prompt on the read-only views.

Statements end with ';' (or at end of input). Dot commands: .tables, .schema [VIEW],
.format table|json|csv, .help, .quit. Reading from a pipe works the same, without prompts,
so `echo "SELECT count(*) FROM kv;" | kvcore query RUN --shell` is a script.
"""

from __future__ import annotations

import sys

from kvcore.errors import KvcoreError, one_line
from kvcore.query import output
from kvcore.query.printing import show
from kvcore.query.verbs import Query

HELP = """SQL ending with ';' runs on the views: {views}
(and by_layer.kv_L / by_seq.kv_S: the kv rows of one layer / one sequence, faster to query)
.tables              list the views
.schema [VIEW]       columns and types
.format table|json|csv
.help                this text
.quit                leave (or Ctrl-D)"""


class Shell:
    def __init__(self, run, fmt: str = "table", limit: int | None = None, stdin=None, stdout=None, stderr=None):
        self.run, self.fmt, self.limit = run, fmt, limit
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.errors = 0

    def loop(self) -> int:
        if hasattr(self.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the SQL check, not a traceback
            self.stdin.reconfigure(errors="surrogateescape")
        interactive = self.stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
            self.stdout.write(f"kvcore query shell on {self.run.path} (read-only). .help for help\n")
        buffer: list[str] = []
        while True:
            prompt = ("   ...> " if buffer else "kvcore> ") if interactive else ""
            try:
                line = input(prompt) if interactive and self.stdin is sys.stdin else self._readline(prompt)
            except EOFError:
                break
            except KeyboardInterrupt:
                buffer = []
                self.stdout.write("\n")
                continue
            if not buffer and line.strip().startswith("."):
                if not self.command(line.strip()):
                    break
                continue
            if not buffer and not line.strip():
                continue
            buffer.append(line)
            if line.rstrip().endswith(";"):
                self.execute("\n".join(buffer))
                buffer = []
        if buffer and "".join(buffer).strip():
            self.execute("\n".join(buffer))
        if interactive:
            self.stdout.write("\n")
        return 1 if self.errors and not interactive else 0

    def _readline(self, prompt: str) -> str:
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def execute(self, sql: str) -> None:
        try:
            show(self.run, Query(sql), self.fmt, self.limit, self.stdout)
        except KvcoreError as exc:
            self.errors += 1
            self.stderr.write(f"Error: {one_line(exc)}\n")
        except KeyboardInterrupt:  # Ctrl-C stops the statement, not the shell
            self.errors += 1
            self.stderr.write("Error: interrupted\n")

    def command(self, line: str) -> bool:
        """A dot command; False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in (".quit", ".exit", ".q"):
            return False
        if name == ".help":
            self.stdout.write(HELP.format(views=", ".join(self.run.views)) + "\n")
        elif name == ".tables":
            layers = max(int(r.meta["num_layers"]) for r in self.run.runs)
            self.stdout.write("  ".join(self.run.views)
                              + f"  by_layer.kv_0 .. by_layer.kv_{layers - 1}  by_seq.kv_{{seq_id}}\n")
        elif name == ".schema":
            views = [arg] if arg else self.run.views
            for view in views:
                if view not in self.run.views:
                    self.errors += 1
                    self.stderr.write(f"Error: no view {view!r}; views: {', '.join(self.run.views)}\n")
                    continue
                cols = self.run.execute(f"DESCRIBE {view}").fetchall()
                self.stdout.write(f"{view}(" + ", ".join(f"{c[0]} {c[1]}" for c in cols) + ")\n")
        elif name == ".format":
            if arg not in output.FORMATS:
                self.errors += 1
                self.stderr.write(f"Error: .format takes one of {', '.join(output.FORMATS)}\n")
            else:
                self.fmt = arg
        else:
            self.errors += 1
            self.stderr.write(f"Error: unknown command {name}; commands: .tables .schema .format .help .quit\n")
        return True
