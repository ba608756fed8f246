"""What the trainer does between epochs besides writing outputs: the support mask for the
next epoch (:mod:`cryoformer.model.support`), the held-out loss (:mod:`.validation`) and the
pose search (:mod:`.pose_search`). Functions of the running :class:`~.loop.Trainer`."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from cryoformer.metadata import Poses

from . import distributed as dist_mod
from .inference import encode_particles
from .validation import heldout_loss

if TYPE_CHECKING:
    from .loop import Trainer

logger = logging.getLogger("cryoformer.trainer.loop")  # one logger for the whole training log


@torch.no_grad()
def update_support(trainer: "Trainer", epoch: int) -> None:
    """Support mask for epoch ``epoch`` from the current model (rank 0 computes, every rank
    applies); the canonical renderer is the one that uses it."""
    from cryoformer.model.support import support_from_volumes

    cfg, data, d = trainer.config, trainer.data, trainer.data.box_size
    mask = np.zeros((d, d, d), dtype=np.uint8)
    if trainer.info.is_main:
        rows = trainer.plan.rows if trainer.plan.rows is not None else np.arange(len(data))
        pick = np.sort(np.random.default_rng([cfg.seed, epoch, 5]).choice(
            rows, size=min(16, rows.size), replace=False))
        was_training = trainer.model.training
        trainer.model.eval()
        try:
            z = trainer.model.encode(data.images(pick).to(trainer.device))["mu"]  # [m, zdim]
            # [m, D, D, D] inside the current support; 4 at a time bounds GPU temporaries
            vols = torch.cat([trainer.model.decode_volume(z[i:i + 4]) for i in range(0, len(z), 4)])
        finally:
            trainer.model.train(was_training)
        sup = support_from_volumes(vols, cfg.support_threshold, cfg.support_margin_px)
        mask = sup.cpu().numpy().astype(np.uint8)
        logger.info("epoch %d: support mask %d voxels (%.1f%% of the box)", epoch, int(mask.sum()),
                    100 * mask.mean())
    mask = dist_mod.broadcast_array(mask, trainer.info)
    trainer.model.set_support(torch.from_numpy(mask.astype(bool)))


def validate(trainer: "Trainer", out_epoch: int) -> bool:
    """Held-out loss of this epoch's model → history and log (``validation.json`` is
    written after the checkpoint).

    Returns True when ``early_stop_epochs`` epochs have passed without improvement."""
    cfg = trainer.config
    # With --pose-search the held-out images are scored at their searched poses, so the loss
    # measures model and poses together and the best epoch is one whose poses were refined
    # (at the input poses it preferred the epoch before the first search, whose maps are the
    # blurriest: AdK, 24° input errors). Their poses are fitted to the model, 5 numbers per
    # image against thousands of pixels, which leaks too little to matter; the model itself
    # never trains on them.
    data = trainer.data if cfg.pose_search else dataclasses.replace(trainer.data, poses=trainer.input_poses)
    mse = heldout_loss(trainer.model, data, trainer.heldout_rows, trainer.device,
                       predicted_poses=cfg.refine_poses, amp=cfg.amp,
                       batch_size=max(1, min(64, 2 * cfg.batch_size // trainer.info.world)))
    trainer.validation.add(out_epoch, trainer.step, trainer.elapsed(), mse, trainer.epoch_complete)
    best = trainer.validation.best_epoch()
    trainer.log.row({"kind": "heldout", "epoch": out_epoch, "step": trainer.step, "phase": "train",
                     "images": int(trainer.heldout_rows.size), "mse": mse, "elapsed_s": trainer.elapsed()})
    logger.info("epoch %d: held-out image loss %.6g (best epoch %s)", out_epoch, mse, best)
    return (cfg.early_stop_epochs is not None and trainer.epoch_complete
            and trainer.validation.epochs_since_best() >= cfg.early_stop_epochs)


def search_training_poses(trainer: "Trainer") -> Optional[np.ndarray]:
    """MAP pose search on rank 0 (:mod:`.pose_search`), broadcast to every rank; replaces
    the training poses. The prior is centred on the input poses.

    Returns the latents ``[N, zdim]`` it encoded (rank 0; None elsewhere), which are this
    epoch's latents: the search does not change the model."""
    from .pose_search import PoseSearchConfig, search_poses

    cfg, data, info = trainer.config, trainer.data, trainer.info
    rot, shifts = data.poses.rotations, data.poses.shifts_px
    z = None
    if info.is_main:
        t0 = time.monotonic()
        z = encode_particles(trainer.model, data, trainer.device)["z"]
        prior = None if cfg.pose_search_prior_deg is None else np.radians(cfg.pose_search_prior_deg)
        search = PoseSearchConfig(radius_rad=float(np.radians(cfg.pose_search_radius_deg)),
                                  prior_sigma_rad=prior, reference=cfg.pose_search_reference,
                                  n_references=cfg.pose_search_groups)
        res = search_poses(trainer.model, data, rot, shifts, z, trainer.device, search,
                           prior_rotations=trainer.input_poses.rotations, seed=cfg.seed + trainer.epoch,
                           progress=trainer.progress,
                           # held-out images are searched but never shape the references
                           reference_rows=np.setdiff1d(np.arange(len(data)), trainer.heldout_rows))
        rot, shifts = res.rotations, res.shifts_px
        logger.info("pose search after epoch %d: prior width %.2f°, mean log-posterior gain %.3g (%.0f s)",
                    trainer.epoch, np.degrees(res.prior_sigma_rad), res.log_posterior_gain,
                    time.monotonic() - t0)
    rot = dist_mod.broadcast_array(np.ascontiguousarray(rot, dtype=np.float32), info)
    shifts = dist_mod.broadcast_array(np.ascontiguousarray(shifts, dtype=np.float32), info)
    data.poses = Poses(rot, shifts, data.original_box)
    return z
