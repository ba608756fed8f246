"""Per-particle values to colour a latent scatter by, read from a run (numpy only, no GUI).

A run keeps its particles' metadata where training read it: the CTF and the input poses come
from the ``--ctf`` / ``--poses`` files, or from the ``.star`` / ``.cs`` particle file itself,
paired with the stack's images exactly as ``cryoformer train`` paired them
(:func:`cryoformer.io.load_paired_metadata`); refined poses from ``RUN/poses/epoch_XXX.pkl``
(row ``r`` = the run's particle ``r``); the held-out images from ``RUN/heldout_indices.npy`` and
their losses at the run's epoch from ``RUN/heldout_loss/``.
:func:`read_run_metadata` gathers what is there and :func:`values_from_metadata` turns it into
named values::

    meta, notes = read_run_metadata(run)          # notes: what could not be read, and why
    values = values_from_metadata(meta)           # {"defocus_angstrom": ParticleValue, …}

Continuous values (float) are drawn with a perceptual colour map between robust limits
(:func:`robust_limits`); categorical ones (non-negative integers) with one colour per value.
A value missing for a particle is NaN (drawn grey). Nothing here is a requirement of a run:
a field the run does not have is simply not offered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cryoformer.errors import InputError
from cryoformer.io import load_paired_metadata, open_particles, read_poses_pkl
from cryoformer.metadata import CTF_COLUMNS, Poses
from cryoformer.metrics.pose_error import rotation_errors
from cryoformer.physics.rotations import matrix_to_euler_relion
from cryoformer.trainer import outputs

__all__ = ["CONTINUOUS", "CATEGORICAL", "ParticleValue", "ParticleMetadata", "read_run_metadata",
           "values_from_metadata", "ctf_values", "pose_values", "pose_change_values", "as_particle_value",
           "robust_limits", "robust_view_box", "colour_levels"]

CONTINUOUS = "continuous"
CATEGORICAL = "categorical"
# Colour limits of a continuous value: wide, but not stretched by a few outliers.
COLOUR_PERCENTILES = (1.0, 99.0)
# The first view of a scatter: 99 % of the particles, so a handful of outliers do not shrink
# the bulk into a corner (zooming out shows them).
VIEW_PERCENTILES = (0.5, 99.5)
VIEW_MARGIN = 0.05  # fraction of the box's width added on each side


@dataclass(frozen=True, eq=False)
class ParticleValue:
    """One value per particle of a run.

    Attributes
    ----------
    name : str
        Its name in menus, unit last (``"defocus_angstrom"``).
    values : np.ndarray
        ``[N]`` float32 (continuous; NaN = unknown) or int64 ≥ 0 (categorical).
    kind : str
        :data:`CONTINUOUS` or :data:`CATEGORICAL`.
    source : str
        Where it was read from (a path, or ``"user"``).
    """

    name: str
    values: np.ndarray
    kind: str
    source: str = ""


@dataclass(frozen=True, eq=False)
class ParticleMetadata:
    """Metadata of a run's ``N`` particles, in the run's particle order (any field may be None).

    Attributes
    ----------
    ctf : np.ndarray or None
        ``[N, 9]`` CTF parameters in the column order of :data:`cryoformer.metadata.CTF_COLUMNS`
        (defocus in Å, angles in degrees).
    input_poses : Poses or None
        The poses training started from (shifts in px of the stack's box).
    refined_poses : Poses or None
        Poses after refinement (``--refine-poses`` / ``--pose-search``), same box.
    heldout : np.ndarray or None
        ``[N]`` bool, True for an image held out of training.
    heldout_mse : np.ndarray or None
        ``[N]`` float32, each held-out image's loss at the run's epoch (mean squared error of
        its prediction, normalised images²); NaN for the images training used.
    sources : dict
        Path each field was read from.
    """

    ctf: Optional[np.ndarray] = None
    input_poses: Optional[Poses] = None
    refined_poses: Optional[Poses] = None
    heldout: Optional[np.ndarray] = None
    heldout_mse: Optional[np.ndarray] = None
    sources: Optional[Dict[str, str]] = None


def _metadata_paths(run) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(particles, poses, ctf) paths as training read them: a ``.star`` / ``.cs`` particle file
    carries its own poses and CTF when no separate file was given."""
    paths = run.paths
    particles = paths.get("particles")
    if particles is None:
        return None, None, None
    carries = os.path.splitext(particles)[1].lower() in (".star", ".cs")
    poses = paths.get("poses") or (particles if carries else None)
    ctf = paths.get("ctf") or (particles if carries else None)
    return particles, poses, ctf


def _read_input_metadata(run, meta: dict, notes: List[str]) -> None:
    """CTF and input poses of the run's particles (``meta["ctf"]``, ``meta["input_poses"]``)."""
    particles, pose_path, ctf_path = _metadata_paths(run)
    if particles is None or (pose_path is None and ctf_path is None):
        notes.append("no particle metadata recorded in the run")
        return
    rows = np.asarray(run.particle_indices, dtype=np.int64)
    cs_class = getattr(getattr(getattr(run, "train_config", None), "data", None), "cs_class", None)
    try:
        stack = open_particles(particles, datadir=run.paths.get("datadir"))
        if rows.size and int(rows.max()) >= len(stack):
            raise InputError(particles, None, f"{len(stack)} images, but the session's particles "
                             f"reach row {int(rows.max())}")
        paired = load_paired_metadata(stack, particles, pose_path, ctf_path, run.paths.get("datadir"),
                                      rows=rows, cs_class=cs_class)
    except (InputError, OSError, ValueError) as exc:  # metadata is optional here: say why it is missing
        notes.append(f"particle metadata not read: {exc}")
        return
    if paired.ctf is not None:
        meta["ctf"] = paired.ctf.array[rows]
        meta["sources"]["ctf"] = ctf_path
    if paired.poses is not None:
        meta["input_poses"] = paired.poses.subset(rows)
        meta["sources"]["input_poses"] = pose_path


def _read_run_files(run, meta: dict, notes: List[str]) -> None:
    """Refined poses and held-out images, from the run directory."""
    rows = np.asarray(run.particle_indices, dtype=np.int64)
    refined = getattr(run, "refined_poses_path", None)
    if refined:
        try:
            poses = read_poses_pkl(refined, box_size=int(run.original_box_size))
            if len(poses) != rows.size:
                raise InputError(refined, None, f"{len(poses)} poses for {rows.size} particles")
            meta["refined_poses"], meta["sources"]["refined_poses"] = poses, refined
        except (InputError, OSError, ValueError) as exc:
            notes.append(f"refined poses not read: {exc}")
    heldout_path = os.path.join(run.run_dir, outputs.HELDOUT_NAME)
    if os.path.isfile(heldout_path):
        heldout = np.load(heldout_path, allow_pickle=False).reshape(-1)
        if heldout.size:
            meta["heldout"] = np.isin(rows, heldout)
            meta["sources"]["heldout"] = heldout_path
            _read_heldout_losses(run, rows, heldout, meta, notes)


def _read_heldout_losses(run, rows: np.ndarray, heldout: np.ndarray, meta: dict, notes: List[str]) -> None:
    """The held-out images' losses at the run's epoch (``RUN/heldout_loss/epoch_XXX.npy``, in
    the order of ``heldout_indices.npy``), placed on the run's particles."""
    epoch = getattr(run, "epoch", None)
    if epoch is None:
        return
    path = outputs.epoch_file(run.run_dir, outputs.HELDOUT_LOSS_DIR, int(epoch))
    if not os.path.isfile(path):
        return  # a run written before per-image losses were kept
    losses = np.load(path, allow_pickle=False).reshape(-1)
    if losses.size != heldout.size:
        notes.append(f"held-out losses not read: {path} has {losses.size} values for {heldout.size} images")
        return
    by_index = dict(zip(heldout.tolist(), losses.tolist()))
    meta["heldout_mse"] = np.array([by_index.get(int(r), np.nan) for r in rows], dtype=np.float32)
    meta["sources"]["heldout_mse"] = path


def read_run_metadata(run) -> Tuple[ParticleMetadata, List[str]]:
    """Everything :class:`ParticleMetadata` holds that ``run`` (a ``TrainedRun``) has.

    Returns
    -------
    (ParticleMetadata, notes)
        ``notes``: one line for each source that exists but could not be read (moved data,
        a damaged file); a field the run never had is silently absent.
    """
    meta: dict = {"sources": {}}
    notes: List[str] = []
    _read_input_metadata(run, meta, notes)
    _read_run_files(run, meta, notes)
    return ParticleMetadata(**meta), notes


def ctf_values(ctf: np.ndarray, source: str = "") -> Dict[str, ParticleValue]:
    """Defocus (mean of U and V) and astigmatism (|U − V|), Å, of a CTF array ``[N, 9]``."""
    arr = np.asarray(ctf, dtype=np.float64)
    dfu = arr[:, CTF_COLUMNS.index("defocus_u_angstrom")]
    dfv = arr[:, CTF_COLUMNS.index("defocus_v_angstrom")]
    return {"defocus_angstrom": ParticleValue("defocus_angstrom", ((dfu + dfv) / 2).astype(np.float32),
                                              CONTINUOUS, source),
            "astigmatism_angstrom": ParticleValue("astigmatism_angstrom", np.abs(dfu - dfv).astype(np.float32),
                                                  CONTINUOUS, source)}


def pose_values(poses: Poses, source: str = "") -> Dict[str, ParticleValue]:
    """RELION Euler angles (rot, tilt, psi; degrees) and the in-plane shift's length (px of
    the stack's box) of ``poses``."""
    euler = matrix_to_euler_relion(torch.from_numpy(np.asarray(poses.rotations, dtype=np.float64))).numpy()
    out = {name: ParticleValue(name, euler[:, i].astype(np.float32), CONTINUOUS, source)
           for i, name in enumerate(("rot_deg", "tilt_deg", "psi_deg"))}
    shift = np.linalg.norm(np.asarray(poses.shifts_px, dtype=np.float64), axis=1)
    out["shift_px"] = ParticleValue("shift_px", shift.astype(np.float32), CONTINUOUS, source)
    return out


def pose_change_values(before: Poses, after: Poses, source: str = "") -> Dict[str, ParticleValue]:
    """How far refinement moved each pose: rotation angle (degrees) and shift (px)."""
    angle = np.degrees(rotation_errors(after.rotations, before.rotations))
    moved = np.linalg.norm(np.asarray(after.shifts_px, np.float64) - np.asarray(before.shifts_px, np.float64), axis=1)
    return {"pose_change_deg": ParticleValue("pose_change_deg", angle.astype(np.float32), CONTINUOUS, source),
            "shift_change_px": ParticleValue("shift_change_px", moved.astype(np.float32), CONTINUOUS, source)}


def values_from_metadata(meta: ParticleMetadata) -> Dict[str, ParticleValue]:
    """Named values of every field ``meta`` has (none for a field it lacks)."""
    src = meta.sources or {}
    out: Dict[str, ParticleValue] = {}
    if meta.ctf is not None:
        out.update(ctf_values(meta.ctf, src.get("ctf", "")))
    if meta.input_poses is not None:
        out.update(pose_values(meta.input_poses, src.get("input_poses", "")))
    if meta.input_poses is not None and meta.refined_poses is not None:
        out.update(pose_change_values(meta.input_poses, meta.refined_poses, src.get("refined_poses", "")))
    if meta.heldout is not None:
        out["held_out"] = ParticleValue("held_out", np.asarray(meta.heldout, dtype=np.int64), CATEGORICAL,
                                        src.get("heldout", ""))
    if meta.heldout_mse is not None:
        out["heldout_mse"] = ParticleValue("heldout_mse", np.asarray(meta.heldout_mse, dtype=np.float32),
                                           CONTINUOUS, src.get("heldout_mse", ""))
    return out


def _per_run_particle(name: str, array: np.ndarray, particle_indices: np.ndarray) -> np.ndarray:
    """``array`` ``[N]`` as is, or ``[N₀]`` of the original stack mapped through ``particle_indices``."""
    n = int(particle_indices.size)
    if array.size == n:
        return array
    if n and array.size > int(particle_indices.max()):
        return array[particle_indices]
    raise ValueError(f"{name!r}: {array.size} values, but the run has {n} particles"
                     + (f" (from a stack of at least {int(particle_indices.max()) + 1})" if n else ""))


def as_particle_value(name: str, array: np.ndarray, particle_indices: np.ndarray,
                      source: str = "user") -> ParticleValue:
    """Check a user's array and make it a :class:`ParticleValue`.

    Parameters
    ----------
    name : str
        Non-empty.
    array : array-like
        ``[N]`` one per run particle, or ``[N₀]`` one per particle of the original stack
        (mapped through ``particle_indices``). Float → continuous (NaN = unknown, drawn grey;
        ±inf refused); integer or bool → categorical (non-negative).
    particle_indices : np.ndarray
        ``[N]`` rows of the original stack of the run's particles.

    Raises
    ------
    ValueError
        Empty name, wrong length or shape, a non-numeric type, ±inf, no finite value, or a
        negative category — naming the first bad particle.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a colouring needs a non-empty name, got {name!r}")
    arr = np.asarray(array)
    if arr.ndim != 1 and not (arr.ndim == 2 and 1 in arr.shape):
        raise ValueError(f"{name!r}: one value per particle expected, got an array of shape {arr.shape}")
    arr = _per_run_particle(name, arr.reshape(-1), np.asarray(particle_indices, dtype=np.int64))
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        if arr.size and arr.min() < 0:
            bad = int(np.argmax(arr < 0))
            raise ValueError(f"{name!r}: categories must be non-negative integers; particle {bad} has {arr[bad]}")
        return ParticleValue(name, arr.astype(np.int64), CATEGORICAL, source)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name!r}: numbers expected (float: continuous, integer: categories), got {arr.dtype}")
    inf = np.isinf(arr)
    if inf.any():
        bad = int(np.argmax(inf))
        raise ValueError(f"{name!r}: particle {bad} is {arr[bad]}; use NaN for an unknown value")
    if not np.isfinite(arr).any():
        raise ValueError(f"{name!r}: no particle has a value (all NaN)")
    return ParticleValue(name, arr.astype(np.float32), CONTINUOUS, source)


def robust_limits(values: np.ndarray, percentiles: Sequence[float] = COLOUR_PERCENTILES) -> Tuple[float, float]:
    """Colour limits ``(lo, hi)`` of ``values`` ``[N]``: percentiles of the finite values;
    a constant value gets a unit-wide range around it, no finite value ``(0, 1)``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(p) for p in np.percentile(v, list(percentiles)))
    if hi <= lo:
        half = max(abs(lo) * 1e-3, 0.5)
        return lo - half, lo + half
    return lo, hi


