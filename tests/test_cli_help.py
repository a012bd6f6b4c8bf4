"""--help is written for users: every sub-command has a description, every option a help text;
--quiet is accepted before and after the sub-command; the library and CLI work without Snakemake."""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings

from kvcore.cli import build_parser, main, subcommands


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    missing = []
    for command in [parser, *subcommands(parser)]:
        if not command.description:
            missing.append(f"{command.prog}: no description")
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{command.prog} {a.dest}: no help" for a in action._choices_actions if not a.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{command.prog} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, missing
    assert len(subcommands(parser)) >= 10  # the walk found the nested ones (tasks needle, ...)
    assert "hub id org/name[@revision]" in parser.format_help()


def test_quiet_before_and_after_the_command(tiny_models, tmp_path, capsys, monkeypatch):
    from kvcore.progress import QUIET_VARIABLE

    for name in (QUIET_VARIABLE, "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE"):
        monkeypatch.setenv(name, "")  # recorded, so the state before is restored after the test
        monkeypatch.delenv(name)  # (--quiet below sets them in this process)
    extract = ["extract", "--model", str(tiny_models["gpt2"]), "--prompt", "a b c", "--device", "cpu"]
    assert main([*extract, "--out", str(tmp_path / "loud")]) == 0
    assert "extract: 3/3 tok" in capsys.readouterr().err  # kvcore's own progress line
    done = subprocess.run([sys.executable, "-m", "kvcore", *extract, "--out", str(tmp_path / "quiet"), "--quiet"],
                          capture_output=True, text=True)  # a process of its own: as a user runs it
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr and "extract: " not in done.stderr  # no progress...
    assert '"n_sequences": 1' in done.stdout  # ...but the results still print
    with warnings.catch_warnings():  # --quiet also filters warnings: keep that inside this test
        assert main(["--quiet", "query", str(tmp_path / "none")]) == 2
        assert main(["query", str(tmp_path / "none"), "-q"]) == 2
    assert capsys.readouterr().err.count("kvcore: error:") == 2  # errors still show


BLOCK_SNAKEMAKE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "snakemake" or name.startswith("snakemake."):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import kvcore, kvcore.cli, kvcore.config, kvcore.sources.resolve, kvcore.extract, kvcore.compress, kvcore.query
from kvcore.cli import main
try:
    main(["validate", "--help"])
except SystemExit as done:
    assert done.code == 0
print("ok", "snakemake" in sys.modules)
"""


def test_library_and_cli_without_snakemake():
    done = subprocess.run([sys.executable, "-c", BLOCK_SNAKEMAKE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok False")
