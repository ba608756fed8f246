"""What the trainer does between epochs besides writing outputs: the support mask for the
next epoch (:mod:`cryoformer.model.support`), the held-out loss (:mod:`.validation`) and the
pose search (:mod:`cryoformer.refinement`).

Functions of explicit arguments that return what they change (a mask, a loss, poses); the
loop (:mod:`.loop`) applies the results to its :class:`~.state.RunState` and the model.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from cryoformer.metadata import Poses
from cryoformer.model import CryoFormer
from cryoformer.model.support import support_from_volumes
from cryoformer.refinement import PoseSearchConfig, search_poses

from . import distributed as dist_mod
from .config import TrainConfig
from .data import ParticleData
from .distributed import DistInfo
from .inference import encode_particles
from .validation import ValidationHistory, heldout_losses

logger = logging.getLogger("cryoformer.trainer.loop")  # one logger for the whole training log

# Latents whose decoded maps the support mask is made from, and how many are decoded at once
# (bounds the GPU temporaries).
SUPPORT_LATENTS = 16
SUPPORT_DECODE_BATCH = 4


@torch.no_grad()
def update_support(model: CryoFormer, data: ParticleData, rows: np.ndarray, seed: int, epoch: int,
                   threshold: float, margin_px: int, device: torch.device, info: DistInfo) -> torch.Tensor:
    """The support mask epoch ``epoch`` trains under, from the current model.

    Rank 0 decodes the maps of :data:`SUPPORT_LATENTS` training images drawn from
    ``(seed, epoch)`` and thresholds them (:func:`~cryoformer.model.support.support_from_volumes`);
    every rank receives the result.

    Parameters
    ----------
    model : CryoFormer
        Unwrapped; its train/eval mode is restored.
    rows : np.ndarray [n] int64
        Subset rows the images are drawn from (the training rows).
    threshold : float
        Fraction of the peak above which a voxel is molecule.
    margin_px : int
        Dilation in px of the training box.

    Returns
    -------
    torch.Tensor [D, D, D] bool, on the CPU.
    """
    d = data.box_size
    mask = np.zeros((d, d, d), dtype=np.uint8)
    if info.is_main:
        pick = np.sort(np.random.default_rng([seed, epoch, 5]).choice(
            rows, size=min(SUPPORT_LATENTS, rows.size), replace=False))
        was_training = model.training
        model.eval()
        try:
            z = model.encode(data.images(pick).to(device))["mu"]  # [m, zdim]
            # [m, D, D, D] inside the current support
            vols = torch.cat([model.decode_volume(z[i:i + SUPPORT_DECODE_BATCH])
                              for i in range(0, len(z), SUPPORT_DECODE_BATCH)])
        finally:
            model.train(was_training)
        mask = support_from_volumes(vols, threshold, margin_px).cpu().numpy().astype(np.uint8)
        logger.info("epoch %d: support mask %d voxels (%.1f%% of the box)", epoch, int(mask.sum()),
                    100 * mask.mean())
    mask = dist_mod.broadcast_array(mask, info)
    return torch.from_numpy(mask.astype(bool))


def validate(model: CryoFormer, data: ParticleData, current_poses: Poses, heldout_rows: np.ndarray,
             device: torch.device, config: TrainConfig, world: int, progress=False) -> np.ndarray:
    """Per-image held-out loss ``[m]`` of the current model (:func:`.validation.heldout_losses`),
    in the order of ``heldout_rows``.

    ``data`` holds the input poses; ``current_poses`` are the run's (refined by
    ``--pose-search``). ``world``: DDP processes (the batch is the per-rank training batch).
    ``progress``: a style of :mod:`cryoformer.progress` or a bool.
    """
    # With --pose-search the held-out images are scored at their searched poses, so the loss
    # measures model and poses together and the best epoch is one whose poses were refined
    # (at the input poses it preferred the epoch before the first search, whose maps are the
    # blurriest: AdK, 24° input errors). Their poses are fitted to the model, 5 numbers per
    # image against thousands of pixels, which leaks too little to matter; the model itself
    # never trains on them.
    scored = data.with_poses(current_poses) if config.search.pose_search else data
    return heldout_losses(model, scored, heldout_rows, device,
                        predicted_poses=config.refinement.refine_poses, amp=config.runtime.amp,
                        batch_size=max(1, min(64, 2 * config.optimisation.batch_size // world)),
                        progress=progress)


def early_stop_due(history: ValidationHistory, early_stop_epochs: Optional[int], epoch_complete: bool) -> bool:
    """True when ``early_stop_epochs`` complete epochs have passed without a lower held-out loss."""
    return (early_stop_epochs is not None and epoch_complete
            and history.epochs_since_best() >= early_stop_epochs)


def search_training_poses(model: CryoFormer, data: ParticleData, poses: Poses, heldout_rows: np.ndarray,
                          epoch: int, config: TrainConfig, device: torch.device, info: DistInfo,
                          progress) -> tuple[Poses, Optional[dict]]:
    """MAP pose search (:mod:`cryoformer.refinement`) on rank 0 around the run's current
    ``poses``, broadcast to every rank. The prior is centred on the input poses (``data.poses``);
    held-out images are searched but never shape the references.

    Returns the searched poses and what it encoded (rank 0; None elsewhere):
    :func:`~.inference.encode_particles`'s dict, the latents ``[N, zdim]`` and, with
    ``--refine-poses``, the encoder's poses. They are this epoch's: the search does not change
    the model.
    ``progress``: a style of :mod:`cryoformer.progress` (plain lines in a batch job's log)."""
    opts, d0 = config.search, data.original_box
    rot, shifts = poses.rotations, poses.shifts_px
    encoded = None
    if info.is_main:
        t0 = time.monotonic()
        encoded = encode_particles(model, data, device, want_poses=config.refinement.refine_poses,
                                   progress=progress)
        z = encoded["z"]
        particles = data.search_particles()
        search = PoseSearchConfig.from_degrees(opts.pose_search_radius_deg, opts.pose_search_prior_deg,
                                               reference=opts.pose_search_reference,
                                               n_references=opts.pose_search_groups,
                                               classify_rounds=opts.pose_search_classify)
        was_training = model.training
        model.eval()  # the model's maps (reference "model") are decoded in eval mode
        try:
            res = search_poses(particles, rot, shifts, z, search,
                               decode=lambda centres: model.decode_volume(centres.to(device), d0),
                               model_box_size=data.box_size, prior_rotations=data.poses.rotations,
                               seed=config.optimisation.seed + epoch, progress=progress,
                               reference_rows=np.setdiff1d(np.arange(len(data)), heldout_rows), device=device)
        finally:
            model.train(was_training)
        rot, shifts = res.rotations, res.shifts_px
        logger.info("pose search after epoch %d: prior width %.2f°, mean log-posterior gain %.3g (%.0f s)",
                    epoch, np.degrees(res.prior_sigma_rad), res.log_posterior_gain, time.monotonic() - t0)
    rot = dist_mod.broadcast_array(np.ascontiguousarray(rot, dtype=np.float32), info)
    shifts = dist_mod.broadcast_array(np.ascontiguousarray(shifts, dtype=np.float32), info)
    return Poses(rot, shifts, d0), encoded
