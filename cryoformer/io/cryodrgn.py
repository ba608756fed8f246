"""cryoDRGN pose and CTF ``.pkl`` files.

Formats (as written by ``cryodrgn parse_pose_star`` / ``parse_ctf_star`` and friends)
---------------------------------------------------------------------------------------
* Poses: a tuple ``(rot, trans)`` with ``rot`` ``[N, 3, 3]`` (the docs/conventions.md matrix ``R``) and
  ``trans`` ``[N, 2]`` in *fractions of the box*; or ``rot`` alone (no shifts). cryoformer keeps
  shifts in pixels, so ``shifts_px = trans × D`` and reading ``trans`` needs the box size ``D``.
* CTF: ``[N, 9]`` float32 in the column order of :data:`cryoformer.metadata.CTF_COLUMNS`.

Both are read through :func:`cryoformer.io.safe_pickle.load_pickle`, never plain ``pickle``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from cryoformer.errors import InputError, PathLike
from cryoformer.io.safe_pickle import load_pickle, save_pickle
from cryoformer.io.validate import check_finite_rows, check_rotations, ctf_fields
from cryoformer.metadata import CTF_COLUMNS, CtfParameters, Poses

__all__ = ["read_poses_pkl", "write_poses_pkl", "read_ctf_pkl", "write_ctf_pkl"]


def _as_float_array(value, path: str, what: str) -> np.ndarray:
    """``value`` as a float ndarray, or an InputError saying what ``what`` should have been.

    Finiteness is checked by the callers once the shape is known, so the message can name
    the particle.
    """
    if not isinstance(value, np.ndarray):
        raise InputError(path, what, f"expected a numpy array, found {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.number):
        raise InputError(path, what, f"expected a numeric array, found dtype {value.dtype}")
    if value.ndim == 0:
        raise InputError(path, what, "expected an array with one row per particle, found a single number")
    return value.astype(np.float32, copy=False)


def read_poses_pkl(path: PathLike, box_size: Optional[int] = None) -> Poses:
    """Read a cryoDRGN pose pickle.

    Parameters
    ----------
    path : str or path-like
        ``.pkl`` holding ``(rot [N,3,3], trans [N,2])`` or ``rot [N,3,3]``.
    box_size : int, optional
        Box size ``D`` (px) the fractional ``trans`` refers to. Required when the file holds
        translations; recorded in the returned :class:`Poses` either way.

    Returns
    -------
    Poses
        Rotations ``[N,3,3]`` and shifts in pixels ``[N,2]`` (= ``trans × D``; zeros if the file
        holds rotations only).

    Raises
    ------
    InputError
        Wrong structure or shapes, non-finite values, matrices that are not rotations
        (:func:`cryoformer.io.validate.check_rotations`, naming the first bad particle), or
        translations without ``box_size``.
    """
    path = os.fspath(path)
    obj = load_pickle(path)
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2:
            raise InputError(path, None, f"expected a tuple (rot, trans), found a {type(obj).__name__} "
                             f"of {len(obj)} items")
        rot, trans = obj
    else:
        rot, trans = obj, None
    rot = _as_float_array(rot, path, "rot")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(path, "rot", f"expected rotation matrices of shape [N, 3, 3], found {list(rot.shape)}")
    n = rot.shape[0]
    if trans is None:
        shifts = np.zeros((n, 2), dtype=np.float32)
    else:
        trans = _as_float_array(trans, path, "trans")
        if trans.shape != (n, 2):
            raise InputError(path, "trans", f"expected translations of shape [{n}, 2], found {list(trans.shape)}")
        if box_size is None:
            raise InputError(path, "trans", "translations are stored as fractions of the box, so the box size "
                             "is needed to convert them to pixels (pass box_size / -D)")
        check_finite_rows(trans, path, "trans", "translation")
        shifts = trans * np.float32(box_size)
    check_rotations(rot, path, "rot")
    return Poses(rot, shifts, None if box_size is None else int(box_size))


def write_poses_pkl(poses: Poses, path: PathLike) -> None:
    """Write ``poses`` as a cryoDRGN ``(rot, trans)`` pickle, ``trans = shifts_px / D``.

    Parameters
    ----------
    poses : Poses
        Must carry ``box_size`` (the fractional translations need it).
    path : str or path-like
        Output ``.pkl``, written atomically.
    """
    if poses.box_size is None:
        raise ValueError("poses.box_size is needed to write cryoDRGN fractional translations")
    trans = (poses.shifts_px / np.float32(poses.box_size)).astype(np.float32)
    save_pickle((np.asarray(poses.rotations, dtype=np.float32), trans), path)


def read_ctf_pkl(path: PathLike) -> CtfParameters:
    """Read a cryoDRGN CTF pickle (``[N, 9]`` float32, columns of ``CTF_COLUMNS``).

    Raises
    ------
    InputError
        If the pickle does not hold a finite numeric ``[N, 9]`` array.
    """
    path = os.fspath(path)
    arr = _as_float_array(load_pickle(path), path, "ctf")
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise InputError(path, "ctf", f"expected CTF parameters of shape [N, 9], found {list(arr.shape)}")
    for name, field in ctf_fields(path).items():  # NaN named by column and particle
        check_finite_rows(arr[:, CTF_COLUMNS.index(name)], path, field)
    return CtfParameters(arr)


def write_ctf_pkl(ctf: CtfParameters, path: PathLike) -> None:
    """Write the ``[N, 9]`` float32 CTF array as a cryoDRGN pickle (atomically).

    The optional B-factor is not part of the cryoDRGN format and is not written.
    """
    save_pickle(np.asarray(ctf.array, dtype=np.float32), path)
