"""Flexible regions from how the model's density responds to the latent (docs/conventions.md).

Why not the query channels alone
--------------------------------
The density at a point ``x`` depends on the latent ``z`` only through the conditioned query the
point reads (``GetQuery_{Q'(z)}(x)``, paper eq. 5). How much a query changes says little about how
much the density changes: a large query change can fall in a direction the density head ignores
(empty solvent blocks, or channels the head's attention does not use), and a small one can move
a steep edge. The head is the judge of what the query change means, so this module reads the
change where the head turns it into density.

Definition (``flex_score(..., method="density")``)
--------------------------------------------------
1. Decode the density ``ρ_m = ρ(·; Q'(z_m))`` (``[D, D, D]``) at ``M`` latents ``z_m`` (a seeded
   subset of the particles' latents) and stack the changes ``X = ρ_m − mean_m ρ_m``
   (``[M, V]``, ``V = D³``).
2. Keep the leading modes of ``X`` (singular values ``σ_k``, spatial modes ``v_k``): the smallest
   number whose share of ``Σ σ²`` reaches ``mode_variance_fraction``. A molecule's motions
   move density coherently along a few modes; what is left is mostly the decoder's incoherent
   jitter, which the plain voxel variance counts as flexibility (default 99 %).
3. The per-voxel response amplitude ``a(x) = sqrt(Σ_k σ_k² v_k(x)²)`` is smoothed with a
   Gaussian of ``smoothing_sigma_px`` training pixels (default 0.5), which lets the edges that
   a rigid domain moves colour its interior as well.
4. Divided by its maximum: a ``[D, D, D]`` map in ``[0, 1]``.

The modes are computed on a grid of at most ``max_grid_voxels`` (64) voxels spanning the box;
a larger ``D`` gets the score resampled (trilinear) and the regions by nearest voxel. Measured
on the benchmark runs (docs/benchmarks.md), the map is above both trivial baselines (distance
from the centre, variance of decoded volumes) and far above the attention-map scores; its margin
over the variance is small and comes mostly from the smoothing.

Regions (:func:`flexible_regions`)
----------------------------------
Voxels whose score is at least ``region_threshold`` are grouped by how they co-vary over the
latents: voxel ``x`` has the trajectory ``t_x = (σ_k v_k(x))_k`` in mode space, two voxels are
alike by ``cos²(t_x, t_y)`` (the leading and trailing edge of one moving domain are
anti-correlated, so the sign is ignored), and the affinity matrix is cut by spectral clustering
into ``R`` regions, ``R`` chosen by the largest eigengap up to ``max_regions``. Two domains that
move independently have near-orthogonal trajectories, so they land in different regions. The
labels are ``0`` (not flexible) and ``1 … R``, numbered by decreasing summed score.

Everything depends only on the trained model and the latents, and is deterministic at a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from cryoformer.analysis.volumes import iter_decoded
from cryoformer.clustering import kmeans

__all__ = ["FlexRegionConfig", "DensityModes", "density_modes", "density_flex_score",
           "flexible_regions", "modes_for_fraction", "region_labels", "subsample_latents"]


def subsample_latents(z: np.ndarray, max_latents: int, seed: int = 0) -> np.ndarray:
    """At most ``max_latents`` rows of ``z`` ``[N, zdim]``, drawn without replacement (seeded)."""
    z = np.asarray(z, dtype=np.float32)
    if len(z) <= max_latents:
        return z
    rng = np.random.default_rng(seed)
    return z[np.sort(rng.choice(len(z), size=max_latents, replace=False))]


@dataclass(frozen=True)
class FlexRegionConfig:
    """Options of the density-response flexibility map and its regions.

    Attributes
    ----------
    max_latents : int
        Latents decoded (seeded subsample of the particles').
    mode_variance_fraction : float
        Share of the total squared change the kept modes must explain (0–1].
    n_modes : int or None
        Keep exactly this many modes instead (None: by ``mode_variance_fraction``).
    smoothing_sigma_px : float
        Gaussian smoothing of the response amplitude, in training pixels (0: none).
    support_fraction : float
        Model support (where regions may lie): voxels above this fraction of the maximum
        density at any latent.
    region_threshold : float
        Voxels with score ≥ this (of the ``[0, 1]`` map) are assigned to a region.
    max_regions : int
        Most regions the spectral clustering may return.
    max_region_voxels : int
        Most voxels in the affinity matrix (the highest-scoring); the rest join the region
        whose mean trajectory they align with best.
    max_grid_voxels : int
        The modes are computed on a grid of at most this edge spanning the box (memory grows
        as ``max_latents · edge³``); a larger requested ``D`` gets the score resampled
        (trilinear) and the regions by nearest voxel.
    seed : int
    """

    max_latents: int = 256
    mode_variance_fraction: float = 0.99
    n_modes: Optional[int] = None
    smoothing_sigma_px: float = 0.5
    support_fraction: float = 0.05
    region_threshold: float = 0.3
    max_regions: int = 4
    max_region_voxels: int = 3000
    max_grid_voxels: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DensityModes:
    """Leading modes of the decoded density's change over latents.

    Attributes
    ----------
    singular_values : np.ndarray
        ``[k]`` σ of the kept modes (density units · sqrt(latents)).
    modes : np.ndarray
        ``[k, D, D, D]`` unit-norm spatial modes ``v_k``.
    explained : np.ndarray
        ``[k]`` share of the total squared change each kept mode explains.
    support : np.ndarray
        ``[D, D, D]`` bool, the model's support over the latents.
    """

    singular_values: np.ndarray
    modes: np.ndarray
    explained: np.ndarray
    support: np.ndarray

    def trajectories(self) -> np.ndarray:
        """``[k, D, D, D]`` per-voxel trajectory coordinates ``σ_k v_k(x)``."""
        return self.singular_values[:, None, None, None] * self.modes


def modes_for_fraction(singular_values: np.ndarray, fraction: float) -> int:
    """Fewest leading modes whose share of ``Σ σ²`` reaches ``fraction`` (at least 1)."""
    energy = np.asarray(singular_values, np.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 1
    return int(min(len(energy), np.searchsorted(np.cumsum(energy) / total, fraction - 1e-12) + 1))


@torch.no_grad()
def density_modes(model, z: np.ndarray, D: Optional[int] = None,
                  config: FlexRegionConfig = FlexRegionConfig()) -> DensityModes:
    """Decode at a latent subset and return the leading modes of the change (module docstring).

    Parameters
    ----------
    model : CryoFormer
    z : np.ndarray
        ``[N, zdim]`` particle latents.
    D : int, optional
        Grid edge (default the training box).
    config : FlexRegionConfig
    """
    D = int(D or model.box_size)
    zs = subsample_latents(z, config.max_latents, config.seed)  # [M, zdim]
    vols = np.stack([np.asarray(v, np.float32).reshape(-1)
                     for v in iter_decoded(model, zs, D, batch_size=1)])  # [M, V]
    peak = vols.max(axis=0)  # [V] highest density each voxel reaches
    support = peak > config.support_fraction * max(float(peak.max()), 1e-30)
    vols -= vols.mean(axis=0, dtype=np.float64).astype(np.float32)  # [M, V] the changes, in place
    # Thin SVD via the M×M Gram matrix: M ≪ V, and eigh is deterministic.
    gram = (vols @ vols.T).astype(np.float64)  # [M, M]
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    k = config.n_modes or modes_for_fraction(np.sqrt(evals), config.mode_variance_fraction)
    k = max(1, min(k, int(np.sum(evals > 1e-12 * max(evals[0], 1e-300))) or 1))
    sigma = np.sqrt(evals[:k])  # [k]
    unit_sigma = np.where(sigma > 0, sigma, 1.0)[:, None]  # [k, 1]
    modes = (evecs[:, :k].T.astype(np.float32) @ vols) / unit_sigma  # [k, V]
    total = evals.sum()
    explained = evals[:k] / total if total > 0 else np.zeros(k)
    return DensityModes(sigma, modes.reshape(k, D, D, D).astype(np.float64), explained,
                        support.reshape(D, D, D))


def _mode_grid(D: int, config: FlexRegionConfig) -> int:
    """Edge of the grid the modes are computed on: ``D``, or at most ``max_grid_voxels`` (even)."""
    return D if D <= config.max_grid_voxels else max(2, config.max_grid_voxels // 2 * 2)


def _resample(volume: np.ndarray, D: int, order: int) -> np.ndarray:
    """``[d, d, d]`` → ``[D, D, D]`` spanning the same box, centre voxel ``d//2`` on ``D//2``
    (docs/conventions.md); ``order`` 1 trilinear, 0 nearest."""
    d = volume.shape[0]
    if d == D:
        return volume
    c = (np.arange(D) - D // 2) * (d / D) + d // 2  # [D] source-grid coordinate
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    return map_coordinates(volume, [zz, yy, xx], order=order, mode="nearest").astype(volume.dtype)


def _score_from_modes(dm: DensityModes, sigma_vox: float) -> np.ndarray:
    """Smoothed response amplitude, normalised to ``[0, 1]`` → ``[D, D, D]``."""
    amplitude = np.sqrt(np.sum(dm.trajectories() ** 2, axis=0))  # [D, D, D]
    if sigma_vox > 0:
        amplitude = gaussian_filter(amplitude, sigma_vox, mode="constant")
    top = float(amplitude.max())
    return (amplitude / top if top > 0 else np.zeros_like(amplitude)).astype(np.float32)


def density_flex_score(model, z: np.ndarray, D: Optional[int] = None,
                       config: FlexRegionConfig = FlexRegionConfig(),
                       modes: Optional[DensityModes] = None) -> np.ndarray:
    """The flexible-region score of method ``"density"``: ``[D, D, D]`` float32 in ``[0, 1]``.

    Parameters
    ----------
    model : CryoFormer
    z : np.ndarray
        ``[N, zdim]`` particle latents.
    D : int, optional
        Grid edge (default the training box).
    config : FlexRegionConfig
    modes : DensityModes, optional
        Reuse modes already computed by :func:`density_modes` (on their own grid).
    """
    D = int(D or model.box_size)
    if len(z) < 2:
        return np.zeros((D, D, D), dtype=np.float32)  # no variability without two latents
    dm = modes if modes is not None else density_modes(model, z, _mode_grid(D, config), config)
    d = dm.modes.shape[-1]
    score = _score_from_modes(dm, config.smoothing_sigma_px * d / model.box_size)
    return np.clip(_resample(score, D, order=1), 0.0, 1.0)


def flexible_regions(model, z: np.ndarray, D: Optional[int] = None,
                     config: FlexRegionConfig = FlexRegionConfig(),
                     modes: Optional[DensityModes] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Flexible regions: voxels grouped by how their density co-varies over the latents.

    Returns
    -------
    labels : np.ndarray
        ``[D, D, D]`` int32, 0 = not flexible, ``1 … R`` the regions (by decreasing summed score).
    score : np.ndarray
        ``[D, D, D]`` float32, the ``"density"`` flexible-region score the regions are cut from.
    """
    D = int(D or model.box_size)
    if len(z) < 2:
        return np.zeros((D, D, D), np.int32), np.zeros((D, D, D), np.float32)
    dm = modes if modes is not None else density_modes(model, z, _mode_grid(D, config), config)
    d = dm.modes.shape[-1]
    score = density_flex_score(model, z, d, config, dm)  # on the modes' grid
    labels = region_labels(dm.trajectories(), score, config, dm.support)
    return _resample(labels, D, order=0), density_flex_score(model, z, D, config, dm)


def region_labels(trajectories: np.ndarray, score: np.ndarray,
                  config: FlexRegionConfig = FlexRegionConfig(),
                  support: Optional[np.ndarray] = None) -> np.ndarray:
    """Spectral clustering of the voxels with ``score ≥ region_threshold`` (inside ``support``,
    ``[D, D, D]`` bool, when given) by ``cos²`` of their trajectories ``[k, D, D, D]``;
    ``[D, D, D]`` int32 labels (0 = not flexible)."""
    D = score.shape[0]
    support = np.ones(score.shape, bool) if support is None else np.asarray(support, bool)
    labels = np.zeros(score.shape, np.int32)
    flat = np.flatnonzero((score >= config.region_threshold).reshape(-1) & support.reshape(-1))  # [P]
    if flat.size < 2:
        labels.reshape(-1)[flat] = 1
        return labels
    traj = trajectories.reshape(trajectories.shape[0], -1)[:, flat].T  # [P, k]
    unit = traj / np.maximum(np.linalg.norm(traj, axis=1, keepdims=True), 1e-30)
    # The affinity matrix grows as P²: cluster the highest-scoring voxels, attach the rest.
    core = np.argsort(-score.reshape(-1)[flat], kind="stable")[:config.max_region_voxels]
    core_labels = _spectral(unit[core], config.max_regions, config.seed)  # [Pc] in 0…R−1
    centres = np.stack([unit[core][core_labels == r].mean(0) for r in range(core_labels.max() + 1)])
    assign = np.argmax((unit @ centres.T) ** 2, axis=1)  # [P] best aligned region
    assign[core] = core_labels
    # Number regions by decreasing summed score, so region 1 is the most flexible.
    weight = np.bincount(assign, weights=score.reshape(-1)[flat], minlength=len(centres))
    rank = np.empty(len(centres), np.int64)
    rank[np.argsort(-weight, kind="stable")] = np.arange(len(centres))
    labels.reshape(-1)[flat] = rank[assign] + 1
    return labels.reshape(D, D, D)


def _spectral(unit: np.ndarray, max_regions: int, seed: int) -> np.ndarray:
    """Spectral clustering of unit trajectories ``[P, k]`` with affinity ``cos²``; ``[P]`` labels.

    The number of regions is the eigengap of the normalised affinity (1 … ``max_regions``)."""
    affinity = (unit @ unit.T) ** 2  # [P, P] sign-free alignment
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-30))
    normalised = affinity * inv_sqrt[:, None] * inv_sqrt[None, :]
    evals, evecs = np.linalg.eigh(normalised)
    evals, evecs = evals[::-1], evecs[:, ::-1]  # decreasing; evals[0] = 1
    top = evals[:max_regions + 1]
    n_regions = int(np.argmax(top[:-1] - top[1:]) + 1) if len(top) > 1 else 1
    n_regions = min(n_regions, len(unit))
    if n_regions == 1:
        return np.zeros(len(unit), np.int64)
    embed = evecs[:, :n_regions]
    embed = embed / np.maximum(np.linalg.norm(embed, axis=1, keepdims=True), 1e-30)
    result = kmeans(embed, n_regions, seed=seed, on_data=False, order_along_pc1=False)
    return np.asarray(result.labels, np.int64)
