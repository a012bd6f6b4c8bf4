"""`kvcore extract`: the KV cache of a few texts into a run directory (outside the workflow)."""

from __future__ import annotations

import json
from pathlib import Path

from kvcore.cli.options import MAX_EXAMPLES, MAX_SEED, MAX_TOP_K, int_in
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


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract the KV cache of prompts, a text file or random text")
    p.add_argument("--model", required=True,
                   help="a model directory, or a model name from --config (downloaded if needed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable): one sequence each")
    src.add_argument("--text-file", help="a text file: one sequence per non-empty line")
    src.add_argument("--random", type=int_in(1, MAX_EXAMPLES), metavar="N", help="N random word sequences")
    p.add_argument("--out", required=True,
                   help="run directory to write: new, empty or an unfinished run (a complete one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete run in --out (never a directory holding other files)")
    p.add_argument("--config", default="config.yaml", help="config naming models (default: config.yaml)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--top-k", type=int_in(1, MAX_TOP_K), default=10,
                   help="next-token predictions kept per sequence (default 10; at most the vocabulary)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed for --random")
    p.add_argument("--json", metavar="FILE", help="also write the old nested JSON format (small inputs only)")
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

    docs, _ = random_documents({"n_documents": args.random, "seed": args.seed}, Path("."), Path("."))
    return [text for _, text in docs]


def _model_dir(args) -> Path:
    path = Path(args.model)
    if (path / "config.json").is_file():
        return path
    from kvcore.cli.download import load_config, pick
    from kvcore.sources import prepare_model

    if not Path(args.config).is_file():
        raise UsageError(f"--model {args.model!r} is neither a model directory nor a name (no {args.config})")
    config = load_config(args.config)
    (name,) = pick(config, "models", [args.model])
    out = Path("resources/models") / name
    if not (out / "manifest.json").is_file():
        prepare_model(name, config["models"][name], out)
    return out


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
    from kvcore.extract import Extractor
    from kvcore.storage import remove_run

    out = Path(args.out)
    check_out(out, args.overwrite)
    if args.json:
        check_output(args.json, "--json", inputs=[p for p in [args.text_file] if p], protected=[out])
    texts = _texts(args)
    if not texts:
        raise UsageError("no text to extract")
    extractor = Extractor(_model_dir(args), args.device, args.dtype)
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
        write_json(args.json, [extractor.extract(t, args.top_k).to_dict() for t in texts])
    print(json.dumps(meta, indent=2))
    return 0
