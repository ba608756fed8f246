"""Accuracy against ground truth (docs/conventions.md, "Metrics"): heterogeneous FSC, flexible-region ROC-AUC, poses.

Everything here takes arrays and a model; reading a run directory and the ground-truth files is
done by :func:`cryoformer.analysis.evaluate.evaluate_run`.

Boxes. Training may use a downsampled box, so ground-truth maps are brought to the evaluation
box ``d`` by Fourier cropping (:func:`fourier_crop_volume`, mean-preserving, as
:func:`cryoformer.physics.fourier.fourier_crop` for images); the voxel size becomes
``gt_apix · D_gt / d``. Both must describe the same physical box (checked by the caller).
Motion maps are not band-limited (they jump to 0 outside the molecule), so they are resampled
in real space instead (:func:`resample_real`, trilinear, the centre voxel ``D//2`` kept fixed).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from scipy.ndimage import map_coordinates

from cryoformer.analysis.attention_maps import subsample_latents
from cryoformer.analysis.volumes import iter_decoded
from cryoformer.metrics.fsc import FscResult

__all__ = ["fourier_crop_volume", "resample_real", "state_mean_latents", "heterogeneous_fsc",
           "distance_from_centre", "voxel_variance", "support_mask", "flex_roc_auc"]


def fourier_crop_volume(volume: np.ndarray, new_D: int) -> np.ndarray:
    """Downsample ``[D, D, D]`` → ``[new_D, new_D, new_D]`` by cropping the centred spectrum.

    Rescaled by ``(new_D / D)³`` so a constant map keeps its value (mean-preserving); voxel
    ``new_D//2`` coincides with voxel ``D//2``. ``new_D == D`` returns a copy.
    """
    vol = np.asarray(volume, dtype=np.float64)
    D = vol.shape[0]
    if vol.shape != (D, D, D) or D % 2 or new_D % 2 or new_D > D:
        raise ValueError(f"need an even cubic volume and an even new_D <= D, got {vol.shape}, {new_D}")
    if new_D == D:
        return vol.astype(np.float32)
    s = D // 2 - new_D // 2
    spec = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))[s:s + new_D, s:s + new_D, s:s + new_D]
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(spec))).real * (new_D / D) ** 3
    return out.astype(np.float32)


def resample_real(volume: np.ndarray, new_D: int, order: int = 1) -> np.ndarray:
    """Resample ``[D, D, D]`` onto a ``new_D³`` grid spanning the same box (real space).

    Voxel ``i`` of the new grid sits at ``(i − new_D//2) · D/new_D + D//2`` old voxels, so the
    centres coincide (docs/conventions.md). Values beyond the edge are the nearest edge values.
    """
    vol = np.asarray(volume, dtype=np.float32)
    D = vol.shape[0]
    if new_D == D:
        return vol.copy()
    c = (np.arange(new_D) - new_D // 2) * (D / new_D) + D // 2  # [new_D] old-grid coordinate
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    return map_coordinates(vol, [zz, yy, xx], order=order, mode="nearest").astype(np.float32)


def state_mean_latents(latents: np.ndarray, labels: np.ndarray, n_states: int) -> Dict[int, np.ndarray]:
    """Mean latent of each ground-truth state that has particles: ``{state: [zdim]}``.

    Parameters
    ----------
    latents : np.ndarray
        ``[N, zdim]`` latents of the run's particles.
    labels : np.ndarray
        ``[N]`` ground-truth state of the same particles (already mapped through the run's
        particle indices).
    n_states : int
    """
    return {k: latents[labels == k].mean(axis=0).astype(np.float32)
            for k in range(n_states) if np.any(labels == k)}


def heterogeneous_fsc(model, state_latents: Dict[int, np.ndarray], gt_maps: np.ndarray,
                      voxel_size_angstrom: float, mask: Optional[np.ndarray] = None,
                      progress: bool = False, keep_volumes: Optional[dict] = None) -> Dict[int, FscResult]:
    """FSC of the volume decoded at each state's latent against that state's map.

    Parameters
    ----------
    model : CryoFormer
    state_latents : dict
        ``{state: [zdim]}`` (e.g. :func:`state_mean_latents`).
    gt_maps : np.ndarray
        ``[K, d, d, d]`` ground-truth maps already on the evaluation grid (``d`` voxels spanning
        the training box).
    voxel_size_angstrom : float
        Voxel size of that grid (Å).
    mask : np.ndarray, optional
        ``[d, d, d]`` real-space mask for the FSC.
    keep_volumes : dict, optional
        Filled with ``{state: [d, d, d]}`` the decoded maps, for scores beyond the FSC.

    Returns
    -------
    dict
        ``{state: FscResult}`` labelled ``"state k"``.
    """
    states = sorted(state_latents)
    d = gt_maps.shape[-1]
    z = np.stack([state_latents[k] for k in states]) if states else np.zeros((0, 1), np.float32)
    out = {}
    for k, vol in zip(states, iter_decoded(model, z, d, batch_size=1, progress=progress,
                                           desc="states")):
        out[k] = FscResult.compute(vol, gt_maps[k], voxel_size_angstrom, mask=mask, label=f"state {k}")
        if keep_volumes is not None:
            keep_volumes[k] = np.asarray(vol, dtype=np.float32)
    return out


def distance_from_centre(D: int) -> np.ndarray:
    """``[D, D, D]`` distance (voxels) of every voxel from the centre voxel ``D//2``."""
    c = np.arange(D, dtype=np.float32) - D // 2
    return np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def voxel_variance(model, z: np.ndarray, D: Optional[int] = None, max_latents: int = 64,
                   seed: int = 0, progress: bool = False) -> np.ndarray:
    """Per-voxel variance ``[D, D, D]`` of volumes decoded at (at most ``max_latents``) latents.

    The baseline (docs/conventions.md) for flexible-region localisation: where the decoded density changes
    across the particles' latents. Streaming (Welford), so memory stays at a few volumes.
    """
    zs = subsample_latents(z, max_latents, seed)
    D = int(D or model.box_size)
    mean = np.zeros((D, D, D))
    m2 = np.zeros((D, D, D))
    for i, vol in enumerate(iter_decoded(model, zs, D, progress=progress, desc="variance")):
        delta = vol - mean
        mean += delta / (i + 1)
        m2 += delta * (vol - mean)
    return (m2 / max(len(zs) - 1, 1)).astype(np.float32)


def support_mask(maps: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Molecule support: voxels above ``fraction`` of its maximum in any map ``[K, D, D, D]``."""
    maps = np.asarray(maps)
    peaks = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1, 1)  # [K, 1, 1, 1]
    return np.any(maps > fraction * peaks, axis=0)


def flex_roc_auc(scores: Dict[str, np.ndarray], motion_angstrom: np.ndarray,
                 threshold_angstrom: float, support: Optional[np.ndarray] = None) -> Dict[str, object]:
    """ROC-AUC of each score map at predicting moving voxels (docs/conventions.md, "Metrics").

    Parameters
    ----------
    scores : dict
        ``{name: [D, D, D]}`` score maps (higher = more flexible).
    motion_angstrom : np.ndarray
        ``[D, D, D]`` ground-truth displacement (Å) on the same grid.
    threshold_angstrom : float
        A voxel is *moving* when its displacement exceeds this (Å).
    support : np.ndarray, optional
        ``[D, D, D]`` bool: only these voxels are scored (the molecule); default all.

    Returns
    -------
    dict
        ``{"auc": {name: float or None}, "n_voxels", "n_moving", "threshold_angstrom"}``; the
        AUCs are None (with a ``"note"``) when the voxels are all moving or all static.
    """
    motion = np.asarray(motion_angstrom)
    keep = np.ones(motion.shape, bool) if support is None else np.asarray(support, bool)
    moving = motion[keep] > threshold_angstrom
    out: Dict[str, object] = {"threshold_angstrom": float(threshold_angstrom),
                              "n_voxels": int(keep.sum()), "n_moving": int(moving.sum())}
    if moving.all() or not moving.any():
        out["auc"] = {name: None for name in scores}
        out["note"] = "every scored voxel is on one side of the motion threshold; AUC undefined"
        return out
    # sklearn here, not at the top: ~1 s to import, and every CLI command imports this module
    from sklearn.metrics import roc_auc_score

    out["auc"] = {name: float(roc_auc_score(moving, np.asarray(s)[keep])) for name, s in scores.items()}
    return out


def summarise_fsc(results: Dict[int, FscResult], n_particles: Sequence[int]) -> dict:
    """Per-state and mean FSC-0.5 resolution (Å) and AU-FSC as a JSON-ready dict."""
    rows = []
    for (k, r), n in zip(sorted(results.items()), n_particles):
        low = r.curve[1:4]
        res = r.resolution(0.5)
        # JSON has no infinity: a curve below 0.5 from the first shell on has no finite resolution.
        row = {"state": int(k), "n_particles": int(n),
               "resolution_fsc0.5_angstrom": res if np.isfinite(res) else None, "au_fsc": r.au_fsc}
        if low.size and float(np.mean(low)) < 0:
            # Negative low-frequency correlation: the map is contrast-inverted relative to the
            # ground truth (wrong --uninvert-data?), not merely inaccurate.
            row["note"] = "decoded map is anti-correlated with the ground truth at low resolution"
        rows.append(row)
    res = [r["resolution_fsc0.5_angstrom"] for r in rows]
    auc = [r["au_fsc"] for r in rows]
    return {"states": rows,
            "mean_resolution_fsc0.5_angstrom": float(np.mean(res)) if res and None not in res else None,
            "mean_au_fsc": float(np.mean(auc)) if auc else None}
