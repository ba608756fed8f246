"""cryoSPARC ``.cs`` particle files (numpy structured arrays saved with ``np.save``).

Fields used (units as cryoSPARC stores them)
--------------------------------------------
* ``alignments3D/pose`` ``[N, 3]``: axis-angle vector (rad) of ``Rᵀ``; cryoDRGN's
  ``parse_pose_csparc`` converts it and transposes, and so do we, so the rotation matches
  docs/conventions.md. ``alignments3D/shift`` ``[N, 2]``: shift in pixels of the refinement box (= ``s``).
* ``alignments_class_K/pose``, ``/shift``, ``/psize_A``, ``/class_posterior``: the same per
  class ``K`` (ab-initio reconstruction, heterogeneous refinement), instead of or beside
  ``alignments3D``; read with ``cs_class=K`` (:func:`poses_from_cs`).
* ``ctf/df1_A``, ``ctf/df2_A`` (Å), ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
  ``ctf/amp_contrast``, ``ctf/phase_shift_rad``, optional ``ctf/bfactor`` (Å²).
* ``blob/path`` (bytes), ``blob/idx`` (0-based), ``blob/shape`` ``[N, 2]`` (px),
  ``blob/psize_A`` (Å/px).

Functions taking ``cs`` accept a structured array or a path; with a path, errors name the file.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io._rotations import axis_angle_to_matrix, matrix_to_axis_angle
from cryoformer.io.atomic import atomic_open
from cryoformer.io.validate import check_finite_rows
from cryoformer.metadata import CtfParameters, Poses

__all__ = ["read_cs", "poses_from_cs", "ctf_from_cs", "write_cs", "cs_image_locations", "cs_pose_classes",
           "cs_class_counts", "cs_rotations", "cs_pose_vectors", "with_cs_poses"]

CsLike = Union[np.ndarray, PathLike]


def read_cs(path: PathLike) -> np.ndarray:
    """Load a ``.cs`` file as a numpy structured array ``[N]`` (no pickled objects allowed)."""
    path = require_file(path, "cryoSPARC file")
    try:
        cs = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, None, f"not a readable cryoSPARC .cs file ({exc})") from exc
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        raise InputError(path, None, "not a cryoSPARC .cs file: expected a 1-D numpy structured array")
    return cs


def _load(cs: CsLike) -> Tuple[np.ndarray, Optional[str]]:
    if isinstance(cs, np.ndarray):
        if cs.dtype.names is None:
            raise InputError(None, None, "not a cryoSPARC table: expected a numpy structured array")
        return cs, None
    path = os.fspath(cs)
    return read_cs(path), path


def _field(cs: np.ndarray, path: Optional[str], name: str, width: Optional[int] = None) -> np.ndarray:
    """Numeric field ``name`` as float64, ``[N]`` or ``[N, width]``; InputError if missing/bad."""
    if name not in cs.dtype.names:
        raise InputError(path, name, "required field is missing")
    values = np.asarray(cs[name])
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(path, name, f"expected numbers, found dtype {values.dtype}")
    values = values.astype(np.float64)
    expected = (len(cs),) if width is None else (len(cs), width)
    if values.shape != expected:
        raise InputError(path, name, f"expected shape {list(expected)}, found {list(values.shape)}")
    check_finite_rows(values, path, name)
    return values


def _box(cs: np.ndarray, path: Optional[str], override: Optional[int], required: bool,
         default: Optional[int] = None) -> Optional[int]:
    if override is not None:
        return int(override)
    if "blob/shape" not in cs.dtype.names:
        if default is not None:
            return int(default)
        if required:
            raise InputError(path, "blob/shape", "box size not found; pass the box size (-D) explicitly")
        return None
    shape = _field(cs, path, "blob/shape", 2)  # [N, 2]
    shapes = np.unique(shape)
    if shapes.size != 1:
        parts = []
        for size in shapes[:6]:
            rows = np.nonzero((shape == size).any(axis=1))[0]
            parts.append(f"{int(size)} px ({rows.size} particles, first {int(rows[0])})")
        raise InputError(path, "blob/shape", f"expected one square box size for all particles, found "
                         f"{shapes.size}: {'; '.join(parts)}; select particles of one box (e.g. one exposure "
                         "group) or re-extract them at one box size")
    return int(shapes[0])


_CLASS_POSE = re.compile(r"^alignments_class_(\d+)/pose$")


def cs_pose_classes(cs: CsLike) -> List[int]:
    """The classes ``K`` of ``alignments_class_K/pose`` fields (ab-initio, heterogeneous
    refinement), ascending; empty for a file without them."""
    cs, _ = _load(cs)
    return sorted(int(m.group(1)) for name in cs.dtype.names or () if (m := _CLASS_POSE.match(name)))


def cs_class_counts(cs: CsLike) -> Optional[dict]:
    """Particles per class whose ``alignments_class_K/class_posterior`` is the highest
    (``{K: count}``), or ``None`` when the file has no posteriors for every class."""
    cs, _ = _load(cs)
    classes = cs_pose_classes(cs)
    fields = [f"alignments_class_{k}/class_posterior" for k in classes]
    if not classes or any(f not in cs.dtype.names for f in fields):
        return None
    posterior = np.stack([np.asarray(cs[f], dtype=np.float64).reshape(len(cs)) for f in fields], axis=1)  # [N, K]
    best = np.argmax(np.nan_to_num(posterior, nan=-np.inf), axis=1)  # [N]
    return {k: int(np.count_nonzero(best == j)) for j, k in enumerate(classes)}


def _pose_prefix(cs: np.ndarray, path: Optional[str], cs_class: Optional[int]) -> str:
    """The field prefix the poses are read from: ``alignments3D``, or ``alignments_class_K``
    for the chosen class ``cs_class`` (or the only class of a file without ``alignments3D``)."""
    classes = cs_pose_classes(cs)
    names = cs.dtype.names or ()
    if cs_class is None:
        if "alignments3D/pose" in names or not classes:
            return "alignments3D"  # a file with neither: "required field is missing"
        if len(classes) == 1:
            return f"alignments_class_{classes[0]}"
        counts = cs_class_counts(cs)
        listed = ", ".join(f"{k} ({counts[k]} particles most likely)" if counts else str(k) for k in classes)
        raise InputError(path, "alignments3D/pose", f"no consensus poses, but poses of {len(classes)} "
                         f"classes: {listed}; choose one (--cs-class K; cs_class=K in Python), or "
                         "export the particles of one class from cryoSPARC")
    if int(cs_class) not in classes:
        have = ", ".join(str(k) for k in classes) or "none"
        raise InputError(path, f"alignments_class_{int(cs_class)}/pose", f"class {int(cs_class)} not in "
                         f"the file (classes with poses: {have})")
    return f"alignments_class_{int(cs_class)}"


def cs_rotations(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC ``pose`` ``[N, 3]`` (axis-angle of ``Rᵀ``, rad) → ``R`` ``[N, 3, 3]``
    (docs/conventions.md); :func:`cs_pose_vectors` is the inverse."""
    return np.swapaxes(axis_angle_to_matrix(pose), -1, -2)


