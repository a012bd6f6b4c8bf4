"""One model argument for every command and config entry: a prepared name, a directory or a hub id.

- a directory holding config.json is used in place;
- a name of the config's `models:` (or one already under resources/models/) is prepared there once;
- a hub id `org/name` or `org/name@revision` is downloaded (through the Hugging Face cache, so
  HF_HUB_OFFLINE works with a filled cache) and prepared under resources/models/org--name[@revision].

A directory wins over a hub id of the same spelling, as in transformers' from_pretrained.
"""

from __future__ import annotations

from pathlib import Path

from kvcore.errors import UsageError
from kvcore.sources.model_ids import FORMS, hub_spec


def prepared_names(models: dict, resources: Path) -> list[str]:
    """The config's model names, then those already prepared under resources/models/."""
    found = sorted(p.parent.name for p in (resources / "models").glob("*/manifest.json"))
    return list(dict.fromkeys([*models, *found]))


def model_spec(text: str, models: dict, resources: str | Path = "resources") -> tuple[str, dict | None]:
    """(name, spec) of a model name or hub id; spec None for a model already prepared without a config entry."""
    resources = Path(resources)
    if text in models:
        return text, models[text]
    if (resources / "models" / text / "manifest.json").is_file():
        return text, None
    if Path(text).expanduser().is_dir():
        raise UsageError(f"--model {text}: the directory has no config.json (not a Hugging Face model directory)")
    hub = hub_spec(text)
    if hub is not None:
        return hub
    names = prepared_names(models, resources)
    raise UsageError(f"unknown model {text!r}; valid prepared names: {', '.join(names) or '(none)'}; "
                     f"or give {FORMS}")


def config_models(config_path: str | Path | None) -> dict:
    """The `models:` of a config file (checked, shorthands expanded), {} when there is no such file."""
    if config_path is None or not Path(config_path).is_file():
        return {}
    from kvcore.config import check, load

    config = load(config_path)
    check(config)
    return config["models"]


def resolve_model(text: str, config_path: str | Path | None = "config.yaml",
                  resources: str | Path = "resources") -> Path:
    """A loadable model directory for `text`, prepared (once) when it is a name or a hub id."""
    from kvcore.sources.models import prepare_model

    resources = Path(resources)
    path = Path(text).expanduser()
    if (path / "config.json").is_file():  # no config needed for a directory
        return path
    name, spec = model_spec(text, config_models(config_path), resources)
    out = resources / "models" / name
    if spec is not None and not (out / "manifest.json").is_file():
        prepare_model(name, spec, out, resources / "wheels")
    return out
