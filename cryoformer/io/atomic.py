"""Atomic file writing: write to a temporary name beside the target, then rename.

A crash, a Ctrl-C or an exception half way through never leaves a truncated output file
under the final name, and never destroys a previous good file of that name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from cryoformer.errors import PathLike


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
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix + ".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", suffix: str = ""):
    """Open a temporary file for writing and atomically move it onto ``path`` when closed."""
    with atomic_path(path, suffix=suffix) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