def cs_pose_vectors(rotations: np.ndarray) -> np.ndarray:
    """``R`` ``[N, 3, 3]`` → cryoSPARC ``pose`` ``[N, 3]`` (axis-angle of ``Rᵀ``, rad)."""
    return matrix_to_axis_angle(np.swapaxes(np.asarray(rotations), -1, -2))


def _shift_scale(cs: np.ndarray, path: Optional[str], prefix: str, box_size: Optional[int]) -> np.ndarray:
    """``[N]`` factor from ``{prefix}/shift`` (px of the alignment) to px of the images of box
    ``box_size`` (default the blob box): alignment Å/px / blob Å/px × ``box_size`` / blob box."""
    names = cs.dtype.names or ()
    scale = np.ones(len(cs))
    if f"{prefix}/psize_A" in names and "blob/psize_A" in names:
        align = np.asarray(cs[f"{prefix}/psize_A"], dtype=np.float64)  # [N] Å/px
        blob = np.asarray(cs["blob/psize_A"], dtype=np.float64)  # [N] Å/px
        bad = np.nonzero(~(np.isfinite(align) & (align > 0) & np.isfinite(blob) & (blob > 0)))[0]
        if bad.size:
            raise InputError(path, f"{prefix}/psize_A", f"particle {int(bad[0])}: pixel sizes "
                             f"{align[bad[0]]:g} (alignment) and {blob[bad[0]]:g} (blob) Å must be "
                             "positive")
        scale = align / blob
    blob_box = _box(cs, path, None, required=False)
    if box_size is not None and blob_box is not None and int(box_size) != blob_box:
        scale = scale * (int(box_size) / blob_box)
    return scale


