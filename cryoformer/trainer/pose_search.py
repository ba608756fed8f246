"""Local pose search by projection matching against the model's own volumes.

The orientation encoder of paper §3.2 learns poses only after long pre-training (the paper:
200 epochs of 50k images on a GPU); on a CPU budget it does not get close to the input poses
(measured: 124° median error after 50 pre-training epochs of 1000 images, see
``bench/bench_pose_refinement.py``). This module refines poses the way RELION's local searches
do, with the network as the reference: for each particle, decode its volume at its own latent,
project it at candidate rotations around the current one (coarse to fine), keep the best fit to
the image (same image formation as training: projection, shift, CTF), then search the shift
the same way. The current pose is always a candidate, so the fit never gets worse.

Cost per particle: one volume decode and ``27 · levels`` projections of ``D³`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryoformer.model import CryoFormer
from cryoformer.physics.ctf import ctf_images
from cryoformer.physics.fourier import fft2_center, frequency_grid_2d
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import axis_angle_to_matrix

from .data import ParticleData, make_loader


@dataclass(frozen=True)
class PoseSearchConfig:
    """Coarse-to-fine grids: level ``l`` tries rotations ``exp(δ)·R`` with ``δ ∈ {−a, 0, a}³``
    (``a = rotation_steps_rad[l]``) and then shifts ``t + {−b, 0, b}²``
    (``b = shift_steps_px[l]``, pixels of the training box)."""

    rotation_steps_rad: tuple[float, ...] = (0.08, 0.04, 0.02, 0.01)
    shift_steps_px: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)
    batch_size: int = 32


def _grid3(step: float) -> torch.Tensor:
    g = torch.tensor([-1.0, 0.0, 1.0]) * step
    return torch.cartesian_prod(g, g, g)  # [27, 3]; index 13 is the zero vector


@torch.no_grad()
def search_poses(model: CryoFormer, data: ParticleData, rotations: np.ndarray, shifts_px: np.ndarray,
                 device: torch.device, config: PoseSearchConfig = PoseSearchConfig(),
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Refine every selected particle's pose around ``(rotations, shifts_px)``.

    Parameters
    ----------
    model : CryoFormer
        Unwrapped model; its mode is restored afterwards.
    data : ParticleData
    rotations : np.ndarray [N, 3, 3]
        Current rotations of the subset (SPEC §2 convention).
    shifts_px : np.ndarray [N, 2]
        Current shifts in pixels of the *training* box.
    device : torch.device
    config : PoseSearchConfig

    Returns
    -------
    rotations : np.ndarray [N, 3, 3]
    shifts_px : np.ndarray [N, 2]
        Training-box pixels.
    improvement : float
        Mean relative decrease of the per-image squared error (≥ 0).
    """
    was_training = model.training
    model.eval()
    n, d = len(data), data.box_size
    out_r = np.array(rotations, dtype=np.float32, copy=True)
    out_t = np.array(shifts_px, dtype=np.float32, copy=True)
    k = frequency_grid_2d(d, 1.0, device=device)  # [D, D, 2] cycles/px
    grids = [axis_angle_to_matrix(_grid3(a)).to(device) for a in config.rotation_steps_rad]
    sgrid = torch.cartesian_prod(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])).to(device)
    gains = []
    batches = [np.arange(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    try:
        for batch in make_loader(data, batches, 0):
            pos = batch["position"].numpy()
            images = batch["images"].to(device)
            b = images.shape[0]
            rot = torch.from_numpy(out_r[pos]).to(device)
            t = torch.from_numpy(out_t[pos]).to(device)
            ctf = ctf_images(batch["ctf"].to(device), d) if "ctf" in batch else torch.ones(1, d, d, device=device)
            f_img = fft2_center(images)
            vols = model.decode_volume(model.encode(images)["mu"], d).float()  # [B, D, D, D]

            def err(f_proj: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
                """Squared error [B] of CTF ⋆ shift(projection) against the images (Fourier)."""
                phase = 2 * torch.pi * (k * shifts[:, None, None, :]).sum(-1)
                pred = f_proj * torch.polar(torch.ones_like(phase), phase)
                return (pred - f_img).abs().square().sum(dim=(-2, -1))

            f_best = fft2_center(project(vols, rot)) * ctf
            best = err(f_best, t)
            start = best.clone()
            for level, delta in enumerate(grids):
                for c in range(delta.shape[0]):
                    if c == 13:  # the current rotation, already scored
                        continue
                    cand = delta[c] @ rot  # [B, 3, 3]
                    f_c = fft2_center(project(vols, cand)) * ctf
                    e = err(f_c, t)
                    better = e < best
                    if better.any():
                        rot = torch.where(better[:, None, None], cand, rot)
                        f_best = torch.where(better[:, None, None], f_c, f_best)
                        best = torch.where(better, e, best)
                step = config.shift_steps_px[min(level, len(config.shift_steps_px) - 1)]
                base = t.clone()
                for s in sgrid * step:
                    cand_t = base + s
                    e = err(f_best, cand_t)
                    better = e < best
                    t = torch.where(better[:, None], cand_t, t)
                    best = torch.where(better, e, best)
            out_r[pos] = rot.cpu().numpy()
            out_t[pos] = t.cpu().numpy()
            gains.append(((start - best) / start.clamp(min=1e-12)).cpu().numpy())
    finally:
        model.train(was_training)
    return out_r, out_t, float(np.concatenate(gains).mean()) if gains else 0.0
