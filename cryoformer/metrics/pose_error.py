"""Pose errors against ground truth (docs/conventions.md, "Metrics", paper Table 2).

Rotation error: the geodesic angle (rad) between predicted and true rotation,
``θ = arccos((tr(R̂ Rᵀ) − 1)/2)``, computed with ``atan2`` so small angles stay accurate.
Shift error: Euclidean distance (px) between predicted and true in-plane shifts.

Global alignment (for ab-initio results)
----------------------------------------
A reconstruction without reference poses lives in an arbitrary frame: if the map is the truth
rotated, ``V̂(y) = V(G y)``, every image is explained by ``R̂_i = R_i G`` (with the projection of
docs/conventions.md). If it is also the mirror image, ``R̂_i = F R_i G F`` with ``F = diag(1, 1, −1)`` (flipping
the projection axis leaves projections unchanged). :func:`global_alignment` estimates ``G`` (and
whether to flip) before the errors are measured; shifts are unaffected by either.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

_FLIP = np.diag([1.0, 1.0, -1.0])


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").numpy()
    return np.asarray(x, dtype=np.float64)


def _check_rotations(R_pred: np.ndarray, R_true: np.ndarray) -> None:
    if R_pred.shape != R_true.shape or R_pred.shape[-2:] != (3, 3):
        raise ValueError(f"need two [N, 3, 3] stacks of one shape, got {R_pred.shape}, {R_true.shape}")


def rotation_errors(R_pred, R_true) -> np.ndarray:
    """Geodesic angle (rad) between corresponding rotations.

    Parameters
    ----------
    R_pred, R_true : array-like or torch.Tensor
        ``[N, 3, 3]`` rotation matrices.

    Returns
    -------
    np.ndarray
        ``[N]`` float64 angles in ``[0, π]``.
    """
    a, b = _as_numpy(R_pred), _as_numpy(R_true)
    _check_rotations(a, b)
    M = a @ np.swapaxes(b, -1, -2)  # [N, 3, 3] relative rotation R̂ Rᵀ
    cos = 0.5 * (np.trace(M, axis1=-2, axis2=-1) - 1.0)
    # ‖axis · sin θ‖ from the antisymmetric part: accurate where arccos is not (θ ≈ 0).
    vee = np.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0],
                    M[..., 1, 0] - M[..., 0, 1]], axis=-1)
    sin = 0.5 * np.linalg.norm(vee, axis=-1)
    return np.arctan2(sin, cos)


def shift_errors(s_pred, s_true) -> np.ndarray:
    """Euclidean distance (px) between corresponding shifts ``[N, 2]`` → ``[N]``."""
    a, b = _as_numpy(s_pred), _as_numpy(s_true)
    if a.shape != b.shape or a.shape[-1] != 2:
        raise ValueError(f"need two [N, 2] shift arrays of one shape, got {a.shape}, {b.shape}")
    return np.linalg.norm(a - b, axis=-1)


def _nearest_rotation(M: np.ndarray) -> np.ndarray:
    """The rotation maximising ``tr(Gᵀ M)`` (orthogonal Procrustes with det = +1)."""
    U, _, Vt = np.linalg.svd(M)
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def _fit_right_rotation(R_pred: np.ndarray, R_true: np.ndarray, trim: float, n_candidates: int,
                        n_iter: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Robust ``G`` with ``R_pred ≈ R_true G``; returns ``(G, errors [N])``."""
    N = len(R_true)
    # Candidates from single particles (each alone determines G): robust to many outliers.
    picks = rng.choice(N, size=min(n_candidates, N), replace=False)
    best, best_med = np.eye(3), np.inf
    for i in picks:
        G = R_true[i].T @ R_pred[i]
        med = np.median(rotation_errors(R_pred, R_true @ G))
        if med < best_med:
            best, best_med = G, med
    G = best
    # Then least squares on the best-fitting fraction, a few times.
    for _ in range(n_iter):
        err = rotation_errors(R_pred, R_true @ G)
        inliers = err <= np.quantile(err, trim)
        M = np.einsum("nji,njk->ik", R_true[inliers], R_pred[inliers])  # Σ R_trueᵀ R_pred
        G = _nearest_rotation(M)
    return G, rotation_errors(R_pred, R_true @ G)


