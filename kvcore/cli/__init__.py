"""`kvcore` command line: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)` and sets `func` on its parser;
heavy imports (torch, transformers, duckdb) happen inside `func`, so `kvcore --help`
stays instant. User mistakes raise KvcoreError and are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from kvcore.errors import KvcoreError, KvcoreWarning, UsageError, one_line

# Order is the order shown in `kvcore --help`.
COMMANDS = ["download", "extract", "query", "compress", "evaluate", "tasks", "score"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2, the kvcore way."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvcore", description=__doc__.splitlines()[0])
    from kvcore import __version__

    parser.add_argument("--version", action="version", version=f"kvcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kvcore.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kvcore.cli.{name}":
                continue  # sub-command not built yet
            raise
        module.register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, KvcoreWarning):
        print(f"kvcore: warning: {one_line(message)}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KvcoreError as exc:
        print(f"kvcore: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, file too large, permission denied...
        print(f"kvcore: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
