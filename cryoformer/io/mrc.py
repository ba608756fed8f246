"""MRC/CCP4 volumes: reading with validation, atomic writing with the voxel size set.

Arrays follow docs/conventions.md: a volume is ``[z, y, x]`` float32, which is the order mrcfile uses
(``nz, ny, nx``), so no transpose is needed.

Multi-channel volumes (e.g. the attention maps, ``[C, D, D, D]``) are written as an MRC
*volume stack* (space group 401, ``nz = C·D``, ``mz = D``). :func:`read_volume` refuses them
(it returns one volume); read them back with :func:`read_volume_stack`, which returns
``[C, D, D, D]``. UCSF ChimeraX and mrcfile both open volume stacks as ``C`` separate maps.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Tuple

import mrcfile
import numpy as np

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.atomic import atomic_path

__all__ = ["read_volume", "read_volume_stack", "write_volume"]

# Real-valued MRC modes mrcfile can return: int8, int16, float32, uint16, float16.
_REAL_MODES = {0, 1, 2, 6, 12}


def _open_checked(path: PathLike):
    """Read ``path`` fully with mrcfile, turning every format problem into an InputError."""
    path = require_file(path, "map file")
    try:
        # mrcfile warns (rather than raises) about some header oddities even when strict;
        # they are not errors for us, and a corrupt file still raises ValueError below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                mode = int(mrc.header.mode)
                data = np.array(mrc.data, copy=True) if mrc.data is not None else None
                voxel = mrc.voxel_size
                voxel = (float(voxel.x), float(voxel.y), float(voxel.z))
                is_volume_stack = bool(mrc.is_volume_stack())
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, None, f"not a readable MRC file ({exc})") from exc
    if data is None or data.size == 0:
        raise InputError(path, None, "MRC file holds no data")
    if mode not in _REAL_MODES:
        raise InputError(path, "mode", f"MRC mode {mode} is not a real-valued map (expected 0, 1, 2, 6 or 12)")
    if not np.all(np.isfinite(data)):
        raise InputError(path, None, "map contains NaN or infinite values")
    if not np.allclose(voxel, voxel[0], rtol=1e-3):
        raise InputError(path, "voxel_size", f"anisotropic voxels {voxel} Å are not supported")
    return path, data.astype(np.float32, copy=False), voxel[0], is_volume_stack


def _check_cubic(path: str, shape: Sequence[int], require_cubic: bool) -> None:
    if require_cubic and len(set(shape)) != 1:
        # Reported as nx×ny×nz, the order of the MRC header and of viewers such as ChimeraX.
        dims = "×".join(str(s) for s in reversed(tuple(shape)))
        raise InputError(path, None, f"map is {dims} but a cubic box is required")


def read_volume(path: PathLike, require_cubic: bool = True) -> Tuple[np.ndarray, float]:
    """Read a single 3-D map.

    Parameters
    ----------
    path : str or path-like
        ``.mrc`` / ``.map`` file.
    require_cubic : bool
        Refuse maps whose three dimensions differ.

    Returns
    -------
    volume : np.ndarray
        ``[z, y, x]`` float32 (``[D, D, D]`` when cubic).
    voxel_size_angstrom : float
        Voxel size from the header, Å. ``0.0`` means the header does not record one.

    Raises
    ------
    InputError
        Missing, truncated or non-MRC file; complex data; a volume stack; a 2-D image; a
        non-cubic map when ``require_cubic``.
    """
    path, data, voxel, is_stack = _open_checked(path)
    if is_stack or data.ndim == 4:
        raise InputError(path, None, f"file is a stack of {data.shape[0]} volumes; read it with "
                         "read_volume_stack")
    if data.ndim != 3:
        raise InputError(path, None, f"expected a 3-D map, found an array of shape {list(data.shape)}")
    _check_cubic(path, data.shape, require_cubic)
    return data, voxel


def read_volume_stack(path: PathLike, require_cubic: bool = True) -> Tuple[np.ndarray, float]:
    """Read a multi-channel map written by :func:`write_volume` (``[C, D, D, D]``).

    A plain 3-D map is returned with ``C = 1``.
    """
    path, data, voxel, _ = _open_checked(path)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise InputError(path, None, f"expected a volume stack, found an array of shape {list(data.shape)}")
    _check_cubic(path, data.shape[1:], require_cubic)
    return data, voxel


def write_volume(
    path: PathLike,
    volume: np.ndarray,
    voxel_size_angstrom: float,
    origin: Optional[Sequence[float]] = None,
) -> None:
    """Write a map atomically as float32 MRC (mode 2).

    Parameters
    ----------
    path : str or path-like
        Output ``.mrc``.
    volume : np.ndarray
        ``[z, y, x]`` (``[D, D, D]``), or ``[C, D, D, D]`` for a multi-channel map, which is
        written as an MRC volume stack (read back with :func:`read_volume_stack`).
    voxel_size_angstrom : float
        Voxel size in Å, stored in the header (``cella = shape × voxel size``).
    origin : sequence of 3 floats, optional
        Header origin ``(x, y, z)`` in Å; left at zero by default (the convention RELION and
        cryoDRGN write).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim not in (3, 4):
        raise ValueError(f"volume must be [D, D, D] or [C, D, D, D], got shape {vol.shape}")
    if not voxel_size_angstrom > 0:
        raise ValueError(f"voxel_size_angstrom must be positive, got {voxel_size_angstrom}")
    with atomic_path(path, suffix=os.path.splitext(os.fspath(path))[1]) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            # set_data marks a 4-D array as a volume stack (ispg 401, mz = D) by itself.
            mrc.set_data(np.ascontiguousarray(vol))
            mrc.voxel_size = float(voxel_size_angstrom)
            if origin is not None:
                ox, oy, oz = (float(v) for v in origin)
                mrc.header.origin = (ox, oy, oz)
            mrc.update_header_stats()