def global_alignment(R_pred, R_true, allow_flip: bool = True, trim: float = 0.5,
                     n_candidates: int = 64, n_iter: int = 5, seed: int = 0) -> Tuple[np.ndarray, bool]:
    """The global rotation (and handedness) best relating predicted to true rotations.

    Parameters
    ----------
    R_pred, R_true : array-like
        ``[N, 3, 3]``.
    allow_flip : bool
        Also try the mirror hypothesis ``R̂_i = F R_i G F`` and keep it if its median error is
        lower.
    trim : float
        Fraction of best-fitting particles used in the least-squares refinement.
    n_candidates, n_iter, seed
        Particles tried as starting points (each gives ``G = R_iᵀ R̂_i``), refinement rounds, and
        the seed choosing the candidates.

    Returns
    -------
    G : np.ndarray
        ``[3, 3]`` rotation with ``R̂_i ≈ R_i G`` (or ``F R_i G F`` when flipped).
    flipped : bool
    """
    a, b = _as_numpy(R_pred), _as_numpy(R_true)
    _check_rotations(a, b)
    rng = np.random.default_rng(seed)
    G, err = _fit_right_rotation(a, b, trim, n_candidates, n_iter, rng)
    if allow_flip:
        # F R̂ F = R G under the mirror hypothesis: the same fit on the conjugated predictions.
        Gf, err_f = _fit_right_rotation(_FLIP @ a @ _FLIP, b, trim, n_candidates, n_iter, rng)
        if np.median(err_f) < np.median(err):
            return Gf, True
    return G, False


def apply_global_alignment(R_pred, G: np.ndarray, flipped: bool = False) -> np.ndarray:
    """Predicted rotations ``[N, 3, 3]`` brought into the true frame: ``(F) R̂ (F) Gᵀ``."""
    a = _as_numpy(R_pred)
    if flipped:
        a = _FLIP @ a @ _FLIP
    return a @ np.asarray(G, dtype=np.float64).T


def pose_error_summary(R_pred, R_true, s_pred=None, s_true=None, align: bool = False,
                       allow_flip: bool = True, box_size: Optional[int] = None) -> dict:
    """Median and mean-square pose errors (docs/conventions.md, "Metrics", paper Table 2).

    Parameters
    ----------
    R_pred, R_true : array-like
        ``[N, 3, 3]`` predicted and true rotations.
    s_pred, s_true : array-like, optional
        ``[N, 2]`` predicted and true shifts (px); shift entries are omitted without them.
    align : bool
        Estimate and remove a global rotation (and, with ``allow_flip``, a handedness flip)
        first, as needed for ab-initio results (:func:`global_alignment`). Off for refinement
        from given poses, whose frame is the truth's.
    box_size : int, optional
        Also report shift errors as a fraction of the box side (the paper's appendix does).

    Returns
    -------
    dict
        ``n``; ``rotation_median_rad``, ``rotation_mean_square_rad2`` (mean of θ²),
        ``rotation_mean_rad``, ``rotation_median_deg``; ``frobenius_sq_median``,
        ``frobenius_sq_mean`` (``‖R̂ − R‖_F² = 8 sin²(θ/2)``, the cryoDRGN-style number);
        ``shift_median_px``, ``shift_mean_square_px2``, ``shift_mean_px`` (and
        ``shift_median_fraction``, ``shift_mean_fraction`` with ``box_size``); and
        ``global_rotation`` (``[3, 3]`` list or None) and ``flipped``.
    """
    R_pred, R_true = _as_numpy(R_pred), _as_numpy(R_true)
    G, flipped = None, False
    if align:
        G, flipped = global_alignment(R_pred, R_true, allow_flip=allow_flip)
        R_pred = apply_global_alignment(R_pred, G, flipped)
    theta = rotation_errors(R_pred, R_true)  # [N] rad
    frob = 8.0 * np.sin(0.5 * theta) ** 2
    out = {
        "n": int(theta.size),
        "rotation_median_rad": float(np.median(theta)),
        "rotation_mean_square_rad2": float(np.mean(theta ** 2)),
        "rotation_mean_rad": float(np.mean(theta)),
        "rotation_median_deg": float(np.degrees(np.median(theta))),
        "frobenius_sq_median": float(np.median(frob)),
        "frobenius_sq_mean": float(np.mean(frob)),
        "global_rotation": None if G is None else G.tolist(),
        "flipped": bool(flipped),
    }
    if s_pred is not None and s_true is not None:
        d = shift_errors(s_pred, s_true)  # [N] px
        out.update(shift_median_px=float(np.median(d)), shift_mean_square_px2=float(np.mean(d ** 2)),
                   shift_mean_px=float(np.mean(d)))
        if box_size:
            out.update(shift_median_fraction=float(np.median(d) / box_size),
                       shift_mean_fraction=float(np.mean(d) / box_size))
    return out
