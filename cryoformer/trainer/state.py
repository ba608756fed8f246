"""The run's evolving state, in one place: where the schedule stands, the current poses, the
held-out history and the support mask.

Everything else a run holds is either fixed once built (the config, the data with its *input*
poses, the held-out split) or owned by torch (model and optimiser weights, RNG streams). The
loop (:mod:`.loop`) is the only writer: it advances the schedule fields (phase, epoch, step,
position in the epoch) as it trains, appends to the held-out history, and assigns what the
epoch hooks (:mod:`.epoch_hooks`) return (poses, support mask); the hooks themselves never
touch it. A checkpoint stores it under the keys listed in :mod:`.checkpoint`, which are those
of every checkpoint written so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cryoformer.metadata import Poses

from .validation import ValidationHistory


@dataclass
class RunState:
    """Where a run stands.

    Attributes
    ----------
    poses : Poses
        Current poses of the selected particles, shifts in px of the stack's box ``D₀``: the
        input poses until ``--pose-search`` refines them (the data keep the input poses,
        which the search's prior is centred on; ground-truth poses are only reported).
    phase : {"start", "pretrain", "train"}
        ``start``: nothing trained yet.
    epoch : int
        1-based epoch of ``phase`` the position refers to.
    batch_in_epoch : int
        Global batches of ``epoch`` already trained (the sampler position).
    step : int
        Optimiser steps taken in total.
    epoch_complete : bool
        ``batch_in_epoch`` covers the whole epoch.
    elapsed_before_s : float
        Wall-clock seconds trained by earlier pieces of the run (before this resume).
    last_epoch_written : int
        Last output epoch with files on disk (0 = after pose pre-training; -1 = none).
    validation : ValidationHistory
        Held-out image loss per output epoch.
    support : torch.Tensor [D, D, D] bool or None
        The support mask the density is trained under (CPU); None = the whole sphere.
    """

    poses: Poses
    phase: str = "start"
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    epoch_complete: bool = True
    elapsed_before_s: float = 0.0
    last_epoch_written: int = -1
    validation: ValidationHistory = field(default_factory=ValidationHistory)
    support: Optional[torch.Tensor] = None

    def to_checkpoint(self, elapsed_s: float, with_poses: bool) -> dict[str, Any]:
        """The checkpoint entries of this state (``with_poses``: the current poses too, which
        only ``--pose-search`` changes)."""
        out: dict[str, Any] = {
            "phase": self.phase, "epoch": self.epoch, "step": self.step,
            "batch_in_epoch": self.batch_in_epoch, "epoch_complete": self.epoch_complete,
            "last_epoch_written": self.last_epoch_written, "elapsed_s": elapsed_s,
            "validation": self.validation.rows,
        }
        if self.support is not None:
            out["support"] = self.support
        if with_poses:
            out["current_rotations"] = torch.from_numpy(self.poses.rotations)
            out["current_shifts_px"] = torch.from_numpy(self.poses.shifts_px)
        return out

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], input_poses: Poses, original_box: int,
                        n_heldout: int) -> "RunState":
        """The state a checkpoint saved; ``input_poses`` stand in for current poses it lacks
        (``original_box``: the stack's box, px, the saved shifts are in)."""
        poses = input_poses
        if "current_rotations" in checkpoint:  # poses refined by the local search so far
            poses = Poses(checkpoint["current_rotations"].numpy(), checkpoint["current_shifts_px"].numpy(),
                          original_box)
        support = checkpoint.get("support")
        return cls(
            poses=poses, phase=checkpoint["phase"], epoch=int(checkpoint["epoch"]),
            batch_in_epoch=int(checkpoint["batch_in_epoch"]), step=int(checkpoint["step"]),
            epoch_complete=bool(checkpoint["epoch_complete"]),
            elapsed_before_s=float(checkpoint["elapsed_s"]),
            last_epoch_written=int(checkpoint.get("last_epoch_written", -1)),
            validation=ValidationHistory(checkpoint.get("validation"), n_heldout),
            support=None if support is None else support.to(dtype=torch.bool, device="cpu"))
