"""Checks of what was read: rotations, CTF values, pixel-size groups, and image pixels.

Every reader ends here before its values reach the physics, so a misread file stops with one
:class:`~cryoformer.errors.InputError` naming the file, the field and the first bad particle
instead of training a plausible map from wrong numbers. Particle numbers in messages are
0-based (as ``--ind`` and cryoDRGN count); images inside a stack are written RELION's way,
``4@stack.mrcs`` being its 4th image.

Tolerances (measured, docs/architecture.md "Validation layer")
--------------------------------------------------------------
* :data:`ROTATION_TOLERANCE` ``1e-3`` on ``max|RᵀR − I|`` and ``|det R − 1|``: cryoDRGN's
  float32 pose pickles reach 5e-7, matrices printed with 6 decimals 2e-6, with 4 decimals 2e-4;
  a reflection has ``det = −1`` and a scaled or sheared matrix errors of order 0.1.
* :data:`PHYSICAL_BOX_RTOL` ``5e-3`` on the physical box ``D · Å/px``: boxes are even, so a
  box read for another stack differs by at least ``2/D`` (0.5 % at D = 400), while pixel
  sizes rounded to a few digits in headers differ by less.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from cryoformer.errors import InputError, PathLike
from cryoformer.metadata import CTF_COLUMNS, CtfParameters

__all__ = [
    "ROTATION_TOLERANCE", "PHYSICAL_BOX_RTOL", "PLACEHOLDER_PIXEL_SIZE",
    "check_rotations", "check_finite_rows", "check_ctf", "ctf_fields",
    "pixel_size_groups", "describe_pixel_groups", "check_one_pixel_size",
    "check_images", "scan_images",
]

ROTATION_TOLERANCE = 1e-3
PHYSICAL_BOX_RTOL = 5e-3
# cryoDRGN (before 3.0), EMAN2 and several scripts write 1 Å/px into a stack header when they
# do not know the pixel size, so a header value of exactly 1 is not evidence against the CTF.
PLACEHOLDER_PIXEL_SIZE = 1.0
# Bytes of pixels read per step of the image scan (bounded memory, large sequential reads).
SCAN_CHUNK_BYTES = 32 * 2 ** 20
# Bad particles named in a message (the count of all of them is given too).
LISTED = 5


def _list(indices: Sequence[int]) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:LISTED])
    return shown + (", …" if len(indices) > LISTED else "")


def check_finite_rows(values: np.ndarray, path: Optional[PathLike], field: str, what: str = "value") -> None:
    """Raise unless every row of ``values`` ``[N, ...]`` is finite, naming the first bad particle."""
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    ok = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1) if arr.ndim > 1 else np.isfinite(arr)
    if not ok.all():
        bad = np.nonzero(~ok)[0]
        raise InputError(path, field, f"particle {int(bad[0])} has a NaN or infinite {what} "
                         f"({bad.size} of {arr.shape[0]} particles: {_list(bad)}); the file is damaged "
                         "or was written from a diverged refinement")


def check_rotations(rotations: np.ndarray, path: Optional[PathLike], field: str = "rot",
                    tolerance: float = ROTATION_TOLERANCE) -> None:
    """Raise unless every ``rotations[i]`` ``[N, 3, 3]`` is a proper rotation matrix.

    Parameters
    ----------
    rotations : np.ndarray
        ``[N, 3, 3]``.
    path : path or None
        File named in the message.
    field : str
        Field named in the message (``"rot"`` for a cryoDRGN pose pickle).
    tolerance : float
        Largest accepted ``max|RᵀR − I|`` and ``|det R − 1|`` (see the module docstring).
    """
    r = np.asarray(rotations, dtype=np.float64)  # [N, 3, 3]
    check_finite_rows(r, path, field, "rotation matrix")
    ortho = np.abs(np.einsum("nji,njk->nik", r, r) - np.eye(3)).max(axis=(1, 2))  # [N]
    det = np.linalg.det(r) if r.shape[0] else np.zeros(0)  # [N]
    bad = np.nonzero((ortho > tolerance) | (np.abs(det - 1.0) > tolerance))[0]
    if bad.size == 0:
        return
    i = int(bad[0])
    if ortho[i] <= tolerance:
        kind = f"det R = {det[i]:.4f}: a reflection, not a rotation (an axis flipped?)"
    else:
        kind = f"max|RᵀR − I| = {ortho[i]:.3g}, det R = {det[i]:.4g}: not orthonormal"
    raise InputError(path, field, f"particle {i} is not a rotation matrix ({kind}; tolerance "
                     f"{tolerance:g}); {bad.size} of {r.shape[0]} particles are affected: {_list(bad)}. "
                     "Expected rotation matrices R [N, 3, 3] as cryoDRGN's parse_pose_star writes them; "
                     "regenerate the file with `cryoformer parse-poses`")


# What each CTF column must satisfy: (test, expected, hint).
_CTF_RULES = {
    "box_size": (lambda v: v >= 2, "a box size >= 2 px", ""),
    "pixel_size_angstrom": (lambda v: v > 0, "> 0 Å/px", ""),
    "defocus_u_angstrom": (lambda v: v > 0, "> 0 Å",
                           " (RELION, cryoSPARC and cryoDRGN store underfocus as a positive defocus in Å; "
                           "0 or less means no CTF was estimated for this particle)"),
    "defocus_v_angstrom": (lambda v: v > 0, "> 0 Å",
                           " (RELION, cryoSPARC and cryoDRGN store underfocus as a positive defocus in Å; "
                           "0 or less means no CTF was estimated for this particle)"),
    "astigmatism_angle_deg": (lambda v: np.ones_like(v, dtype=bool), "a finite angle", ""),
    "voltage_kv": (lambda v: v > 0, "> 0 kV (e.g. 300)", ""),
    "spherical_aberration_mm": (lambda v: np.ones_like(v, dtype=bool), "a finite value in mm", ""),
    "amplitude_contrast": (lambda v: (v >= 0) & (v <= 1), "a fraction in [0, 1] (typically 0.07–0.1)",
                           " (a percentage or a phase?)"),
    "phase_shift_deg": (lambda v: np.ones_like(v, dtype=bool), "a finite angle in degrees", ""),
}

_STAR_FIELDS = ("_rlnImageSize", "_rlnImagePixelSize", "_rlnDefocusU", "_rlnDefocusV", "_rlnDefocusAngle",
                "_rlnVoltage", "_rlnSphericalAberration", "_rlnAmplitudeContrast", "_rlnPhaseShift")
_CS_FIELDS = ("blob/shape", "blob/psize_A", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv",
              "ctf/cs_mm", "ctf/amp_contrast", "ctf/phase_shift_rad")
# Overrides come from the command line (parse-ctf's and project's option names).
_OVERRIDE_OPTIONS = {"box_size": "-D", "pixel_size_angstrom": "--Apix", "voltage_kv": "--kv",
                     "spherical_aberration_mm": "--cs", "amplitude_contrast": "-w", "phase_shift_deg": "--ps"}


def ctf_fields(path: PathLike, overridden: Sequence[str] = (), pixel_size_column: Optional[str] = None
               ) -> Dict[str, str]:
    """Name of each CTF column in the file ``path`` (by extension), for messages.

    Parameters
    ----------
    path : path
    overridden : sequence of str
        Columns (names of :data:`CTF_COLUMNS`) replaced by a command-line value.
    pixel_size_column : str, optional
        The star column the pixel size came from, when not ``_rlnImagePixelSize``.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".star":
        names = list(_STAR_FIELDS)
        if pixel_size_column:
            names[1] = pixel_size_column
    elif ext == ".cs":
        names = list(_CS_FIELDS)
    else:
        names = [f"ctf[:, {j}] ({name})" for j, name in enumerate(CTF_COLUMNS)]
    fields = dict(zip(CTF_COLUMNS, names))
    for name in overridden:
        fields[name] = f"{_OVERRIDE_OPTIONS.get(name, name)} (given on the command line)"
    return fields


