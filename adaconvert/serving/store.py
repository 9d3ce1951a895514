"""The adapter store served by name, and the content-addressed cache of conversions made for serving.

A **store** is a directory of adapter directories, one per name: ``STORE/support`` or ``STORE/org/support``. A
requested name is never trusted as a path: :func:`store_path` accepts only ``name`` or ``org/name`` made of
letters, digits and ``._-`` (no leading dot, so no ``..``), and only when the directory, and every file of it that
is read, lies inside the store once symlinks are resolved. Anything else is "no such adapter".

The **cache** holds every conversion made for serving under the hash of the source's config and weights bytes (and
adaconvert's version; :func:`source_digest`): an edited adapter gets a new entry, an unchanged
one is found again, also by another process or after a restart. Each entry carries a manifest (size and sha256 of
every file) that is checked before the entry is used; a truncated or edited entry is removed and rebuilt, never
served. One lock file per entry makes concurrent first requests (threads or processes) convert once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from adaconvert.constants import ADAPTER_CONFIG_NAME, SERVE_MANIFEST_NAME
from adaconvert.errors import InvalidConfigError
from adaconvert.io.atomic import atomic_output_file

logger = logging.getLogger(__name__)

# the environment of a vLLM process that serves a store (read by adaconvert/serving/resolver.py, set by `serve`)
STORE_ENV = "ADACONVERT_ADAPTER_STORE"
CACHE_ENV = "ADACONVERT_ADAPTER_CACHE"
RESOLVER_NAME = "adaconvert"

# one path component of a store name: no leading dot (so never `.` or `..`), no separators, no control characters
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def store_path(store: str | Path, name: str) -> Path | None:
    """The adapter directory ``name`` stands for in ``store``, or None when it is not one.

    Args:
        store: the store directory.
        name: a requested model name: ``name`` or ``org/name``, each part made of letters, digits and ``._-``,
            starting with a letter or digit.

    Returns:
        The directory (inside the store, symlinks resolved), or None for a name that is not of that form, a
        directory that does not exist or lies outside the store, or a file in it that is not a regular file inside
        the store (a symlink leaving it, a directory where a file is read). Nothing outside the store is opened.
    """
    parts = name.split("/")
    if not 1 <= len(parts) <= 2 or not all(_COMPONENT.fullmatch(p) for p in parts):
        return None
    root = Path(store).resolve()
    try:
        found = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop
        return None
    if not found.is_relative_to(root) or not (found / ADAPTER_CONFIG_NAME).is_file():
        return None
    for entry in found.iterdir():
        if not is_read_for_serving(entry.name):
            continue
        target = entry.resolve()
        if not target.is_relative_to(root) or not target.is_file():
            logger.warning("store adapter %s: %s is not a regular file inside the store; refused", name, entry.name)
            return None
    return found


def is_read_for_serving(file_name: str) -> bool:
    """Whether the files of an adapter directory named so are read (hashed, converted) when it is served."""
    return file_name.startswith("adapter_") or file_name.endswith(".json")


def cached_conversion(root: Path, cache: Path) -> tuple[Path, bool]:
    """The conversion of the adapter at ``root`` in ``cache``, made now unless a sound one is there.

    Args:
        root: the adapter directory (any source ``to_lora`` reads).
        cache: the cache directory (created if missing).

    Returns:
        ``(entry, reused)``: the entry directory, named by the source's digest, and whether it was already there.

    Raises:
        InvalidConfigError: the source changed while it was being converted.
        plus ``to_lora``'s errors for a source that cannot be read or converted.
    """
    from adaconvert.conversion.peft_lora import to_lora

    digest = source_digest(root)
    entry = cache / digest
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{digest}.lock"):
        if entry.exists():
            problem = manifest_problem(entry)
            if problem is None:
                return entry, True
            logger.warning("cached conversion %s is damaged (%s): converting again", entry, problem)
            shutil.rmtree(entry)
        to_lora(root, entry)
        if source_digest(root) != digest:  # edited while we read it: the entry would not hold what its name says
            shutil.rmtree(entry)
            raise InvalidConfigError("the adapter changed while it was being converted; ask again", path=root)
        _write_manifest(entry)
    return entry, False


def source_digest(root: Path) -> str:
    """16 hex digits of sha256 over the adapter's config and weights bytes and adaconvert's version: the cache key."""
    from adaconvert import __version__

    h = hashlib.sha256(__version__.encode())
    for name in sorted(p.name for p in root.iterdir() if is_read_for_serving(p.name)):
        h.update(name.encode())
        with open(root / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def manifest_problem(entry: Path) -> str | None:
    """What is wrong with a cache entry (missing manifest, a file added, missing, resized or changed), or None."""
    try:
        listed = json.loads((entry / SERVE_MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    present = {p.name for p in entry.iterdir()} - {SERVE_MANIFEST_NAME}
    if present != set(listed):
        return f"files {sorted(present ^ set(listed))} added or missing"
    for name, (size, sha) in listed.items():
        path = entry / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != size or _sha256(path) != sha:
            return f"{name} differs from the manifest"
    return None


def _write_manifest(entry: Path) -> None:
    files = {p.name: (p.stat().st_size, _sha256(p)) for p in sorted(entry.iterdir())}
    with atomic_output_file(entry / SERVE_MANIFEST_NAME, overwrite=False) as tmp:
        tmp.write_text(json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (flock: across processes, and across threads with their own open file)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def store_signature(root: Path) -> tuple:
    """What changes when an adapter directory is edited, without reading it: name, size, mtime and inode of every
    file that serving reads (an in-place write changes the mtime, a replacement the inode)."""
    stats = ((p.name, p.stat()) for p in root.iterdir() if is_read_for_serving(p.name))
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))