def poses_from_cs(cs: CsLike, box_size: Optional[int] = None, cs_class: Optional[int] = None) -> Poses:
    """Poses from ``alignments3D/pose`` (transposed Rodrigues matrix) and ``alignments3D/shift`` (px).

    ``box_size`` is the box (px) of the images the poses are for (default ``blob/shape``). When
    it differs from ``blob/shape`` — the particles were downsampled after the refinement — the
    shifts, in pixels of the blob box, are scaled by ``box_size / blob box`` to pixels of the
    images (the same physical shift; cryoDRGN's box-fraction ``trans`` stays the same).

    cryoSPARC stores the shift in pixels of the box the alignment was done at, whose pixel size
    is ``alignments3D/psize_A``. When that differs from the particles' ``blob/psize_A`` (a
    refinement run on downsampled particles, a heterogeneous refinement), the shift is rescaled
    to pixels of the particle images; read as it is, it would be wrong by that ratio.

    ``cs_class`` reads ``alignments_class_K/pose``, ``/shift`` and ``/psize_A`` of class ``K``
    instead (ab-initio and heterogeneous refinement), with the same rescaling. Without it, a
    file that has class poses but no ``alignments3D`` is read from its only class, and one with
    several classes is an InputError listing them (:func:`cs_class_counts`).
    """
    cs, path = _load(cs)
    prefix = _pose_prefix(cs, path, cs_class)
    rotations = cs_rotations(_field(cs, path, f"{prefix}/pose", 3))  # [N, 3, 3]
    shifts = _field(cs, path, f"{prefix}/shift", 2)  # [N, 2] px of the alignment
    shifts = (shifts * _shift_scale(cs, path, prefix, box_size)[:, None]).astype(np.float32)
    return Poses(rotations, shifts, _box(cs, path, box_size, required=False))


def with_cs_poses(cs: CsLike, poses: Poses) -> np.ndarray:
    """A copy of the table ``cs`` with ``alignments3D/pose``, ``/shift`` and ``/psize_A`` set
    from ``poses`` (fields added when missing; every other field kept).

    ``poses.shifts_px`` are in pixels of images of box ``poses.box_size`` (default the blob
    box); they are written in pixels of the blob (``blob/shape``, ``blob/psize_A``), and
    ``alignments3D/psize_A`` is set to ``blob/psize_A`` — :func:`poses_from_cs` at
    ``box_size=poses.box_size`` reads back ``poses``.
    """
    cs, path = _load(cs)
    if len(poses) != len(cs):
        raise ValueError(f"{len(poses)} poses for {len(cs)} rows")
    if "blob/psize_A" not in (cs.dtype.names or ()):
        raise InputError(path, "blob/psize_A", "required field is missing (the pixel size the shifts are in)")
    fields = [(name, cs.dtype.fields[name][0]) for name in cs.dtype.names]
    fields += [(name, dtype) for name, dtype in (("alignments3D/pose", np.dtype(("<f4", (3,)))),
                                                  ("alignments3D/shift", np.dtype(("<f4", (2,)))),
                                                  ("alignments3D/psize_A", np.dtype("<f4")))
               if name not in cs.dtype.names]
    out = np.zeros(len(cs), dtype=np.dtype(fields))
    for name in cs.dtype.names:
        out[name] = cs[name]
    out["alignments3D/psize_A"] = cs["blob/psize_A"]
    blob_box = _box(cs, path, None, required=False)
    scale = 1.0 if poses.box_size is None or blob_box is None else blob_box / int(poses.box_size)
    out["alignments3D/pose"] = cs_pose_vectors(poses.rotations)
    out["alignments3D/shift"] = poses.shifts_px.astype(np.float64) * scale
    return out


