"""The molecule's support: where the per-image density head needs to run at all.

The canonical-grid renderer runs the per-image head on every voxel of the sphere of radius
``D/2 + 2`` (≈ 0.55·D³ voxels per image), yet a particle boxed for cryo-EM fills a small part
of it: AdK at D = 64, 1.5 Å/px occupies ≈ 10 % of the sphere. Most of a D = 64 training step is
that per-voxel work (docs/benchmarks.md), so evaluating the head only on a mask around the
molecule — zero density elsewhere — is the largest CPU speed-up available without changing
the model. This departs from the paper (which evaluates the whole box); the mask is part of
the trained model (saved in checkpoints, applied when decoding), so what was trained is what
is decoded.

The mask comes from the model itself, at the start of every epoch after the first: volumes
decoded at a few particle latents are smoothed (so noise specks do not count), their maximum
over latents is thresholded at a fraction of its peak, and the result is dilated by a margin, so
that density can still grow outward by that margin per epoch, and intersected with the
renderer's sphere. The epoch then trains under that mask, and its checkpoints store it.

>>> mask = support_from_volumes(vols, threshold=0.05, margin_px=3)   # [D, D, D] bool
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .coordinates import sphere_voxel_index


def support_from_volumes(volumes: torch.Tensor, threshold: float, margin_px: int,
                         smooth_px: int = 1) -> torch.Tensor:
    """Support mask of a set of volumes on their grid.

    Parameters
    ----------
    volumes : Tensor [M, D, D, D]
        Density volumes of the same model at ``M`` latents (training-box grid, axes z, y, x).
    threshold : float
        Fraction of the peak of the smoothed, latent-wise maximum density that a voxel must
        exceed to be inside before dilation (0 < threshold < 1).
    margin_px : int
        Dilation (voxels of this grid): a cube of half-width ``margin_px`` around every inside
        voxel is added.
    smooth_px : int
        Half-width of the box filter applied first (0 = none); noise specks are averaged away.

    Returns
    -------
    BoolTensor [D, D, D], on the volumes' device; never empty (the peak voxel is inside), and
    limited to the renderer's sphere of radius ``D/2 + 2``.
    """
    if volumes.dim() != 4 or volumes.shape[1] != volumes.shape[2] or volumes.shape[2] != volumes.shape[3]:
        raise ValueError(f"volumes must be [M, D, D, D], got {tuple(volumes.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    d = volumes.shape[-1]
    sphere = torch.zeros(d ** 3, dtype=torch.bool, device=volumes.device)
    sphere[sphere_voxel_index(d, d / 2 + 2, device=volumes.device)] = True
    sphere = sphere.reshape(d, d, d)
    # Only the sphere was ever rendered (trained): the corners of a first, unmasked decode hold
    # untrained values that must not set the peak nor leak in through the smoothing. |v|, so a
    # molecule of either sign (a wrong --uninvert-data, early training) is found.
    v = (volumes.detach().float().abs() * sphere).unsqueeze(1)  # [M, 1, D, D, D]
    if smooth_px > 0:
        v = F.avg_pool3d(v, 2 * smooth_px + 1, stride=1, padding=smooth_px, count_include_pad=False)
    peak_map = v.amax(dim=0)  # [1, D, D, D]: density present in any of the states
    inside = (peak_map > threshold * peak_map.max()).float()
    if margin_px > 0:
        inside = F.max_pool3d(inside.unsqueeze(0), 2 * margin_px + 1, stride=1, padding=margin_px)[0]
    mask = inside[0].bool() & sphere
    if not mask.any():  # a flat (untrained) map: keep the sphere rather than nothing
        mask = sphere
    return mask


def support_index(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """Sorted flat voxel indices of ``mask`` on a ``resolution³`` grid spanning the same box.

    Parameters
    ----------
    mask : BoolTensor [D, D, D]
    resolution : int
        Grid edge; the mask is resampled by nearest voxel (same box: voxel ``i`` of the new
        grid sits at ``i·D/resolution`` training voxels, as the density field places
        it), and dilated by one voxel when upsampling so no in-support point is lost at edges.

    Returns
    -------
    LongTensor [S]
    """
    d = mask.shape[-1]
    m = mask
    if resolution != d:
        c = torch.arange(resolution, device=mask.device, dtype=torch.float64) * (d / resolution)
        idx = torch.floor(c + 0.5).long().clamp(0, d - 1)
        m = mask[idx][:, idx][:, :, idx]
        if resolution > d:
            m = F.max_pool3d(m.float()[None, None], 3, stride=1, padding=1)[0, 0].bool()
    return torch.nonzero(m.reshape(-1)).squeeze(1)
