"""Write outputs under a temporary name and rename them into place when complete.

A killed job then leaves only `*.tmp-*` debris, never a file or directory that looks
finished. Every writer in kvcore goes through these helpers, and none of them deletes
anything to make room: an existing directory is never replaced (only an empty one), and
`check_output` refuses an output that would overwrite an input or a run's own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from kvcore.errors import UsageError

# Every file a run directory can hold, as kvcore.storage lays it out (paths relative to it;
# fnmatch's * spans "/"): a shard being staged, and a killed writer's `.NAME.tmp-*` debris.
RUN_FILES = ("metadata.json", "tokens.parquet", "predictions.parquet", "kv/part-*.safetensors",
             "kv/layer=*/data.parquet", "kv/layer=*/part-*.parquet", "norms/*.parquet", "shards/kv-*.json",
             "shards/layer=*/part-*.parquet", "shards/predictions-*.parquet", ".staging/*",
             ".*.tmp-*", "*/.*.tmp-*")
# Where those live: no output may land there (an extra file under kv/ would join the tables).
RUN_OWN_FILES = tuple(dict.fromkeys(f.split("/")[0] for f in RUN_FILES if not f.startswith(("*", ".*"))))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (or `path` itself) to disk."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success.

    Works for files and directories: the caller creates whatever it likes at the
    yielded path. On any exception the temporary is removed and `target` is untouched.
    """
    target = Path(target)
    _refuse_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.rmdir()  # the caller decides whether it becomes a file or a directory
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {target}")
        usual_mode(tmp)  # tempfile (and safetensors) make files private (0600)
        fsync_tree(tmp)
        # again: one may have appeared while we wrote; a directory may replace only an empty one
        _refuse_directory(target, allow_empty=tmp.is_dir())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def usual_mode(path: str | os.PathLike) -> None:
    """Give a file, or every file under a directory, the mode a plain open() gives (0644 under
    umask 022): tempfile and safetensors' save_file make private (0600) files, and another user
    of a shared resources/ then gets "No such file or directory" from transformers."""
    path = Path(path)
    umask = os.umask(0o077)  # read it by setting it: meanwhile a stricter mask, never a looser one
    os.umask(umask)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        os.chmod(f, 0o666 & ~umask)


def _refuse_directory(target: Path, allow_empty: bool = True) -> None:
    if target.is_dir() and not target.is_symlink() and not (allow_empty and not any(target.iterdir())):
        raise UsageError(f"{target} is an existing directory; kvcore never deletes a directory to make room "
                         "for an output: name a file path, or remove the directory yourself")


def run_dir_of(path: Path) -> Path | None:
    """The run directory (what `kvcore extract` writes) that holds `path`, if any."""
    for parent in path.parents:
        if (parent / "metadata.json").is_file() or (parent / "shards").is_dir() and (parent / "kv").is_dir():
            return parent
    return None


def check_output(target: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike] = (),
                 protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output path that would destroy something the user did not name.

    Refused: an existing non-empty directory; one of the command's `inputs`; anything inside
    a `protected` directory (the runs a query reads); a run's own extraction files.
    """
    path = Path(target)
    real = Path(os.path.realpath(path))
    _refuse_directory(real, allow_empty=False)  # every user-named output is a file
    for item in inputs:
        if real == Path(os.path.realpath(item)):
            raise UsageError(f"{option} {target} would overwrite the input {item}; name another file")
    for root in protected:
        if real.is_relative_to(os.path.realpath(root)):
            raise UsageError(f"{option} {target} is inside the run directory {root}, which this command "
                             "reads or writes; name a path outside it")
    run = run_dir_of(real)
    if run is not None and real.relative_to(run).parts[0] in RUN_OWN_FILES:
        raise UsageError(f"{option} {target} would overwrite the extracted run {run} "
                         f"({', '.join(RUN_OWN_FILES)} are its own files); name another file")
    return path


def write_json(target: str | os.PathLike, data: object) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