def ctf_from_cs(cs: CsLike, box_size: Optional[int] = None, pixel_size_angstrom: Optional[float] = None,
                voltage_kv: Optional[float] = None, spherical_aberration_mm: Optional[float] = None,
                amplitude_contrast: Optional[float] = None, phase_shift_deg: Optional[float] = None,
                default_box_size: Optional[int] = None) -> CtfParameters:
    """CTF parameters as cryoDRGN's ``parse_ctf_csparc`` builds them; overrides replace file values.

    ``default_box_size`` is used when the file has no ``blob/shape`` and ``box_size`` is not given.
    """
    cs, path = _load(cs)
    n = len(cs)

    def value(override, name, scale=1.0):
        if override is not None:
            return np.full(n, float(override))
        return _field(cs, path, name) * scale

    deg = 180.0 / np.pi
    bfactor = _field(cs, path, "ctf/bfactor") if "ctf/bfactor" in cs.dtype.names else None
    return CtfParameters.from_columns(
        n,
        bfactor_angstrom2=bfactor,
        box_size=_box(cs, path, box_size, required=True, default=default_box_size),
        pixel_size_angstrom=value(pixel_size_angstrom, "blob/psize_A"),
        defocus_u_angstrom=_field(cs, path, "ctf/df1_A"),
        defocus_v_angstrom=_field(cs, path, "ctf/df2_A"),
        astigmatism_angle_deg=_field(cs, path, "ctf/df_angle_rad") * deg,
        voltage_kv=value(voltage_kv, "ctf/accel_kv"),
        spherical_aberration_mm=value(spherical_aberration_mm, "ctf/cs_mm"),
        amplitude_contrast=value(amplitude_contrast, "ctf/amp_contrast"),
        phase_shift_deg=value(phase_shift_deg, "ctf/phase_shift_rad", deg),
    )


def write_cs(path: PathLike, poses: Optional[Poses], ctf: Optional[CtfParameters],
             blob_path: Union[str, Sequence[str]], blob_idx: Sequence[int],
             pixel_size_angstrom: Optional[float] = None, box_size: Optional[int] = None) -> None:
    """Write a cryoSPARC-style ``.cs`` table atomically.

    Parameters
    ----------
    path : str or path-like
        Output file; the name is kept as given (``np.save`` writes to an open file object).
    poses : Poses or None
        Written as ``alignments3D/pose`` (axis-angle of ``Rᵀ``) and ``alignments3D/shift`` (px).
    ctf : CtfParameters or None
        Written to the ``ctf/`` fields (angles in radians).
    blob_path : str or sequence of str
        Stack file of every particle (one string for all, or one per particle).
    blob_idx : sequence of int
        0-based index of each particle in its stack.
    pixel_size_angstrom : float, optional
        ``blob/psize_A``; defaults to the CTF pixel size (one of the two is required).
    box_size : int, optional
        ``blob/shape``; defaults to ``poses.box_size``, else the CTF box size.
    """
    idx = np.asarray(blob_idx, dtype=np.int64).reshape(-1)
    n = idx.shape[0]
    paths = _blob_paths(blob_path, n)
    for what, obj in (("poses", poses), ("ctf", ctf)):
        if obj is not None and len(obj) != n:
            raise ValueError(f"{what} has {len(obj)} rows but blob_idx has {n}")
    if pixel_size_angstrom is None:
        if ctf is None:
            raise ValueError("pixel_size_angstrom is required when no CTF is given")
        pixel_size_angstrom = ctf.pixel_size_angstrom
    box = _box_size(box_size, poses, ctf)

    out = np.zeros(n, dtype=_cs_dtype(paths, poses, ctf))
    # cryoSPARC uids are random 64-bit integers; sequential ones are unique, which is what matters.
    out["uid"] = np.arange(n, dtype=np.uint64)
    out["blob/path"] = paths
    out["blob/idx"] = idx
    out["blob/shape"] = int(box)
    out["blob/psize_A"] = pixel_size_angstrom
    if poses is not None:
        out["alignments3D/pose"] = cs_pose_vectors(poses.rotations)
        out["alignments3D/shift"] = poses.shifts_px
        out["alignments3D/psize_A"] = pixel_size_angstrom
    if ctf is not None:
        _fill_ctf_fields(out, ctf)
    with atomic_open(path, "wb") as handle:
        np.save(handle, out, allow_pickle=False)


