"""Errors raised for bad user input.

Every error that a user can cause by handing us a wrong file is an :class:`InputError`.
It carries the file, the field and what was expected, so the command-line tool can print a
single readable line (and a traceback only with ``--debug``).
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class InputError(ValueError):
    """A user-supplied file or value is missing, malformed or inconsistent.

    Parameters
    ----------
    path : str or path-like, optional
        The file at fault (``None`` for a command-line value).
    field : str, optional
        The field, column, key or option at fault (e.g. ``"_rlnDefocusU"``).
    message : str
        What was found and what was expected.
    """

    def __init__(self, path: Optional[PathLike], field: Optional[str], message: str):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The error as one line: ``file: field: message``."""
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


def require_file(path: PathLike, what: str = "input file") -> str:
    """Return ``path`` as a string, or raise :class:`InputError` if it is not a readable file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, None, f"{what} does not exist")
    if not os.path.isfile(path):
        raise InputError(path, None, f"{what} is not a regular file")
    return path
