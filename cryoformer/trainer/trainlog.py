"""Training logs: ``RUN/log.csv``, ``RUN/pose_errors.csv`` and optional TensorBoard events.

``log.csv`` has one row per :attr:`TrainConfig.log_every_steps` optimiser steps and one per
epoch end (``kind`` = ``"step"`` / ``"epoch"``); loss terms are means over the images since the
previous row of the same kind. Rows of kind ``"heldout"`` hold the image MSE (``mse``) of the
held-out images after an epoch (:mod:`cryoformer.trainer.validation`). Pose-error columns are filled on epoch rows when ground-truth
poses were given. Rows are flushed as written, so a killed run keeps its log; a resumed run
first drops rows logged after the checkpoint it resumes from, so the log reads as if the run
had never stopped.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from typing import Any, Optional

from cryoformer.io.atomic import atomic_open

logger = logging.getLogger(__name__)

LOG_COLUMNS = (
    "kind", "epoch", "step", "phase", "images", "loss", "mse", "pose_loss", "kl", "lr",
    "images_per_s", "elapsed_s",
    "rotation_median_rad", "rotation_mean_square_rad2", "shift_median_px", "shift_mean_square_px2",
)
POSE_COLUMNS = ("epoch", "stage", "n", "rotation_median_rad", "rotation_median_deg",
                "rotation_mean_square_rad2", "shift_median_px", "shift_mean_square_px2")


def _truncate_csv(path: str, keep, columns) -> None:
    """Rewrite ``path`` keeping the header and the rows for which ``keep(row)`` is true.

    A log that cannot be read back as this table (damaged, truncated mid-row, edited by hand)
    is not a reason to stop training: it is kept beside, as ``NAME.damaged-TIME``, with a
    warning, and a new log starts.
    """
    if not os.path.isfile(path):
        return
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        fields = rows and list(rows[0].keys())
        if fields and (fields != list(columns) or any(None in r or None in r.values() for r in rows)):
            raise ValueError("its columns are not those of this log")
        kept = [r for r in rows if keep(r)]
    except (ValueError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        logger.warning("%s could not be read (%s); kept as %s, a new log starts", path, exc, aside)
        return
    if not fields:
        return
    with atomic_open(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


class CsvTable:
    """Append-only CSV with a fixed header, flushed per row."""

    def __init__(self, path: str, columns) -> None:
        self.path, self.columns = path, tuple(columns)
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        self._handle = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._handle.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.7g}"
    return value


class TrainLog:
    """The logs of one run directory (rank 0 only).

    Parameters
    ----------
    run_dir : str
    resume_step : int or None
        When resuming: rows with ``step`` beyond it are dropped. None = a fresh run (any old
        log in the directory is replaced).
    keep_pose_epochs_upto : int
        When resuming: ``pose_errors.csv`` rows of later epochs are dropped.
    keep_heldout_epochs_upto : int, optional
        When resuming: ``heldout`` rows of later epochs are dropped (a partial epoch's row is
        redone when the epoch completes).
    tensorboard : bool
        Write TensorBoard events to ``RUN/tensorboard/`` when ``torch.utils.tensorboard``
        imports (it needs the ``tensorboard`` package).
    """

    def __init__(self, run_dir: str, resume_step: Optional[int] = None,
                 keep_pose_epochs_upto: int = -1, tensorboard: bool = True,
                 keep_heldout_epochs_upto: Optional[int] = None) -> None:
        log_path = os.path.join(run_dir, "log.csv")
        pose_path = os.path.join(run_dir, "pose_errors.csv")
        if resume_step is None:
            for path in (log_path, pose_path):
                if os.path.isfile(path):
                    os.unlink(path)
        else:
            _truncate_csv(log_path, lambda r: int(r["step"]) <= resume_step and not (
                r["kind"] == "heldout" and keep_heldout_epochs_upto is not None
                and int(r["epoch"]) > keep_heldout_epochs_upto), LOG_COLUMNS)
            _truncate_csv(pose_path, lambda r: r["stage"] == "input"
                          or int(r["epoch"]) <= keep_pose_epochs_upto, POSE_COLUMNS)
        self.log = CsvTable(log_path, LOG_COLUMNS)
        self._pose_path = pose_path
        self.poses: Optional[CsvTable] = None
        self.tb = None
        if tensorboard:
            try:  # optional dependency (the tensorboard package), imported only when wanted
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: the CSV log is the record
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def row(self, row: dict[str, Any]) -> None:
        """One ``log.csv`` row (and its scalars to TensorBoard)."""
        self.log.write(row)
        if self.tb is not None:
            prefix = row.get("kind") if row.get("kind") in ("epoch", "heldout") else "step"
            for key in ("loss", "mse", "pose_loss", "kl", "lr", "images_per_s",
                        "rotation_median_rad", "shift_median_px"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", row[key], row["step"])

    def pose_errors(self, epoch: int, stage: str, summary: dict[str, Any]) -> None:
        """One ``pose_errors.csv`` row: ``stage`` is input / pretrained / train."""
        if self.poses is None:
            self.poses = CsvTable(self._pose_path, POSE_COLUMNS)
        self.poses.write({"epoch": epoch, "stage": stage, **summary})

    def close(self) -> None:
        self.log.close()
        if self.poses is not None:
            self.poses.close()
        if self.tb is not None:
            self.tb.close()