def check_ctf(ctf: CtfParameters, path: Optional[PathLike], fields: Optional[Dict[str, str]] = None) -> None:
    """Raise unless every CTF value is finite and physically possible.

    Checked per column (first bad particle named): box ≥ 2 px, pixel size > 0, defocus U and
    V > 0 Å (underfocus positive, the RELION / cryoDRGN convention), voltage > 0, amplitude
    contrast in [0, 1], everything finite (the B-factor too).
    """
    fields = fields or ctf_fields(path or "x.pkl")
    arr = np.asarray(ctf.array, dtype=np.float64)  # [N, 9]
    for j, name in enumerate(CTF_COLUMNS):
        column = arr[:, j]
        check_finite_rows(column, path, fields[name], "value")
        test, expected, hint = _CTF_RULES[name]
        bad = np.nonzero(~test(column))[0]
        if bad.size:
            i = int(bad[0])
            raise InputError(path, fields[name], f"particle {i} has {column[i]:g}; expected {expected}"
                             f"{hint}; {bad.size} of {arr.shape[0]} particles are affected: {_list(bad)}")
    if ctf.bfactor_angstrom2 is not None:
        check_finite_rows(np.asarray(ctf.bfactor_angstrom2, dtype=np.float64), path, "B-factor", "value")


def pixel_size_groups(ctf: CtfParameters, rows: Optional[np.ndarray] = None
                      ) -> List[Tuple[int, float, int, int]]:
    """Distinct ``(box D px, Å/px)`` pairs among ``rows`` (default all).

    Returns
    -------
    list of (box_px, pixel_size_angstrom, n_particles, first_particle)
        In order of first appearance.
    """
    rows = np.arange(len(ctf)) if rows is None else np.asarray(rows, dtype=np.int64)
    pairs = ctf.array[rows][:, :2].astype(np.float64)  # [M, 2]
    if rows.size == 0:
        return []
    unique, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), minlength=len(unique))
    groups = [(int(round(u[0])), float(u[1]), int(c), int(rows[f])) for u, c, f in zip(unique, counts, first)]
    return sorted(groups, key=lambda g: g[3])