_CS_CTF_FIELDS = ("accel_kv", "cs_mm", "amp_contrast", "df1_A", "df2_A", "df_angle_rad", "phase_shift_rad")


def _blob_paths(blob_path: Union[str, Sequence[str]], n: int) -> List[bytes]:
    """One encoded stack path per particle (``n`` of them) from one path or a sequence."""
    paths = [blob_path] * n if isinstance(blob_path, (str, bytes, os.PathLike)) else list(blob_path)
    paths = [p if isinstance(p, bytes) else os.fspath(p).encode() for p in paths]
    if len(paths) != n:
        raise ValueError(f"{len(paths)} blob paths for {n} blob indices")
    return paths


def _box_size(box_size: Optional[int], poses: Optional[Poses], ctf: Optional[CtfParameters]) -> int:
    """``box_size``, else ``poses.box_size``, else the CTF box size (px)."""
    box = box_size
    if box is None and poses is not None:
        box = poses.box_size
    if box is None and ctf is not None:
        box = ctf.box_size
    if box is None:
        raise ValueError("the box size is unknown: pass box_size (no poses.box_size and no CTF given)")
    return box


def _cs_dtype(paths: Sequence[bytes], poses: Optional[Poses], ctf: Optional[CtfParameters]) -> np.dtype:
    """The structured dtype of the table: blob fields, then pose and CTF fields when given."""
    fields = [("uid", "<u8"), ("blob/path", f"S{max(len(p) for p in paths) if paths else 1}"),
              ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4")]
    if poses is not None:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4")]
    if ctf is not None:
        fields += [(f"ctf/{f}", "<f4") for f in _CS_CTF_FIELDS]
        if ctf.bfactor_angstrom2 is not None:
            fields.append(("ctf/bfactor", "<f4"))
    return np.dtype(fields)


def _fill_ctf_fields(out: np.ndarray, ctf: CtfParameters) -> None:
    """Copy the CTF columns into the ``ctf/`` fields of ``out`` (angles converted to radians)."""
    rad = np.pi / 180.0
    out["ctf/accel_kv"] = ctf.column("voltage_kv")
    out["ctf/cs_mm"] = ctf.column("spherical_aberration_mm")
    out["ctf/amp_contrast"] = ctf.column("amplitude_contrast")
    out["ctf/df1_A"] = ctf.column("defocus_u_angstrom")
    out["ctf/df2_A"] = ctf.column("defocus_v_angstrom")
    out["ctf/df_angle_rad"] = ctf.column("astigmatism_angle_deg") * rad
    out["ctf/phase_shift_rad"] = ctf.column("phase_shift_deg") * rad
    if ctf.bfactor_angstrom2 is not None:
        out["ctf/bfactor"] = ctf.bfactor_angstrom2


def cs_image_locations(cs: CsLike, datadir: Optional[PathLike] = None,
                       cs_path: Optional[PathLike] = None) -> List[Tuple[str, int]]:
    """``[(absolute stack path, 0-based index), ...]`` from ``blob/path`` and ``blob/idx``.

    Relative paths are resolved against ``datadir`` (falling back to the base name inside it,
    as for star files), else against the directory of the ``.cs`` file. cryoSPARC marks some
    imported paths with a leading ``>``, which is dropped (as cryoDRGN does).
    """
    cs, path = _load(cs)
    path = path or (None if cs_path is None else os.fspath(cs_path))
    for name in ("blob/path", "blob/idx"):
        if name not in cs.dtype.names:
            raise InputError(path, name, "required field is missing")
    if datadir is not None:
        base = os.path.abspath(os.fspath(datadir))
    elif path is not None:
        base = os.path.dirname(os.path.abspath(path))
    else:
        base = os.getcwd()
    resolved = {}
    out = []
    for raw, index in zip(cs["blob/path"], cs["blob/idx"]):
        if raw not in resolved:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            name = name[1:] if name.startswith(">") else name
            candidate = os.path.abspath(os.path.join(base, name))
            if datadir is not None and not os.path.exists(candidate):
                fallback = os.path.join(base, os.path.basename(name))
                candidate = fallback if os.path.exists(fallback) else candidate
            resolved[raw] = candidate
        out.append((resolved[raw], int(index)))
    return out
