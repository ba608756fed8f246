"""Reading and writing cryoDRGN-style pickles without executing arbitrary code.

cryoDRGN stores poses and CTF parameters as pickled numpy arrays. ``pickle.load`` on a file
from someone else can run any code (a ``__reduce__`` that calls ``os.system``), so every
pickle we read goes through :class:`_ArrayUnpickler`, whose ``find_class`` resolves only the
few globals numpy arrays, numpy scalars and builtin containers need. Everything else is
refused before it is imported, so a malicious payload never gets a callable to call.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.atomic import atomic_open

__all__ = ["load_pickle", "save_pickle", "PICKLE_PROTOCOL"]

#: Protocol 4 is readable by every Python 3.4+ (cryoDRGN included) and handles > 4 GiB arrays.
PICKLE_PROTOCOL = 4

# numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; pickles name whichever wrote them.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED = frozenset(
    [(mod, "_reconstruct") for mod in _NUMPY_CORE]  # ndarray.__reduce__ (protocol <= 4)
    + [(mod, "scalar") for mod in _NUMPY_CORE]  # numpy scalars such as np.float32(1.0)
    + [(mod, "_frombuffer") for mod in _NUMPY_CORE]  # ndarray.__reduce_ex__ (protocol 5)
    + [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol <= 2 pickles encode ``bytes`` through ``_codecs.encode(str, "latin1")``.
        ("_codecs", "encode"),
    ]
)
# Builtin containers and numbers that have no opcode of their own (``__builtin__`` in
# Python-2-style pickles).
_BUILTINS = {"complex", "set", "frozenset", "bytearray", "slice", "range"}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy-array and builtin-container globals."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        allowed = (module, name) in _ALLOWED or (
            module in ("builtins", "__builtin__") and name in _BUILTINS
        )
        if not allowed:
            raise InputError(
                self._path,
                None,
                f"refusing to unpickle {module}.{name}: only numpy arrays, tuples, lists, "
                "dicts and numbers are allowed",
            )
        return super().find_class(module, name)


def load_pickle(path: PathLike) -> Any:
    """Load a pickle that may hold only numpy arrays, numbers, strings and containers.

    Parameters
    ----------
    path : str or path-like
        A ``.pkl`` file, e.g. a cryoDRGN pose or CTF file.

    Returns
    -------
    object
        The unpickled object (typically an ``np.ndarray`` or a tuple of them).

    Raises
    ------
    InputError
        If the file is missing, is not a pickle, is truncated, or references any global
        other than the numpy/builtin ones listed above (nothing from it is executed).
    """
    path = require_file(path, "pickle file")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return _ArrayUnpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as exc:
        raise InputError(path, None, f"not a readable pickle file ({type(exc).__name__}: {exc})") from exc


def save_pickle(obj: Any, path: PathLike) -> None:
    """Pickle ``obj`` to ``path`` atomically with protocol 4 (readable by cryoDRGN).

    Parameters
    ----------
    obj : object
        Typically an ``np.ndarray`` or a tuple of arrays.
    path : str or path-like
        Output file; a previous file of that name survives a failed write.
    """
    with atomic_open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=PICKLE_PROTOCOL)
