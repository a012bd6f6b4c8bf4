"""`kvcore extract`: the KV cache of a few texts into a run directory (outside the workflow)."""

from __future__ import annotations

import json
from pathlib import Path

from kvcore.cli.options import (MAX_EXAMPLES, MAX_SEED, MAX_TOP_K, MAX_WORDS, add_device_options, add_model_options,
                                float_in, int_in, model_dir)
from kvcore.errors import UsageError


def index_list(text: str) -> list[int]:
    """'0,5,7' -> [0, 5, 7] (argparse type: a bad list is one usage line)."""
    import argparse

    try:
        items = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        items = None
    if not items or any(i < 0 for i in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, e.g. 0,5 (got {text!r})")
    return items


DESCRIPTION = """Extract the KV cache of a few texts into a run directory: every layer's keys and values
(safetensors), Parquet rows for `kvcore query`, the next-token predictions and metadata.json.
For the workflow's corpus-scale extraction use `snakemake` (README "Quick start")."""

EPILOG = """examples:
  kvcore extract --model smollm2-135m --prompt "The quick brown fox" --out runs/fox
  kvcore extract --model ./my-model --text-file prompts.txt --out runs/mine
  kvcore extract --model org/name@main --random 20 --random-min 3 --random-max 8 --out runs/random
  kvcore extract --model smollm2-135m --prompt "Hello world" --out runs/hello \\
                 --json hello.json --json-layout seed --temperature 0.8 --seed 1"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser("extract", help="extract the KV cache of prompts, a text file or random text",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable): one sequence each")
    src.add_argument("--text-file", help="a text file: one sequence per non-empty line")
    src.add_argument("--random", type=int_in(1, MAX_EXAMPLES), metavar="N", help="N random word sequences")
    p.add_argument("--random-min", type=int_in(1, MAX_WORDS), default=3, metavar="WORDS",
                   help="fewest words of a --random sequence (default 3)")
    p.add_argument("--random-max", type=int_in(1, MAX_WORDS), default=8, metavar="WORDS",
                   help="most words of a --random sequence (default 8)")
    p.add_argument("--out", required=True,
                   help="run directory to write: new, empty or an unfinished run (a complete one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete run in --out (never a directory holding other files)")
    add_device_options(p)
    p.add_argument("--top-k", type=int_in(1, MAX_TOP_K), default=10,
                   help="next-token predictions kept per sequence (default 10; at most the vocabulary)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0,
                   help="seed of --random and of --temperature's sampling (default 0)")
    j = p.add_argument_group("JSON copy (small inputs only: refused above 2,000,000 cache numbers)")
    j.add_argument("--json", metavar="FILE", help="also write the cache and next token of each text as JSON")
    j.add_argument("--json-layout", choices=["kvcore", "seed"], default="kvcore",
                   help="kvcore: {meta, tokens, prediction, kv_cache.layer_i.head_j.{key, value}}; seed: the seed "
                        "extractor's {model, input_text, input_tokens, predicted_next_token, "
                        "kv_cache.layer_i.head_j.tokens[{token_idx, key, value}], metadata} (default kvcore); "
                        "one text gives one object, several a list")
    j.add_argument("--temperature", type=float_in(0), default=0.0,
                   help="the JSON's next token: 0 takes the most likely (default); T > 0 samples it from the "
                        "top-k at temperature T, seeded by --seed (predictions.parquet keeps the model's "
                        "probabilities)")
    g = p.add_argument_group("what goes to Parquet (the safetensors always hold every layer, head, key and value)")
    g.add_argument("--parquet-layers", type=index_list, metavar="L,L,...",
                   help="only these layers get Parquet rows, e.g. 0,5 (default: all)")
    g.add_argument("--parquet-heads", type=index_list, metavar="H,H,...",
                   help="only these KV heads get Parquet rows (default: all)")
    g.add_argument("--parts", choices=["both", "keys", "values"], default="both",
                   help="keys only or values only leaves the other vector and its norm NULL (default: both)")
    g.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32",
                   help="Parquet vector type; float16 rounds float32 models' vectors and halves their Parquet, "
                        "but a bf16 model's are as small in float32 (benchmarks/README.md); norms stay float32 "
                        "(default: float32)")
    p.set_defaults(func=run)


def _texts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    if args.text_file:
        from kvcore.inputs import read_text

        return [line.strip() for line in read_text(args.text_file, "--text-file").splitlines() if line.strip()]
    from kvcore.sources.datasets import random_documents

    spec = {"n_documents": args.random, "seed": args.seed, "min_words": args.random_min,
            "max_words": args.random_max}
    docs, _ = random_documents(spec, Path("."), Path("."))
    return [text for _, text in docs]


def _json_doc(extractor, texts: list[str], args):
    """What --json writes: one object per text in --json-layout, the object itself for one text."""
    docs = []
    for i, text in enumerate(texts):
        extraction = extractor.extract(text, args.top_k, args.temperature, args.seed + i)
        docs.append(extraction.to_seed_dict() if args.json_layout == "seed" else extraction.to_dict())
    return docs[0] if len(docs) == 1 and args.json_layout == "seed" else docs


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that must not be replaced; what passes is absent, empty or a kvcore run.

    An unfinished run (no metadata.json) is replaced without asking, so a failed extraction
    never blocks its retry; a complete one only with --overwrite. A directory holding any
    file a run does not write is never replaced, with or without --overwrite.
    """
    from kvcore.storage import refuse_foreign_files

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} is not a directory; give a new directory for the run")
    if not out.exists():
        return
    refuse_foreign_files(out, f"--out {out}")
    if (out / "metadata.json").exists() and not overwrite:
        raise UsageError(f"--out {out} already holds a complete run; pass --overwrite to replace it, "
                         f"or choose a new directory")


def run(args) -> int:
    import os
    import tempfile

    from kvcore.atomic import atomic_path, check_output, write_json
    from kvcore.extract import Extractor, check_json_size
    from kvcore.storage import remove_run

    out = Path(args.out)
    check_out(out, args.overwrite)
    if args.json:
        check_output(args.json, "--json", inputs=[p for p in [args.text_file] if p], protected=[out])
    elif args.json_layout != "kvcore" or args.temperature:
        raise UsageError("--json-layout and --temperature shape the JSON copy; give --json FILE too")
    if args.random and args.random_min > args.random_max:
        raise UsageError(f"--random-min ({args.random_min}) must not exceed --random-max ({args.random_max})")
    texts = _texts(args)
    if not texts:
        raise UsageError("no text to extract")
    extractor = Extractor(model_dir(args), args.device, args.dtype, args.attn_implementation)
    if args.json:  # refused before anything is written
        check_json_size(extractor.json_elements(texts))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Extracted beside --out under a hidden name: a failure leaves --out as it was, and an
    # old run there is removed only once the new one is complete.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as work:
        staged = Path(work) / "run"
        meta = extractor.extract_to_run(texts, staged, top_k=args.top_k, parquet_layers=args.parquet_layers,
                                        parquet_heads=args.parquet_heads, parts=args.parts,
                                        storage_dtype=args.storage_dtype)
        check_out(out, args.overwrite)  # again: a file may have appeared in --out meanwhile
        if out.exists():
            remove_run(out, f"--out {out}")
        with atomic_path(out) as tmp:  # replaces an empty directory only
            os.replace(staged, tmp)
    if args.json:
        write_json(args.json, _json_doc(extractor, texts, args))
    print(json.dumps(meta, indent=2))
    return 0
