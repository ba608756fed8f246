"""Choose the reader for poses and CTF parameters by file extension.

``.pkl`` → cryoDRGN pickle, ``.star`` → RELION, ``.cs`` → cryoSPARC. Anything else is an
:class:`InputError`, never a guess. Every command reads poses and CTF through these two
functions, so what they check (:mod:`cryoformer.io.validate`: rotations, finite shifts, CTF
values after the overrides) holds for all of them.
"""

from __future__ import annotations

import os
from typing import Optional

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.cryodrgn import read_ctf_pkl, read_poses_pkl
from cryoformer.io.cryosparc import ctf_from_cs, poses_from_cs
from cryoformer.io.star import ctf_from_star, poses_from_star, read_star, star_pixel_size_column
from cryoformer.io.validate import check_ctf, check_finite_rows, ctf_fields
from cryoformer.metadata import CTF_COLUMNS, CtfParameters, Poses

__all__ = ["load_poses", "load_ctf"]

_KNOWN = (".pkl", ".star", ".cs")


def _extension(path: str, what: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _KNOWN:
        raise InputError(path, None, f"unknown {what} file extension {ext or '(none)'!r}; expected "
                         ".pkl (cryoDRGN), .star (RELION) or .cs (cryoSPARC)")
    return ext


def load_poses(path: PathLike, box_size: Optional[int] = None,
               pixel_size_angstrom: Optional[float] = None, cs_class: Optional[int] = None) -> Poses:
    """Read poses from a cryoDRGN ``.pkl``, RELION ``.star`` or cryoSPARC ``.cs`` file.

    Parameters
    ----------
    path : str or path-like
    box_size : int, optional
        Box size ``D`` (px): needed for cryoDRGN fractional translations; overrides the
        file's value for ``.star`` / ``.cs``.
    pixel_size_angstrom : float, optional
        Å/px of the images the poses are for; for a ``.star`` it overrides the file's pixel
        size (``rlnOriginX/YAngst`` are divided by it; ``rlnOriginX/Y`` in px are rescaled by
        the file's pixel size / this one; :func:`cryoformer.io.star.star_origin_units`).
        Ignored for ``.pkl`` and ``.cs`` (their shifts are in box fractions or px of a box).
    cs_class : int, optional
        For a cryoSPARC ``.cs`` with per-class poses (``alignments_class_K/pose``): the class
        ``K`` to read (see :func:`cryoformer.io.cryosparc.poses_from_cs`). An InputError for
        other files, so a class never goes silently unused.

    Returns
    -------
    Poses
        Rotations ``[N, 3, 3]`` and shifts in pixels ``[N, 2]`` (docs/conventions.md).
    """
    path = require_file(path, "pose file")
    ext = _extension(path, "pose")
    if cs_class is not None and ext != ".cs":
        raise InputError(path, "--cs-class", "a class can only be chosen for a cryoSPARC .cs pose file")
    if ext == ".pkl":
        return read_poses_pkl(path, box_size=box_size)  # checks the matrices are rotations
    # Rotations built from Euler angles / rotation vectors are rotations; the shifts are
    # divided by a pixel size, which could still make them infinite.
    if ext == ".star":
        poses = poses_from_star(read_star(path), box_size=box_size, pixel_size_angstrom=pixel_size_angstrom)
        check_finite_rows(poses.shifts_px, path, "_rlnOriginXAngst", "origin")
        return poses
    return poses_from_cs(path, box_size=box_size, cs_class=cs_class)


def load_ctf(path: PathLike, box_size: Optional[int] = None, pixel_size_angstrom: Optional[float] = None,
             voltage_kv: Optional[float] = None, spherical_aberration_mm: Optional[float] = None,
             amplitude_contrast: Optional[float] = None, phase_shift_deg: Optional[float] = None,
             default_box_size: Optional[int] = None) -> CtfParameters:
    """Read CTF parameters from a cryoDRGN ``.pkl``, RELION ``.star`` or cryoSPARC ``.cs`` file.

    Every override given replaces the corresponding value for all particles (as cryoDRGN's
    ``parse_ctf_star`` / ``parse_ctf_csparc`` options do), for ``.pkl`` files too.
    ``default_box_size`` is the box for a ``.star``/``.cs`` that records none (a ``box_size``
    override replaces the file's box; this only fills a missing one).

    Returns
    -------
    CtfParameters
        ``[N, 9]`` in the cryoDRGN column order.

    Raises
    ------
    InputError
        Besides unreadable files: a value that is not finite or not physical
        (:func:`cryoformer.io.validate.check_ctf`), naming the column and first particle.
    """
    path = require_file(path, "CTF file")
    ext = _extension(path, "CTF")
    overrides = dict(voltage_kv=voltage_kv, spherical_aberration_mm=spherical_aberration_mm,
                     amplitude_contrast=amplitude_contrast, phase_shift_deg=phase_shift_deg)
    columns = dict(box_size=box_size, pixel_size_angstrom=pixel_size_angstrom, **overrides)
    overridden = [name for name, value in columns.items() if value is not None]
    if ext == ".star":
        star = read_star(path)
        ctf = ctf_from_star(star, box_size, pixel_size_angstrom, **overrides, default_box_size=default_box_size)
        fields = ctf_fields(path, overridden, star_pixel_size_column(star))
    elif ext == ".cs":
        ctf = ctf_from_cs(path, box_size, pixel_size_angstrom, **overrides, default_box_size=default_box_size)
        fields = ctf_fields(path, overridden)
    else:
        ctf = read_ctf_pkl(path)
        if overridden:
            array = ctf.array.copy()
            for name in overridden:
                array[:, CTF_COLUMNS.index(name)] = columns[name]
            ctf = CtfParameters(array, ctf.bfactor_angstrom2)
        fields = ctf_fields(path, overridden)
    check_ctf(ctf, path, fields)
    return ctf

