"""Output guards: never write over an input, never replace an output without being told to.

Every command names its outputs and its inputs before it writes anything. An output that
resolves to one of the inputs (the same path, a hard link or a symlink to it, or a directory
holding it) is refused even with ``--force``: overwriting the data a command is reading loses
it. An output that already exists is refused unless the user passed ``--force``. A directory
that cannot be written, or a disk without room for an output of known size, is reported
before the work starts, as one line naming the path.

The checks compare resolved paths (:func:`os.path.realpath`) and, for files that exist,
device and inode numbers, so ``./a.star``, ``../dir/a.star`` and a hard link all count as the
same file.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Iterable, List, Optional, Sequence

from cryoformer.errors import InputError, PathLike

__all__ = ["OutputError", "claim_output_file", "claim_output_dir", "require_free_space",
           "same_file", "inside", "FREE_SPACE_MARGIN_BYTES"]

# Room kept free beyond an output's own size: filesystems refuse writes a little before the
# reported free space reaches zero (reserved blocks, metadata).
FREE_SPACE_MARGIN_BYTES = 64 * 2 ** 20


class OutputError(InputError):
    """An output cannot be written where asked (exists, is an input, no room, no permission).

    Printed by the command-line tool like an :class:`InputError`: one line, exit status 2.
    """


def _resolved(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (path, symlink or hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: compare where they would be
        return _resolved(a) == _resolved(b)


def inside(path: PathLike, directory: PathLike) -> bool:
    """True when ``path`` is ``directory`` or lies below it (after resolving links)."""
    p, d = _resolved(path), _resolved(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def _inputs(inputs: Iterable[Optional[PathLike]]) -> List[str]:
    return [os.fspath(p) for p in inputs if p is not None]


def _check_writable_dir(directory: str, shown: str, option: str) -> None:
    """Refuse early when the directory that will hold an output cannot be written."""
    probe = directory
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputError(shown, option, f"{probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(shown, option, f"cannot write in {probe}: permission denied "
                          "(choose another output location)")


def claim_output_file(path: PathLike, inputs: Iterable[Optional[PathLike]], force: bool,
                      option: str = "-o") -> str:
    """Check that ``path`` may be written as an output file; return it as a string.

    Parameters
    ----------
    path : str or path-like
        The output file.
    inputs : iterable of paths
        Every file the command reads (``None`` entries are skipped), including the image
        stacks a ``.star``/``.cs``/``.txt`` names.
    force : bool
        ``--force``: an existing output may be replaced (never an input).
    option : str
        The command-line option that named ``path``, for the message.

    Raises
    ------
    OutputError
        ``path`` is one of ``inputs``; exists and ``force`` is false; is a directory; or its
        directory cannot be written.
    """
    path = os.fspath(path)
    for source in _inputs(inputs):
        if same_file(path, source):
            raise OutputError(path, option, f"is also an input of this command ({source}); "
                              "choose another output name (inputs are never overwritten, even "
                              "with --force)")
    if os.path.isdir(path):
        raise OutputError(path, option, "is a directory; expected a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        # A device or pipe (/dev/null): the atomic rename would replace the node itself.
        raise OutputError(path, option, "exists and is not a regular file; expected a file name")
    if os.path.lexists(path) and not force:
        raise OutputError(path, option, "already exists; pass --force to replace it")
    _check_writable_dir(os.path.dirname(os.path.abspath(path)), path, option)
    return path


def claim_output_dir(path: PathLike, inputs: Iterable[Optional[PathLike]], force: bool,
                     option: str = "-o", replaceable: Optional[Sequence[str]] = None) -> str:
    """Check that ``path`` may be written as an output directory; return it as a string.

    An existing empty directory is fine. A non-empty one needs ``force``; and with ``force``,
    no input may lie inside it (the command will write there).

    Parameters
    ----------
    path : str or path-like
    inputs : iterable of paths
    force : bool
    option : str
    replaceable : sequence of str, optional
        Names (relative to ``path``) the command will write; when given, only inputs inside
        these are refused under ``force`` (files of the directory the command leaves alone
        may be inputs). Default: the whole directory.

    Raises
    ------
    OutputError
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(path, option, "exists and is not a directory")
    for source in _inputs(inputs):
        targets = [path] if replaceable is None else [os.path.join(path, n) for n in replaceable]
        if any(inside(source, t) for t in targets):
            raise OutputError(path, option, f"would hold this command's outputs but contains its "
                              f"input {source}; choose another output directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise OutputError(path, option, "already exists and is not empty; pass --force to write "
                          "into it (files of the same name are replaced) or choose another directory")
    _check_writable_dir(os.path.abspath(path), path, option)
    return path


def require_free_space(path: PathLike, n_bytes: int, option: str = "-o") -> None:
    """Refuse to start writing ``n_bytes`` at ``path`` when its filesystem has less room.

    Raises
    ------
    OutputError
        Free space (of the nearest existing directory) below ``n_bytes`` plus a margin.
    """
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    free = shutil.disk_usage(directory).free
    if free < int(n_bytes) + FREE_SPACE_MARGIN_BYTES:
        raise OutputError(os.fspath(path), option, f"needs {_size(n_bytes)} but {directory} has "
                          f"{_size(free)} free; free some space or write elsewhere")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


# errno values that mean "this output cannot be written here", reported as one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                          errno.EFBIG})


def output_error_from_os(exc: OSError, path: PathLike) -> OutputError:
    """An :class:`OutputError` for ``path`` describing an OS write failure."""
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.EFBIG: "file too large for the file system",
           }.get(exc.errno, exc.strerror or str(exc))
    return OutputError(os.fspath(path), None, f"cannot be written: {why}; nothing was left behind")
