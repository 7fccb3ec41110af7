"""File helpers for the data layer: checksums, downloads, safe tar extraction, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def md5sum(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex MD5 digest of a file (used to check published archives, not for security)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike[str], *, md5: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same folder; keep it only if its
    MD5 equals ``md5`` (otherwise raise RuntimeError naming both digests)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        got = md5sum(tmp)
        if got != md5:
            raise RuntimeError(f"downloaded {url} has MD5 {got}, expected {md5}; not keeping it")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a tar archive into ``dest``, refusing members that are absolute, contain ``..``, or are
    links, devices or other special files (only regular files and folders are extracted)."""
    dest = Path(dest).resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts or not target.is_relative_to(dest):
                raise RuntimeError(f"refusing to extract {m.name!r} from {archive}: path leaves {dest}")
            if not (m.isfile() or m.isdir()):
                raise RuntimeError(f"refusing to extract {m.name!r} from {archive}: not a regular file or folder")
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - regular files always have a stream
                raise RuntimeError(f"cannot read {m.name!r} from {archive}")
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)


@contextmanager
def atomic_path(dest: str | os.PathLike[str], *, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``dest``; on normal exit it is renamed to ``dest`` (atomic on
    POSIX), on error removed. Readers never see a half-written file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
