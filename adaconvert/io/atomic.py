"""Atomic directory output: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaconvert.errors import OutputExistsError


def check_output(dst: str | Path, *, overwrite: bool) -> Path:
    """Fail early, before any work, when ``dst`` exists and may not be replaced."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise OutputExistsError("output already exists; pass --overwrite to replace it", path=dst)
    return dst


@contextmanager
def atomic_output_dir(dst: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dst``; on success it becomes ``dst``, on error it vanishes.

    The temporary directory is a sibling (same filesystem), so the final step is a rename: readers never see a
    half-written ``dst``. An existing ``dst`` is only replaced with ``overwrite``, and only after the new one is
    complete.

    Raises:
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    dst = check_output(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, dst)


@contextmanager
def atomic_output_file(dst: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary file path beside ``dst``; on success it becomes ``dst``, on error it vanishes.

    The single-file twin of :func:`atomic_output_dir`: the temporary sibling is on the same filesystem, so the final
    step is one rename (``overwrite``) or one hard link, which fails if ``dst`` appeared meanwhile; readers never see
    a half-written ``dst``. An existing ``dst`` is only replaced with ``overwrite``, once the new file is complete.

    Raises:
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    dst = check_output(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the output is an ordinary file
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if overwrite:
        os.replace(tmp, dst)
        return
    try:  # a hard link fails if dst appeared meanwhile: nothing we were not asked to replace is ever replaced
        os.link(tmp, dst)
    except FileExistsError:
        raise OutputExistsError("output already exists; pass --overwrite to replace it", path=dst) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if dst.exists():
            raise OutputExistsError("output already exists; pass --overwrite to replace it", path=dst) from None
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
