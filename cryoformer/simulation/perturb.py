"""Perturbed poses, as the paper makes them for its pose-refinement experiment (§4.5).

Rotation noise is added to the rotation vector (axis-angle, rad) of each pose, component by
component, from ``N(0, σ²)``; shifts get independent ``U(−a, a)`` px per axis. With σ = 0.1 rad
the median geodesic error of the perturbed rotations is ≈ 0.15 rad (≈ 9°).
"""

from __future__ import annotations

import numpy as np
import torch

from cryoformer.metadata import Poses
from cryoformer.physics.rotations import axis_angle_to_matrix, matrix_to_axis_angle


def perturb_poses(poses: Poses, sigma_rad: float = 0.1, shift_px: float = 2.0,
                  seed: int = 0) -> Poses:
    """Noisy copy of ``poses``.

    Parameters
    ----------
    poses : Poses
        Rotations ``[N, 3, 3]`` and shifts ``[N, 2]`` (px at ``poses.box_size``).
    sigma_rad : float
        Standard deviation of the noise added to each rotation-vector component (rad).
    shift_px : float
        Half-width ``a`` of the uniform shift noise (px at ``poses.box_size``).
    seed : int

    Returns
    -------
    Poses
        Same box size; float32 arrays.
    """
    if sigma_rad < 0 or shift_px < 0:
        raise ValueError("sigma_rad and shift_px must be >= 0")
    rng = np.random.default_rng(seed)
    v = matrix_to_axis_angle(torch.from_numpy(np.asarray(poses.rotations)).double()).numpy()  # [N, 3]
    v_noisy = v + rng.normal(0.0, sigma_rad, size=v.shape)
    rot = axis_angle_to_matrix(torch.from_numpy(v_noisy)).numpy().astype(np.float32)  # [N, 3, 3]
    shifts = np.asarray(poses.shifts_px, dtype=np.float64)
    shifts = shifts + rng.uniform(-shift_px, shift_px, size=shifts.shape)
    return Poses(rot, shifts.astype(np.float32), poses.box_size)
