"""Encoder passes over a whole particle set: latents and (with pose refinement) poses.

Only the image encoders run (no rendering), in eval mode and without gradients, so a pass
over 100k particles costs about as much as a few training steps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from cryoformer.model import CryoFormer

from .data import ParticleData, make_loader
from cryoformer.progress import OFF, Progress, resolve_style

# Images per encoder call: large batches, the encoders are small MLPs.
ENCODE_BATCH = 256


@torch.no_grad()
def encode_particles(model: CryoFormer, data: ParticleData, device: torch.device,
                     want_poses: bool = False, num_workers: int = 0,
                     batch_size: int = ENCODE_BATCH, progress=OFF) -> dict[str, Optional[np.ndarray]]:
    """Mean latents (and predicted poses) of every selected particle, in subset order.

    Parameters
    ----------
    model : CryoFormer
        Unwrapped model (not the DDP wrapper); its train/eval mode is restored afterwards.
    data : ParticleData
    device : torch.device
    want_poses : bool
        Also run the orientation encoder (the model must have one).
    num_workers : int
        DataLoader workers reading the images.
    batch_size : int
        Images per encoder call.
    progress : bool or str
        A style of :mod:`cryoformer.progress` (``"bars"``, ``"lines"``, ``"off"``), or a bool (True:
        bars on a terminal, plain lines elsewhere).

    Returns
    -------
    dict
        ``z`` [N, zdim] float32 (the mean ``mu`` when variational); ``rotations``
        [N, 3, 3] and ``shifts_px`` [N, 2] in pixels of the *training* box, or None.
    """
    was_training = model.training
    model.eval()
    n = len(data)
    z = np.empty((n, model.config.zdim), dtype=np.float32)
    rot = np.empty((n, 3, 3), dtype=np.float32) if want_poses else None
    shifts = np.empty((n, 2), dtype=np.float32) if want_poses else None
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    bar = Progress(len(batches), "latents", resolve_style(progress), unit="batch")
    try:
        for batch in make_loader(data, batches, num_workers):
            pos = batch["position"].numpy()
            images = batch["images"].to(device, non_blocking=True)
            bar.update(1, images=len(pos))
            z[pos] = model.encode(images)["mu"].float().cpu().numpy()
            if want_poses:
                r, t = model.orientation_encoder(images)
                rot[pos] = r.float().cpu().numpy()
                shifts[pos] = t.float().cpu().numpy()
    finally:
        bar.close()
        model.train(was_training)
    return {"z": z, "rotations": rot, "shifts_px": shifts}
