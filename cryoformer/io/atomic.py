"""Atomic file writing: write to a temporary name beside the target, then rename.

A crash, a Ctrl-C or an exception half way through never leaves a truncated output file
under the final name, and never destroys a previous good file of that name.

``tempfile`` creates files 0600 and directories 0700 whatever the umask, which would make
every map unreadable to lab-mates and to RELION/cryoSPARC running as another user on shared
storage. Everything created here is given the mode an ordinary ``open``/``mkdir`` would have
under the user's umask (0644 / 0755 under the usual 022) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Iterator

from cryoformer.errors import InputError, PathLike
from cryoformer.io.guard import WRITE_ERRNOS, output_error_from_os

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; serialised between threads)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new directory under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~current_umask()


def make_temp_dir(prefix: str, suffix: str, directory: str) -> str:
    """``tempfile.mkdtemp`` with the umask's directory mode instead of 0700."""
    stage = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=directory)
    os.chmod(stage, dir_mode())
    return stage


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    Parameters
    ----------
    path : str or path-like
        Final file name.
    suffix : str
        Suffix for the temporary file; some writers choose a format by extension
        (e.g. ``".mrcs"``), so pass the final extension when that matters.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix + ".tmp", dir=directory)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:  # report the file the user named, not a hidden temp name
            raise output_error_from_os(exc, path) from exc
        raise
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        yield tmp
        # A writer that recreated the file (mrcfile's overwrite=True, torch.save) made it with
        # the umask's mode already; one that reused it keeps the mode set above.
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        write_error = _write_errno(exc)
        if write_error is not None:
            raise output_error_from_os(write_error, path) from exc
        raise


def _write_errno(exc: BaseException):
    """The OSError (disk full, quota, permission) behind ``exc``, if writing failed for one.

    Writers may wrap OS errors in their own exceptions, so the chain of causes is searched
    too. (torch's zip writer hides ENOSPC altogether, which is why checkpoints are serialised
    in memory and written with a plain write.)
    """
    if isinstance(exc, InputError):  # already a one-line error (perhaps of a nested output)
        return None
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", suffix: str = ""):
    """Open a temporary file for writing and atomically move it onto ``path`` when closed."""
    with atomic_path(path, suffix=suffix) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def staged_directory(target: PathLike, replace: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``target``; publish it only on success.

    Parameters
    ----------
    target : path
        Final directory.
    replace : bool
        ``True``: the staged directory replaces ``target`` entirely (stale files of an earlier
        run disappear). ``False``: its files are moved into ``target`` (created if needed),
        overwriting files of the same name and keeping the others.

    On any exception the staged directory is deleted and ``target`` is left as it was.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    stage = make_temp_dir(f".{os.path.basename(target)}.", ".tmp", parent)
    try:
        yield stage
        if not os.path.isdir(target):
            os.replace(stage, target)
        elif replace:
            old = stage + ".old"
            os.replace(target, old)
            os.replace(stage, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for root, _dirs, files in os.walk(stage):
                dest = os.path.join(target, os.path.relpath(root, stage))
                os.makedirs(dest, exist_ok=True)
                for name in files:
                    os.replace(os.path.join(root, name), os.path.join(dest, name))
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
