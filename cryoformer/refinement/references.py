"""Reference maps for the pose search (:mod:`.search`), at the particles' *original* box.

Two kinds (:data:`~.config.REFERENCE_KINDS`):

* ``"model"`` — the network's own maps: the latents are grouped by K-means and a decoder
  (any ``decode(z [k, zdim]) → [k, D, D, D]``, e.g. the trained model's) gives one volume per
  cluster centre. As sharp as the model, which is limited by the training box and, early on,
  by the very pose errors being corrected.
* ``"backprojection"`` — maps reconstructed from the particles themselves at their current
  poses (:mod:`cryoformer.physics.backprojection`), per group of particles (K-means of the
  latents, 4 by default: once the poses are good, the heterogeneity is what blurs a
  consensus map; from 10 000 particles on, one group per 2000 particles, sharpened by
  classification, :mod:`.classification`), as two **gold-standard half maps**: the
  particles are split once into two fixed halves, each half's map is built from that half
  alone, and a particle is aligned against its own half's map. The halves are thus refined independently, and their
  FSC, which sets the Wiener filter, is not inflated by noise the maps share. The maps are
  multiplied by a soft solvent mask made from the low-passed full map, which removes the
  noise around the molecule. (The halves are independent in their particles; the mask, and
  the K-means groups, come from all of them.) Rows left out (a trainer's held-out images)
  are left out of the maps.

Measured on AdK (2000 particles, D = 64, SNR 0.1, input poses 24° off), three searches from
the poses a model-referenced run had reached at its held-out-chosen epoch (0.152 rad):
back-projected half maps with the solvent mask 0.1406 rad, with a spherical mask 0.1461 rad;
the model's own maps stayed at 0.149–0.157 rad over the following epochs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np
import torch
from scipy import ndimage

from cryoformer import clustering
from cryoformer.physics.backprojection import FourierBackprojector

from .config import PoseSearchConfig
from .particles import Particles

__all__ = ["Decoder", "MIN_GROUP_PARTICLES", "latent_groups", "merge_small_groups", "half_of", "solvent_mask",
           "backprojected_references", "model_references", "make_references"]

logger = logging.getLogger(__name__)

# latents [k, zdim] float32 (CPU) → volumes [k, D, D, D] at the particles' original box
Decoder = Callable[[torch.Tensor], torch.Tensor]

# A back-projected group needs this many particles: fewer, and each half map is mostly its own
# particles' noise, which holds them at their current poses.
MIN_GROUP_PARTICLES = 40

# Centres decoded per call of the decoder: bounds an accelerator's temporaries.
DECODE_CHUNK = 4


def latent_groups(latents: np.ndarray, k: int, seed: int) -> clustering.KMeansResult:
    """K-means of the latents ``[N, zdim]`` into ``min(k, N)`` groups: float32, 3 restarts, the
    raw centroids in scikit-learn's numbering (:func:`cryoformer.clustering.kmeans`)."""
    latents = np.asarray(latents, dtype=np.float32)
    return clustering.kmeans(latents, min(k, len(latents)), seed, n_init=3, on_data=False,
                             order_along_pc1=False)


def merge_small_groups(groups: np.ndarray, latents: np.ndarray, min_size: int) -> np.ndarray:
    """Labels ``0 … K'−1`` where every group has at least ``min_size`` members (when the data
    allow): the members of smaller groups join the nearest larger group's centre. A map from
    a handful of particles is mostly the particles' own noise, and a particle aligned against
    its own noise stays where it is."""
    groups = np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64)
    latents = np.asarray(latents, dtype=np.float64).reshape(len(groups), -1)
    while True:
        sizes = np.bincount(groups)
        small = np.nonzero(sizes < min_size)[0]
        if small.size == 0 or sizes.size == 1:
            return groups
        keep = np.nonzero(sizes >= min_size)[0]
        if keep.size == 0:  # every group is small: one group
            return np.zeros_like(groups)
        centres = np.stack([latents[groups == g].mean(0) for g in keep])  # [k, zdim]
        moving = np.isin(groups, small)
        d = ((latents[moving, None, :] - centres[None]) ** 2).sum(-1)  # [m, k]
        groups[moving] = keep[d.argmin(1)]
        groups = np.unique(groups, return_inverse=True)[1].astype(np.int64)


def half_of(n: int) -> np.ndarray:
    """The fixed gold-standard split: particle ``p`` (position in the data) is in half ``p % 2``,
    the same in every search, so the halves stay independent throughout a run."""
    return np.arange(n, dtype=np.int64) % 2


def solvent_mask(volume: np.ndarray, lowpass_px: float = 2.0, threshold: float = 0.15,
                 dilate_px: int = 3, edge_px: float = 1.5) -> np.ndarray:
    """Soft mask around the molecule in ``volume`` ``[D, D, D]``: where the map low-passed by a
    Gaussian of ``lowpass_px`` exceeds ``threshold`` × its maximum, dilated by ``dilate_px``
    voxels, with a Gaussian edge of ``edge_px``. Values in ``[0, 1]``."""
    smooth = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), lowpass_px)
    inside = smooth > threshold * smooth.max()
    if dilate_px > 0:
        inside = ndimage.binary_dilation(inside, iterations=dilate_px)
    return np.clip(ndimage.gaussian_filter(inside.astype(np.float32), edge_px), 0.0, 1.0)


