"""Poses of a training run across epochs, and their errors (no GUI; paper Fig. 6).

A run trained with ``--refine-poses`` writes the poses its orientation encoder predicts after
the pose-only pre-training (``poses/epoch_000.pkl``) and after each joint epoch
(``poses/epoch_XXX.pkl``); with ``--gt-poses`` it also logs their errors in
``RUN/pose_errors.csv``. :class:`PoseHistory` reads all of it back, on the run's particles, in
pixels of the original box, and measures errors with :mod:`cryoformer.metrics.pose_error`.
Without ground truth, errors are measured against the input poses instead (how far refinement
moved them).

The viewing direction of a pose is the direction of the beam in the volume's frame: the clean
image is ``∫ V(Rᵀ (x, y, z)ᵀ) dz`` (docs/conventions.md), so the line through image point ``(x, y)`` runs
along ``Rᵀ e_z``, the third row of ``R``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd

from cryoformer.errors import InputError
from cryoformer.io import load_poses, read_poses_pkl
from cryoformer.metadata import Poses
from cryoformer.metrics.pose_error import pose_error_summary, rotation_errors, shift_errors
from cryoformer.trainer import load_run
from cryoformer.trainer import outputs

__all__ = ["PoseHistory", "PoseErrors", "viewing_directions", "direction_angles"]

Stage = Union[int, str]  # an epoch, or "input"
_EPOCH_PKL = re.compile(r"^epoch_(\d{3,})\.pkl$")


# Where the training options read here live in the run's TrainConfig (its option groups).
def _train_option(run, name: str):
    """Option ``name`` (its flat name, e.g. ``refine_poses``) of the configuration ``run`` was
    trained with; the flat form does not depend on which option group holds it."""
    return run.train_config.to_dict()[name]


def viewing_directions(rotations: np.ndarray) -> np.ndarray:
    """Unit beam directions ``[N, 3]`` (x, y, z in the volume frame) of rotations ``[N, 3, 3]``."""
    R = np.asarray(rotations, dtype=np.float64)
    return R[..., 2, :]


def direction_angles(directions: np.ndarray) -> tuple:
    """Azimuth ``[N]`` in ``(−π, π]`` and elevation ``[N]`` in ``[−π/2, π/2]`` (rad) of unit
    vectors ``[N, 3]``: azimuth from +x towards +y, elevation above the xy plane."""
    d = np.asarray(directions, dtype=np.float64)
    azimuth = np.arctan2(d[..., 1], d[..., 0])
    elevation = np.arcsin(np.clip(d[..., 2], -1.0, 1.0))
    return azimuth, elevation


@dataclass(frozen=True, eq=False)
class PoseErrors:
    """Per-particle errors of one set of poses.

    Attributes
    ----------
    rotation_rad : np.ndarray
        ``[N]`` geodesic angle to the reference rotation (rad).
    shift_px : np.ndarray
        ``[N]`` distance to the reference shift (px of the original box).
    reference : str
        ``"ground truth"`` or ``"input poses"``.
    summary : dict
        :func:`cryoformer.metrics.pose_error.pose_error_summary` of the same poses.
    """

    rotation_rad: np.ndarray
    shift_px: np.ndarray
    reference: str
    summary: dict


def _poses_in_box(path: str, box0: int) -> Poses:
    """Poses of the whole stack from ``.pkl``/``.star``/``.cs``, shifts in px of box ``box0``."""
    pkl = path.lower().endswith(".pkl")  # cryoDRGN stores shifts as box fractions
    poses = load_poses(path, box_size=box0 if pkl else None)
    scale = box0 / (poses.box_size or box0)
    return Poses(poses.rotations, poses.shifts_px * scale, box0)


class PoseHistory:
    """Input, refined (per epoch) and ground-truth poses of a run's particles.

    Parameters
    ----------
    run_dir : str
        A training run directory.
    gt_poses : str, optional
        Ground-truth poses of the original stack (``.pkl``/``.star``/``.cs``); default the
        run's own ``--gt-poses``.

    Attributes
    ----------
    initial : Poses
        The poses the run trained from (``--poses``), ``[N]`` run particles.
    truth : Poses or None
    epochs : list[int]
        Epochs with refined poses (0 = after pose-only pre-training when ``refine_poses``).
    refine_poses : bool
        Whether the orientation encoder was trained (else epochs come from ``--pose-search``).
    pretrain_epochs : int
        Passes of pose-only pre-training (0 without ``--refine-poses``).
    """

    def __init__(self, run_dir: str, gt_poses: Optional[str] = None) -> None:
        run = load_run(run_dir, device="cpu")
        self.run_dir = run.run_dir
        self.box0 = int(run.original_box_size)
        self.indices = run.particle_indices
        self.refine_poses = bool(_train_option(run, "refine_poses"))
        self.pretrain_epochs = int(_train_option(run, "pose_pretrain_epochs")) if self.refine_poses else 0
        self.n_particles = int(self.indices.size)
        pose_path = run.paths.get("poses") or run.paths.get("particles")
        self.initial = self._subset(_poses_in_box(pose_path, self.box0), pose_path)
        gt = gt_poses or run.paths.get("gt_poses") or _train_option(run, "gt_poses")
        self.gt_path = os.path.abspath(gt) if gt else None
        self.truth = None if gt is None else self._subset(_poses_in_box(gt, self.box0), gt)
        pose_dir = os.path.join(self.run_dir, outputs.POSE_DIR)
        names = os.listdir(pose_dir) if os.path.isdir(pose_dir) else []
        self.epochs: List[int] = sorted(int(m.group(1)) for m in map(_EPOCH_PKL.match, names) if m)
        self._refined: Dict[int, Poses] = {}
        self._errors: Dict[Stage, PoseErrors] = {}
        csv = os.path.join(self.run_dir, "pose_errors.csv")
        self.csv_path = csv if os.path.isfile(csv) else None

    def _subset(self, poses: Poses, path: str) -> Poses:
        if len(poses) <= int(self.indices.max()):
            raise InputError(path, None, f"{len(poses)} poses, but the run uses particle {int(self.indices.max())}")
        return Poses(poses.rotations[self.indices], poses.shifts_px[self.indices], self.box0)

    # ------------------------------------------------------------------ poses
    def poses(self, stage: Stage) -> Poses:
        """Poses of ``stage``: ``"input"``, ``"truth"`` or an epoch in :attr:`epochs`."""
        if stage == "input":
            return self.initial
        if stage == "truth":
            if self.truth is None:
                raise ValueError("this run has no ground-truth poses")
            return self.truth
        epoch = int(stage)
        if epoch not in self._refined:
            if epoch not in self.epochs:
                raise ValueError(f"no refined poses for epoch {epoch}; available: {self.epochs}")
            path = outputs.epoch_file(self.run_dir, outputs.POSE_DIR, epoch)
            poses = read_poses_pkl(path, box_size=self.box0)
            if len(poses) != self.n_particles:
                raise InputError(path, None, f"{len(poses)} poses but the run has {self.n_particles} particles")
            self._refined[epoch] = poses
        return self._refined[epoch]

    def phase(self, epoch: int) -> str:
        """``"pose-only pre-training"`` (epoch 0 of a ``--refine-poses`` run) or ``"joint"``."""
        return "pose-only pre-training" if self.refine_poses and int(epoch) == 0 else "joint"

    # ------------------------------------------------------------------ errors
    @property
    def reference(self) -> str:
        return "ground truth" if self.truth is not None else "input poses"

    def errors(self, stage: Stage) -> PoseErrors:
        """Per-particle errors of ``stage`` against the ground truth (or the input poses)."""
        if stage not in self._errors:
            p = self.poses(stage)
            ref = self.truth if self.truth is not None else self.initial
            rot = rotation_errors(p.rotations, ref.rotations)
            sh = shift_errors(p.shifts_px, ref.shifts_px)
            summary = pose_error_summary(p.rotations, ref.rotations, p.shifts_px, ref.shifts_px,
                                         box_size=self.box0)
            self._errors[stage] = PoseErrors(rot, sh, self.reference, summary)
        return self._errors[stage]

    def curves(self):
        """Median errors per epoch, as a ``pandas.DataFrame``.

        Columns ``epoch, stage, rotation_median_deg, shift_median_px, rotation_mean_square_rad2,
        shift_mean_square_px2, source``; ``stage`` is ``input`` (epoch 0), ``pretrained``
        (epoch 0 of a ``--refine-poses`` run), ``train`` or ``search``. Rows come from
        ``RUN/pose_errors.csv`` when the run logged it (``source = "pose_errors.csv"``), else
        are computed here from ``poses/epoch_XXX.pkl`` (``source = "computed"``).
        """
        cols = ["epoch", "stage", "rotation_median_deg", "shift_median_px", "rotation_mean_square_rad2",
                "shift_mean_square_px2", "source"]
        if self.csv_path is not None and self.truth is not None:
            df = pd.read_csv(self.csv_path)
            if len(df):
                df = df.assign(source="pose_errors.csv")
                if "rotation_median_deg" not in df:
                    df["rotation_median_deg"] = np.degrees(df["rotation_median_rad"])
                return df.reindex(columns=cols).reset_index(drop=True)
        rows = []
        for stage in ["input"] + self.epochs:
            if stage == "input" and self.truth is None:
                continue  # the input against itself says nothing
            s = self.errors(stage).summary
            name = "input" if stage == "input" else ("pretrained" if self.phase(stage) != "joint" else
                                                     "train" if self.refine_poses else "search")
            rows.append({"epoch": 0 if stage == "input" else stage, "stage": name,
                         "rotation_median_deg": s["rotation_median_deg"],
                         "shift_median_px": s.get("shift_median_px"),
                         "rotation_mean_square_rad2": s["rotation_mean_square_rad2"],
                         "shift_mean_square_px2": s.get("shift_mean_square_px2"), "source": "computed"})
        return pd.DataFrame(rows, columns=cols)
