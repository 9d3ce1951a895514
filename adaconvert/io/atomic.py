"""Atomic output: build in a temporary sibling, then publish it at DST in one system call.

Guarantees, on Linux (``renameat2``, kernel 3.15+, on ext4, xfs, btrfs, tmpfs and most local filesystems):

- Without ``overwrite`` the publishing step itself fails when DST exists at that moment
  (``RENAME_NOREPLACE``): of two runs racing for one DST exactly one wins, the other gets
  :class:`OutputExistsError` and leaves nothing; a directory that appears at DST during the run is never touched.
- With ``overwrite`` the old DST is swapped out in one step (``RENAME_EXCHANGE``) and only then removed: a crash at
  any moment leaves either the old or the new DST in place, never neither.
- Temporary siblings are named ``.DST.tmp-<pid>-<random>`` and locked (``flock``) by their owner while it runs; a
  later run for the same DST removes those whose owner is gone (after ``kill -9`` or a power cut) and says so.
- Directories and files are created with the mode the umask gives (as ``cp`` and ``mkdir`` do), not 0700.
- A write that fails (disk full, read-only filesystem, file size limit) is reported naming DST, and every
  temporary file and every parent directory this run created is removed.

Elsewhere (macOS, Windows, filesystems without ``renameat2`` such as some network filesystems) the same API falls
back to weaker steps: a file is published with ``os.link`` (which also refuses an existing DST), a directory with
``os.rename`` after an existence check (a DST created between the two is replaced if it is an empty directory), and
``overwrite`` renames the old DST aside before renaming the new one in (a crash between the two leaves the old DST
under ``.DST.old-<pid>-<random>``, which a later run removes).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from adaconvert.errors import AdaconvertError, OutputExistsError, OutputOverlapError, OutputWriteError

logger = logging.getLogger(__name__)

# Test hook: ``ADACONVERT_KILL_AT=<step>`` sends SIGKILL to this process at that step; ``ADACONVERT_PAUSE_AT=<step>``
# with ``ADACONVERT_PAUSE_FILE=<path>`` writes ``<path>.<pid>`` there and waits until ``<path>`` exists. Steps:
# ``before-publish`` (output complete, not yet at DST), ``before-exchange`` and ``after-exchange`` (overwrite).
KILL_ENV, PAUSE_ENV, PAUSE_FILE_ENV = "ADACONVERT_KILL_AT", "ADACONVERT_PAUSE_AT", "ADACONVERT_PAUSE_FILE"
STEPS = ("before-publish", "before-exchange", "after-exchange")

# a temporary sibling whose owner is alive but holds no lock is only taken for stale after this long (it may be in
# the instant between being created and being locked)
_UNLOCKED_GRACE_S = 60
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# errors of the output's filesystem, reported against DST whatever file they were raised for
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output(dst: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early, before any work, when ``dst`` overlaps one of ``inputs`` (:func:`check_no_overlap`), or exists
    (a dangling symlink counts) and may not be replaced.

    Raises:
        OutputOverlapError: ``dst`` is, contains or lies inside an input.
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    dst = Path(dst)
    check_no_overlap(dst, inputs)
    if os.path.lexists(dst) and not overwrite:
        what = "output is a dangling symlink" if dst.is_symlink() and not dst.exists() else "output already exists"
        raise OutputExistsError(f"{what}; pass --overwrite to replace it", path=dst)
    return dst


def check_no_overlap(dst: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse a ``dst`` that is, contains or lies inside one of ``inputs`` (symlinks resolved), whatever the flags.

    Inputs that are not local paths (Hub ids, ``None``) are skipped. Call it before reading anything.

    Raises:
        OutputOverlapError: naming DST and the input it would destroy.
    """
    out = Path(dst).resolve()
    for src in inputs:
        if src is None or not os.path.lexists(src):
            continue
        where = Path(src).resolve()
        if out == where:
            how = "is"
        elif where in out.parents:
            how = "lies inside"
        elif out in where.parents:
            how = "contains"
        else:
            continue
        raise OutputOverlapError(f"output {how} the input {src}; choose an output outside every input", path=dst)


