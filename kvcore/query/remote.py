"""Runs in object storage: `kvcore query s3://BUCKET/PREFIX`, read in place.

A bucket prefix is found and read by the same code as a local directory
(kvcore.query.discover works on a universal_pathlib UPath over s3fs), so the same checks
hold: only keys under the prefix are listed, and a manifest entry that leaves the run is
refused. DuckDB then reads the listed s3:// files through that fsspec filesystem,
registered with the connection (its httpfs extension is not needed), and allowed_paths
still names exactly those files.

Endpoint and credentials come from the standard AWS settings, read by botocore:
AWS_ENDPOINT_URL (for MinIO, Ceph, a local test server, ...), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError, one_line

SCHEME = "s3://"


def is_remote(path) -> bool:
    return not isinstance(path, Path) and str(path).startswith(SCHEME)


def as_path(path):
    """A local Path, or for s3://BUCKET/PREFIX a UPath that reads the bucket."""
    if not is_remote(path):
        return Path(path)
    if isinstance(path, str):
        try:
            import s3fs  # noqa: F401  (UPath needs it for s3://, and says so less plainly)
            from upath import UPath
        except ImportError as exc:
            raise UsageError(f"{path}: reading runs in S3 needs s3fs and universal_pathlib "
                             f"(pip install 'kvcore[s3]'; {one_line(exc)})") from None
        path = UPath(path)
    path.fs.invalidate_cache()  # s3fs keeps listings: a new open sees the shards written since
    return path


@contextmanager
def reading(path):
    """Errors of the bucket (unreachable endpoint, no such bucket, refused credentials) as one line."""
    if not is_remote(path):
        yield
        return
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except (BotoCoreError, OSError) as exc:
        raise KvcoreError(f"{path}: cannot read the bucket ({one_line(exc)}); check AWS_ENDPOINT_URL "
                          "and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None


def filesystems(paths) -> list:
    """The fsspec filesystems the remote paths read, once each (for DuckDB's register_filesystem)."""
    found = {}
    for p in paths:
        if is_remote(p):
            found.setdefault(id(p.fs), p.fs)
    return list(found.values())
