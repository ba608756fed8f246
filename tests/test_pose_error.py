"""Pose errors: known angles, hand-computed shifts, global alignment of ab-initio frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoformer.metrics.pose_error import (
    apply_global_alignment,
    global_alignment,
    pose_error_summary,
    rotation_errors,
    shift_errors,
)

FLIP = np.diag([1.0, 1.0, -1.0])


@pytest.mark.parametrize("theta", [1e-7, 1e-3, 0.3, 1.0, 2.5, np.pi - 1e-4])
def test_rotation_about_an_axis_by_theta_has_error_theta(theta):
    R_true = Rotation.random(50, random_state=7).as_matrix()
    axes = Rotation.random(50, random_state=8).apply([0.0, 0.0, 1.0])
    delta = Rotation.from_rotvec(axes * theta).as_matrix()
    # on either side: the geodesic distance is bi-invariant
    np.testing.assert_allclose(rotation_errors(delta @ R_true, R_true), theta, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(rotation_errors(R_true @ delta, R_true), theta, rtol=1e-6, atol=1e-12)


def test_identical_rotations_and_torch_input():
    R = Rotation.random(10, random_state=1).as_matrix()
    assert np.all(rotation_errors(R, R) < 1e-7)
    t = torch.from_numpy(R).float()
    assert np.all(rotation_errors(t, t) < 1e-3)  # float32 round-off


def test_shift_errors_by_hand():
    pred = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    true = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 5.0]])
    np.testing.assert_allclose(shift_errors(pred, true), [5.0, 0.0, 5.0])


def test_summary_numbers_by_hand():
    angles = np.array([0.1, 0.2, 0.4, 0.8])
    R_true = np.repeat(np.eye(3)[None], 4, axis=0)
    R_pred = Rotation.from_rotvec(angles[:, None] * np.array([1.0, 0.0, 0.0])).as_matrix()
    s_true = np.zeros((4, 2))
    s_pred = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [6.0, 8.0]])  # 1, 2, 5, 10 px
    out = pose_error_summary(R_pred, R_true, s_pred, s_true, box_size=64)
    assert out["n"] == 4
    assert out["rotation_median_rad"] == pytest.approx(0.3)
    assert out["rotation_mean_square_rad2"] == pytest.approx(np.mean(angles ** 2))
    assert out["rotation_mean_rad"] == pytest.approx(0.375)
    assert out["frobenius_sq_mean"] == pytest.approx(np.mean(np.sum((R_pred - R_true) ** 2, axis=(1, 2))))
    assert out["shift_median_px"] == pytest.approx(3.5)
    assert out["shift_mean_square_px2"] == pytest.approx((1 + 4 + 25 + 100) / 4)
    assert out["shift_mean_px"] == pytest.approx(4.5)
    assert out["shift_median_fraction"] == pytest.approx(3.5 / 64)
    assert out["global_rotation"] is None and out["flipped"] is False
    assert "shift_median_px" not in pose_error_summary(R_pred, R_true)


def _noisy(R: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return Rotation.from_rotvec(rng.normal(scale=sigma, size=(len(R), 3))).as_matrix() @ R


def test_global_alignment_recovers_frame_rotation_despite_outliers():
    n = 400
    R_true = Rotation.random(n, random_state=3).as_matrix()
    G = Rotation.from_euler("zyz", [40, 70, -20], degrees=True).as_matrix()
    R_pred = _noisy(R_true @ G, 0.02, seed=4)
    R_pred[:80] = Rotation.random(80, random_state=5).as_matrix()  # 20 % garbage poses
    G_est, flipped = global_alignment(R_pred, R_true)
    assert not flipped
    assert rotation_errors(G_est[None], G[None])[0] < 0.01
    aligned = rotation_errors(apply_global_alignment(R_pred, G_est), R_true)
    assert np.median(aligned[80:]) < 0.05
    raw = pose_error_summary(R_pred, R_true)
    fixed = pose_error_summary(R_pred, R_true, align=True)
    assert raw["rotation_median_rad"] > 0.5 and fixed["rotation_median_rad"] < 0.05


def test_global_alignment_detects_the_mirror_hand():
    n = 200
    R_true = Rotation.random(n, random_state=11).as_matrix()
    G = Rotation.from_euler("xyz", [10, -35, 80], degrees=True).as_matrix()
    R_pred = FLIP @ R_true @ G @ FLIP  # poses of the mirror-image reconstruction
    out = pose_error_summary(R_pred, R_true, align=True)
    assert out["flipped"] is True and out["rotation_median_rad"] < 1e-6
    assert pose_error_summary(R_pred, R_true, align=True, allow_flip=False)["rotation_median_rad"] > 0.1