@torch.no_grad()
def backprojected_references(particles: Particles, rotations: np.ndarray, shifts_px: np.ndarray,
                             groups: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                             progress_bar=None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Gold-standard half maps of each group from the particles at their current poses.

    Parameters
    ----------
    particles : Particles
        The particles at their original box ``D``.
    rotations : np.ndarray [N, 3, 3]
    shifts_px : np.ndarray [N, 2]
        Pixels of the original box.
    groups : np.ndarray [N], optional
        Group of each particle (``0 … K−1``, every group non-empty); default one group.
    rows : np.ndarray, optional
        Positions of the particles that go into the maps (default all); the trainer leaves its
        held-out images out, so they never shape the poses training uses.
    progress_bar : tqdm, optional
        Advanced by one per particle.

    Returns
    -------
    volumes : torch.Tensor
        ``[2K, D, D, D]``: group ``g``'s half ``h`` at index ``2g + h``, masked (:func:`solvent_mask`
        of the group's full map).
    labels : np.ndarray
        ``[N]`` the reference each particle is matched against: its own group and half.
    resolution_px : np.ndarray
        ``[K]`` gold-standard resolution (FSC 0.143) of each group, px per cycle.
    """
    n, D = len(particles), particles.box_size
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    K = int(groups.max(initial=0)) + 1
    halves = half_of(n)
    bp = FourierBackprojector(D, K)
    rot = torch.from_numpy(np.asarray(rotations, dtype=np.float32))
    shifts = torch.from_numpy(np.asarray(shifts_px, dtype=np.float32))
    use = np.ones(n, dtype=bool) if rows is None else np.isin(np.arange(n), rows)
    for pos, img_f, ctf in particles.spectra(bp.band):
        if progress_bar is not None:
            progress_bar.update(len(pos))
        sel = use[pos]
        pos, img_f, ctf = pos[sel], img_f[sel], ctf[sel]
        p = torch.from_numpy(pos)
        bp.insert(img_f, ctf, rot[p], shifts[p], torch.from_numpy(groups[pos]), torch.from_numpy(halves[pos]))
    rec = bp.reconstruct()
    masks = torch.stack([torch.from_numpy(solvent_mask(m.numpy())) for m in rec.maps])  # [K, D, D, D]
    volumes = (rec.half_maps * masks[:, None]).reshape(2 * K, D, D, D)
    return volumes, groups * 2 + halves, rec.resolution_px()


@torch.no_grad()
def model_references(decode: Decoder, latents: np.ndarray, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded maps at the K-means centres of the latents (:func:`latent_groups`) → (volumes
    ``[K, D, D, D]`` float32 on the CPU, labels ``[N]``)."""
    km = latent_groups(latents, k, seed)
    z = torch.as_tensor(km.centroids, dtype=torch.float32)  # [K, zdim]
    vols = torch.cat([decode(z[i:i + DECODE_CHUNK]).float().cpu() for i in range(0, len(z), DECODE_CHUNK)])
    return vols, km.labels


def make_references(config: PoseSearchConfig, particles: Particles, rotations: np.ndarray,
                    shifts_px: np.ndarray, latents: np.ndarray, decode: Optional[Decoder] = None,
                    seed: int = 0, rows: Optional[np.ndarray] = None) -> tuple[torch.Tensor, np.ndarray]:
    """The references ``config.reference`` names → (volumes ``[K, D, D, D]``, the reference each
    particle is matched against ``[N]``); arguments as :func:`cryoformer.refinement.search.search_poses`."""
    t0 = time.monotonic()
    if config.reference == "model":
        if decode is None:
            raise ValueError("model references need a decoder (decode=...)")
        vols, labels = model_references(decode, latents, config.groups(len(particles)), seed)
        logger.info("pose search references: the model's maps at %d K-means centres (%.0f s)",
                    len(vols), time.monotonic() - t0)
        return vols, labels
    from .classification import classify_groups  # it builds on this module's maps

    groups = latent_groups(latents, config.groups(len(particles)), seed).labels
    # at least MIN_GROUP_PARTICLES per group (about half in each half map)
    groups = merge_small_groups(groups, latents, MIN_GROUP_PARTICLES)
    groups = classify_groups(particles, rotations, shifts_px, groups, latents,
                             config.classification_rounds(len(particles)), rows, MIN_GROUP_PARTICLES)
    vols, labels, res_px = backprojected_references(particles, rotations, shifts_px, groups, rows)
    apix = particles.pixel_size_angstrom
    shown = ", ".join(f"{r:.2f} px" + (f" ({r * apix:.1f} Å)" if apix else "") for r in res_px[:4])
    logger.info("pose search references: %d gold-standard half-map pair(s) back-projected from %d "
                "particles, FSC-0.143 resolution %s%s (%.0f s)", len(res_px),
                len(particles) if rows is None else len(rows), shown,
                " …" if len(res_px) > 4 else "", time.monotonic() - t0)
    return vols, labels