@contextmanager
def atomic_output_dir(dst: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dst``; on success it becomes ``dst``, on error it vanishes.

    See the module docstring for what is guaranteed where.

    Args:
        dst: the output directory.
        overwrite: replace an existing ``dst`` (atomically, once the new one is complete).
        inputs: paths the output must not overlap (:func:`check_no_overlap`).

    Raises:
        OutputOverlapError: ``dst`` overlaps an input.
        OutputExistsError: ``dst`` exists and ``overwrite`` is false (checked first and again when publishing).
        OutputWriteError: the output cannot be written (disk full, read-only...), naming ``dst``.
    """
    with _atomic(Path(dst), overwrite=overwrite, inputs=inputs, make=_make_dir) as tmp:
        yield tmp


@contextmanager
def atomic_output_file(
    dst: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield the path of a new empty temporary file beside ``dst``; on success it becomes ``dst``.

    Same arguments and guarantees as :func:`atomic_output_dir`.
    """
    with _atomic(Path(dst), overwrite=overwrite, inputs=inputs, make=_make_file) as tmp:
        yield tmp


@contextmanager
def atomic_output_files(
    dsts: Sequence[str | Path], *, overwrite: bool, inputs: Iterable[str | Path | None] = ()
) -> Iterator[list[Path]]:
    """Yield temporary files for several outputs that belong together (a GGUF and its side files), published as a
    group: in the order given, while holding a lock on their directory, so that two runs never mix their files.

    Without ``overwrite``, the first file decides between racing runs: the run that publishes it publishes the
    others; the other run gets :class:`OutputExistsError` and publishes nothing. With ``overwrite``, the files come
    all from one run or all from the other. Otherwise as :func:`atomic_output_file` (every DST checked first).
    """
    dsts = [Path(d) for d in dsts]
    inputs = list(inputs)
    for dst in dsts:
        check_output(dst, overwrite=overwrite, inputs=inputs)
    group = _DirectoryLock(dsts[0].parent)
    with ExitStack() as stack:
        stack.callback(group.release)  # registered first: runs after the last file is published
        # entered in reverse, left in order: the first file is published first, each once the lock is held
        temps = [
            stack.enter_context(
                _atomic(dst, overwrite=overwrite, inputs=inputs, make=_make_file, before_publish=group.acquire)
            )
            for dst in reversed(dsts)
        ]
        yield temps[::-1]


class _DirectoryLock:
    """An exclusive ``flock`` on a directory, taken on the first :meth:`acquire` and held until :meth:`release`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.directory, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def _atomic(dst: Path, *, overwrite: bool, inputs, make, before_publish=None) -> Iterator[Path]:
    check_output(dst, overwrite=overwrite, inputs=inputs)
    created: list[Path] = []
    tmp = lock = None
    done = False
    try:
        _make_parents(dst, created)
        remove_stale(dst)
        tmp, lock = make(dst)
        yield tmp
        _pause_or_kill("before-publish")
        if before_publish is not None:
            before_publish()
        _publish(tmp, dst, overwrite=overwrite)
        done = True
    except OSError as exc:
        if isinstance(exc, AdaconvertError) or not _is_output_error(exc, tmp):
            raise
        raise OutputWriteError(f"cannot write the output ({exc.strerror or exc})", path=dst) from exc
    finally:
        if lock is not None:
            os.close(lock)
        if not done:
            if tmp is not None:
                _remove(tmp)
            for parent in created:  # deepest first; only those this run made, and only while empty
                try:
                    parent.rmdir()
                except OSError:
                    break


def _is_output_error(exc: OSError, tmp: Path | None) -> bool:
    names = [Path(n) for n in (exc.filename, exc.filename2) if n]
    return exc.errno in _OUTPUT_ERRNOS or tmp is None or any(n == tmp or tmp in n.parents for n in names)


def _make_parents(dst: Path, created: list[Path]) -> None:
    """Create the missing parents of ``dst``, recording each in ``created`` (deepest first) as soon as it exists."""
    for parent in reversed([p for p in dst.parents if not os.path.lexists(p)]):
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        created.insert(0, parent)


def _temp_name(dst: Path, kind: str) -> Path:
    return dst.with_name(f".{dst.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _make_dir(dst: Path) -> tuple[Path, int]:
    tmp = _temp_name(dst, "tmp")
    os.mkdir(tmp, 0o777)  # the umask applies, as for mkdir(1)
    return tmp, _lock(tmp)


def _make_file(dst: Path) -> tuple[Path, int]:
    tmp = _temp_name(dst, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp, _lock(tmp)


def _lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path``, held until the returned descriptor is closed (or the process dies)."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale(dst: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``dst`` left by runs that died (their process is gone, or holds no lock on
    them any more); each removal is logged. Returns what was removed."""
    dst = Path(dst)
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    try:
        entries = list(os.scandir(dst.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or not _is_stale(Path(entry.path), int(match.group(1))):
            continue
        _remove(Path(entry.path))
        logger.warning("removed %s, left by an interrupted run (process %s) for %s", entry.path, match.group(1), dst)
        removed.append(Path(entry.path))
    return removed


def _is_stale(path: Path, pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    if path.is_symlink():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its owner holds the lock: a run in progress
    finally:
        os.close(fd)
    # unlocked but its PID is alive: a reused PID, or a run in the instant between creating and locking it
    return time.time() - path.lstat().st_mtime > _UNLOCKED_GRACE_S


def _remove(path: Path) -> None:
    """Remove a temporary sibling: a directory tree, or a file or symlink (never what a symlink points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def _publish(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    if overwrite and os.path.lexists(dst):
        _pause_or_kill("before-exchange")
        if _renameat2(tmp, dst, _RENAME_EXCHANGE):
            _pause_or_kill("after-exchange")
            _remove(tmp)  # now the old DST
            return
        old = _temp_name(dst, "old")  # fallback: two renames, the old copy kept aside in between
        os.rename(dst, old)
        _pause_or_kill("after-exchange")
        os.rename(tmp, dst)
        _remove(old)
        return
    try:
        if _renameat2(tmp, dst, _RENAME_NOREPLACE):
            return
        if tmp.is_dir():
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            os.rename(tmp, dst)
        else:
            os.link(tmp, dst)
            tmp.unlink()
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        if overwrite:  # DST appeared after the check above: replace it as asked
            _publish(tmp, dst, overwrite=True)
            return
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        raise OutputExistsError("output appeared while this run was writing it; left untouched", path=dst) from exc


_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the filesystem does not provide it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - glibc 2.28+; AttributeError elsewhere
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _pause_or_kill(step: str) -> None:
    """The test hook (see ``KILL_ENV``): does nothing unless one of the variables names ``step``."""
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == step and os.environ.get(PAUSE_FILE_ENV):
        release = Path(os.environ[PAUSE_FILE_ENV])
        Path(f"{release}.{os.getpid()}").touch()
        while not release.exists():
            time.sleep(0.02)
