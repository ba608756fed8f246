"""Scores of heterogeneity that a single consensus map cannot pass.

The mean per-state FSC against the truth barely sees the motion when the moving part is a
small share of the mass: the mean of the true maps, which has no heterogeneity at all, scores
about as well as any method. The difference-map correlation scores only what changes between
states (docs/conventions.md, "Metrics"):

1. every map, recovered and true, is low-passed by the same Gaussian (amplitude 1/2 at
   ``lowpass_angstrom``): the motion is a low-resolution change;
2. the recovered maps are put into the truth's units by one least-squares fit of all of them
   on the mean true map ``m`` (``r_k ≈ a·m + b`` for every ``k``, then ``(r_k − b)/a``). One
   model decodes every state in the same units, so one scale serves all; the mean favours no
   state, so the fit cannot create a difference (and the true maps fit with ``a = 1, b = 0``
   exactly, their differences summing to zero); a negative ``a`` undoes an inverted contrast;
3. the correlation, over states and voxels, of ``r_k − mean_k(r)`` with ``t_k − m``.

It is 1 when the recovered maps change exactly as the true ones do (up to one scale), 0 for a
single map however good (its differences are zero), and negative for motion the wrong way.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["lowpass_gaussian", "difference_map_correlation", "motion_mask"]


def lowpass_gaussian(volume: np.ndarray, voxel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    """Gaussian low-pass of ``[..., D, D, D]`` maps whose amplitude is 1/2 at ``resolution_angstrom``.

    Returns float64 maps of the same shape.
    """
    vol = np.asarray(volume, dtype=np.float64)
    d = vol.shape[-1]
    f = np.fft.fftfreq(d) / voxel_size_angstrom  # [D] 1/Å
    f2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2  # [D, D, D]
    gain = np.exp(-np.log(2.0) * f2 * resolution_angstrom ** 2)
    return np.fft.ifftn(np.fft.fftn(vol, axes=(-3, -2, -1)) * gain, axes=(-3, -2, -1)).real


def difference_map_correlation(recovered: np.ndarray, truth: np.ndarray, voxel_size_angstrom: float,
                               lowpass_angstrom: float = 8.0, mask: Optional[np.ndarray] = None) -> float:
    """Correlation of the recovered state-to-state differences with the true ones (module docstring).

    Parameters
    ----------
    recovered, truth : np.ndarray
        ``[K, D, D, D]`` maps, state ``k`` in both, on the same grid (K ≥ 2).
    voxel_size_angstrom : float
        Voxel size of that grid (Å).
    lowpass_angstrom : float
        Resolution (Å) at which the common Gaussian low-pass halves the amplitude.
    mask : np.ndarray, optional
        ``[D, D, D]`` bool: voxels scored (default all).

    Returns
    -------
    float
        In [−1, 1]; 0 when the recovered maps do not differ.
    """
    rec = np.asarray(recovered)
    tru = np.asarray(truth)
    if rec.shape != tru.shape or rec.ndim != 4 or rec.shape[0] < 2:
        raise ValueError(f"expected two [K >= 2, D, D, D] stacks of one shape, got {rec.shape} and {tru.shape}")
    keep = np.ones(rec.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    r = lowpass_gaussian(rec, voxel_size_angstrom, lowpass_angstrom)[:, keep]  # [K, V]
    t = lowpass_gaussian(tru, voxel_size_angstrom, lowpass_angstrom)[:, keep]  # [K, V]
    m = t.mean(axis=0)  # [V] the consensus of the truth
    k = r.shape[0]
    design = np.tile(np.stack([m, np.ones_like(m)], axis=1), (k, 1))  # [K·V, 2]
    scale, offset = np.linalg.lstsq(design, r.reshape(-1), rcond=None)[0]
    if abs(scale) <= 1e-12:  # nothing of the molecule in the maps: no motion either
        return 0.0
    # The offset cancels in the differences. Taken against state 0 first, identical maps give
    # exact zeros (a mean of K equal floats can differ from them by rounding, which the
    # normalisation below would blow up into a random correlation).
    rel = r - r[0]  # [K, V]
    dr = (rel - rel.mean(axis=0)) / scale  # [K, V]
    dt = t - m  # [K, V]
    norm = np.sqrt((dr * dr).sum() * (dt * dt).sum())
    return float((dr * dt).sum() / norm) if norm > 0 else 0.0


def motion_mask(motion_angstrom: np.ndarray, threshold_angstrom: float, soft_edge_px: float = 2.0) -> np.ndarray:
    """Soft ``[D, D, D]`` mask in [0, 1] around the voxels that move more than ``threshold_angstrom``.

    The hard set is blurred by a Gaussian of ``soft_edge_px`` (σ, px) and rescaled so its
    inside is 1, which keeps the FSC free of the ringing a hard edge brings.
    """
    hard = (np.asarray(motion_angstrom) > threshold_angstrom).astype(np.float64)
    if not hard.any():
        return hard
    d = hard.shape[-1]
    f = np.fft.fftfreq(d)  # cycles/px
    f2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    soft = np.fft.ifftn(np.fft.fftn(hard) * np.exp(-2 * np.pi ** 2 * soft_edge_px ** 2 * f2)).real
    soft = np.clip(soft / max(soft[hard > 0].min(), 1e-6), 0.0, 1.0)
    return np.maximum(soft, hard)