def robust_view_box(xy: np.ndarray, percentiles: Sequence[float] = VIEW_PERCENTILES,
                    margin: float = VIEW_MARGIN) -> List[float]:
    """First view ``[x0, x1, y0, y1]`` of a scatter of ``xy`` ``[N, 2]``: the percentile box of
    the finite points on each axis, widened by ``margin`` of its width on each side (a zero
    width becomes 1)."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if pts.shape[0] == 0:
        return [-1.0, 1.0, -1.0, 1.0]
    box: List[float] = []
    for col in (0, 1):
        lo, hi = (float(p) for p in np.percentile(pts[:, col], list(percentiles)))
        width = (hi - lo) or 1.0
        box += [lo - margin * width, hi + margin * width]
    return box


def colour_levels(values: np.ndarray, lo: float, hi: float, levels: int = 255) -> np.ndarray:
    """``[N]`` uint8 colour index of continuous ``values`` between ``lo`` and ``hi``: ``0 …
    levels − 1`` (clipped), and ``levels`` for NaN (the grey of an unknown value)."""
    v = np.asarray(values, dtype=np.float64)
    scaled = np.clip((v - lo) / (hi - lo), 0.0, 1.0) * (levels - 1)
    out = np.full(v.shape, levels, dtype=np.uint8)
    finite = np.isfinite(v)
    out[finite] = np.rint(scaled[finite]).astype(np.uint8)
    return out