def describe_pixel_groups(ctf: CtfParameters, rows: Optional[np.ndarray] = None) -> str:
    """One line: ``D=64 px, 1.06 Å/px`` or, for several groups, each with its particle count."""
    groups = pixel_size_groups(ctf, rows)
    if len(groups) == 1:
        d, apix, _, _ = groups[0]
        return f"D={d}, {apix:g} Å/px"
    return f"{len(groups)} pixel-size groups: " + "; ".join(
        f"D={d}, {apix:g} Å/px for {n} particles (first {first})" for d, apix, n, first in groups)


def check_one_pixel_size(ctf: CtfParameters, path: Optional[PathLike], rows: Optional[np.ndarray] = None,
                         field: Optional[str] = None, group_labels: Optional[np.ndarray] = None) -> float:
    """The one physical pixel size of ``rows`` at box ``ctf`` column 0; InputError if they differ.

    A model has one voxel grid, so particles whose physical box ``D · Å/px`` differs by more
    than :data:`PHYSICAL_BOX_RTOL` (several optics groups or cryoSPARC exposure groups at
    different pixel sizes) cannot be trained together correctly.

    Parameters
    ----------
    ctf : CtfParameters
    path : path or None
    rows : np.ndarray, optional
        The particles that will be used (default all).
    field : str, optional
        Field named in the message (default the pixel-size column of the format).
    group_labels : np.ndarray, optional
        ``[N]`` optics group of every particle, named in the message when given.

    Returns
    -------
    float
        The median physical box in Å.
    """
    rows = np.arange(len(ctf)) if rows is None else np.asarray(rows, dtype=np.int64)
    arr = ctf.array[rows].astype(np.float64)  # [M, 9]
    physical = arr[:, 0] * arr[:, 1]  # [M] Å
    box = float(np.median(physical)) if rows.size else 0.0
    if rows.size == 0 or np.all(np.abs(physical / box - 1.0) <= PHYSICAL_BOX_RTOL):
        return box
    groups = pixel_size_groups(ctf, rows)
    parts = []
    for d, apix, n, first in groups[:6]:
        label = ""
        if group_labels is not None:
            label = f"optics group {group_labels[first]}: "
        parts.append(f"{label}D={d} px at {apix:g} Å/px ({n} particles, first {first})")
    field = field or ctf_fields(path or "x.pkl")["pixel_size_angstrom"]
    raise InputError(path, field, f"the particles have {len(groups)} different pixel or box sizes "
                     f"({'; '.join(parts)}{'; …' if len(groups) > 6 else ''}), but one model has one "
                     "voxel size: train one group at a time (--ind with the indices of one group; e.g. "
                     "relion_star_handler --select rlnOpticsGroup --minval 1 --maxval 1 selects group 1) "
                     "or rescale every group to one pixel size and box (relion_image_handler "
                     "--rescale_angpix A --new_box D) first")


