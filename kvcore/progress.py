"""Progress bars on stderr; none under `kvcore --quiet` (it sets KVCORE_QUIET=1)."""

from __future__ import annotations

import os

QUIET_VARIABLE = "KVCORE_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET_VARIABLE) == "1"


def be_quiet() -> None:
    """No progress bars or library chatter from here on (this process and its children);
    kvcore's own warnings and errors still print."""
    os.environ[QUIET_VARIABLE] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # also transformers' "Loading weights" bars
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TQDM_DISABLE"] = "1"
    import warnings

    from kvcore.errors import KvcoreWarning

    warnings.filterwarnings("ignore")  # libraries' deprecation notices...
    warnings.filterwarnings("default", category=KvcoreWarning)  # ...but not kvcore's own


def progress_bar(iterable=None, desc: str | None = None, **kwargs):
    """tqdm over `iterable`, shown only when `desc` names it and kvcore is not quiet."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=desc is None or quiet(), **kwargs)
