"""Options shared by sub-commands: the model ones (`add_model_options`) and argparse types for
numeric options, where a value out of range is one usage line naming the range.

`type=int_in(1, 1000)` or `type=float_in(0, 1, low_open=True)`; argparse prefixes the
option, so the user reads e.g. `argument --top-k: must be an integer from 1 to 1000
(got '-1')`, exit 2. Floats must be finite: nan compares false with every bound, so
without the check it would slip through any range. The bounds that also exist in the
workflow config are those of workflow/schemas/config.schema.yaml (a test checks it).
(Not a sub-command: kvcore.cli.COMMANDS lists those.)
"""

from __future__ import annotations

import argparse
import math

# Shared with the config schema (same names, same bounds).
MAX_TOKENS = 100_000_000  # perplexity.max_tokens
MAX_LENGTH = 1_048_576  # perplexity.max_length, stride, extract.seq_len, tasks context lengths
MAX_TOP_K = 1000  # extract.top_k (also bounded by the model's vocabulary)
MAX_NEW_TOKENS = 4096  # tasks.max_new_tokens
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_EXAMPLES = 1_000_000  # tasks n_per_cell, n_examples, random n_documents
MAX_WORDS = 100_000  # random min_words, max_words


def int_in(low: int, high: int):
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high} (got {text!r})")
        return value

    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False):
    """argparse type: a finite number >= low (> low when `low_open`) and <= high when given."""
    above = f"> {low:g}" if low_open else f">= {low:g}"
    valid = f"a finite number {above}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {valid} (got {text!r})")
        return value

    return parse


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --config and --attn-implementation, the same in every command that runs a model."""
    p.add_argument("--model", required=required, metavar="MODEL",
                   help="a model name from --config (prepared under resources/models/ on first use), a model "
                        "directory, or a hub id org/name[@revision] (downloaded once to resources/models/org--name)")
    p.add_argument("--config", default="config.yaml", metavar="YAML",
                   help="config whose models: --model may name (default: config.yaml; not needed for a "
                        "directory or hub id)")
    p.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                   help="attention kernel (default: the model's config entry, else sdpa where transformers "
                        "supports it and eager where it requires it, e.g. Gemma-2)")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of a command that runs a model, auto by default."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype; auto is bfloat16 on a GPU and float32 on the CPU (default auto)")


def model_dir(args):
    """The loadable directory of --model (kvcore.sources.resolve.resolve_model)."""
    from kvcore.sources.resolve import resolve_model

    return resolve_model(args.model, args.config)