def _bad_images(block: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(non-finite [n] bool, constant [n] bool)`` for the images of ``block`` ``[n, D, D]``."""
    flat = block.reshape(block.shape[0], -1)  # [n, D·D], a view of contiguous images
    hi = flat.max(axis=1)  # NaN propagates through max and min; ±inf shows in one of them
    lo = flat.min(axis=1)
    if np.issubdtype(flat.dtype, np.floating):
        nonfinite = ~(np.isfinite(hi) & np.isfinite(lo))
    else:
        nonfinite = np.zeros(flat.shape[0], dtype=bool)
    return nonfinite, (hi == lo) & ~nonfinite


def _image_name(source, particle: int) -> str:
    fid = int(source.file_of[particle])
    return f"{int(source.index_in_file[particle]) + 1}@{os.path.basename(source.files[fid])}"


def _raise_bad(source, bad: np.ndarray, n_used: int, kind: str) -> None:
    bad = np.sort(bad)
    first = int(bad[0])
    stack = source.files[int(source.file_of[first])]
    named = ", ".join(f"{int(p)} ({_image_name(source, int(p))})" for p in bad[:LISTED])
    more = ", …" if bad.size > LISTED else ""
    if kind == "nonfinite":
        raise InputError(stack, "pixels", f"{bad.size} of {n_used} particle images contain NaN or infinite "
                         f"pixels: particles {named}{more}; the stack is damaged (re-extract or re-export it) "
                         "or leave them out (train --ind with the other particles)")
    if bad.size == n_used:
        raise InputError(stack, "pixels", f"all {n_used} particle images are constant (every pixel equal, "
                         f"e.g. all zero): particles {named}{more}; the stack holds no images (a failed "
                         "extraction, or the wrong file?)")
    raise InputError(stack, "pixels", f"{bad.size} of {n_used} particle images are constant (every pixel "
                     f"equal, e.g. all zero, as at a micrograph edge): particles {named}{more}; they carry no "
                     "signal: leave them out (train --ind with the other particles)")


def check_images(source, images: np.ndarray, particles: np.ndarray, constant: bool = False) -> None:
    """Raise if any of ``images`` ``[n, D, D]`` (particles ``particles`` of ``source``) has a
    NaN or infinite pixel (or, with ``constant``, is constant). For chunked readers."""
    nonfinite, const = _bad_images(np.asarray(images))
    particles = np.asarray(particles, dtype=np.int64)
    if nonfinite.any():
        _raise_bad(source, particles[nonfinite], len(source), "nonfinite")
    if constant and const.any():
        _raise_bad(source, particles[const], len(source), "constant")


def scan_images(source, indices: Optional[np.ndarray] = None, progress: bool = True) -> None:
    """Read every image used once, memory-mapped, and refuse NaN/inf or constant images.

    Stacks are read file by file in increasing image order, :data:`SCAN_CHUNK_BYTES` at a
    time, so the scan runs at the disk's sequential speed (docs/architecture.md gives the
    measured rate) and holds one chunk in memory.

    Parameters
    ----------
    source : ImageSource
    indices : np.ndarray, optional
        ``[M]`` particles used (default all).
    progress : bool
        Show a tqdm progress bar (only on a terminal).

    Raises
    ------
    InputError
        Naming the stack of the first bad image, the number of bad images and the first few
        particles (with their ``index@stack``): NaN or infinite pixels; images whose pixels
        are all equal (an all-zero stack, blank images).
    """
    used = np.arange(len(source), dtype=np.int64) if indices is None else np.unique(np.asarray(indices, np.int64))
    file_of = source.file_of[used]  # [M]
    local = source.index_in_file[used]  # [M]
    order = np.lexsort((local, file_of))  # by stack, then image: sequential reads
    used, file_of, local = used[order], file_of[order], local[order]
    per_chunk = max(1, SCAN_CHUNK_BYTES // (4 * source.box_size * source.box_size))
    bad_nonfinite: List[np.ndarray] = []
    bad_constant: List[np.ndarray] = []
    # disable=None: no bar when stderr is not a terminal (logs, tests), where it would only add lines.
    with tqdm(total=used.size, desc="checking images", unit="img", disable=None if progress else True,
              leave=False) as bar:
        bounds = np.flatnonzero(np.diff(file_of)) + 1
        for lo_f, hi_f in zip(np.r_[0, bounds], np.r_[bounds, used.size]):
            data = source.stack_data(int(file_of[lo_f]))  # [n, D, D] memory-mapped
            for start in range(lo_f, hi_f, per_chunk):
                stop = min(start + per_chunk, hi_f)
                first, last = int(local[start]), int(local[stop - 1])
                if last - first == stop - start - 1:  # a contiguous run: a slice, no copy
                    block = data[first:last + 1]
                else:
                    block = data[local[start:stop]]
                nonfinite, const = _bad_images(block)
                source.release(int(file_of[lo_f]), local[start:stop])  # a scan must not keep the stack resident
                if nonfinite.any():
                    bad_nonfinite.append(used[start:stop][nonfinite])
                if const.any():
                    bad_constant.append(used[start:stop][const])
                bar.update(stop - start)
    if bad_nonfinite:
        _raise_bad(source, np.concatenate(bad_nonfinite), used.size, "nonfinite")
    if bad_constant:
        _raise_bad(source, np.concatenate(bad_constant), used.size, "constant")
