"""Rotation conventions: RELION/cryoDRGN/SciPy agreement, round trips, Haar sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation

from cryoformer.physics.rotations import (
    axis_angle_to_matrix,
    euler_relion_to_matrix,
    geodesic_distance,
    matrix_to_axis_angle,
    matrix_to_euler_relion,
    matrix_to_quaternion,
    matrix_to_sixd,
    quaternion_to_matrix,
    random_rotations,
    sixd_to_matrix,
)


@pytest.fixture
def eulers(rng):
    """[200, 3] RELION angles: rot, psi ∈ [-180, 180), tilt ∈ (0, 180)."""
    e = rng.uniform(-180, 180, size=(200, 3))
    e[:, 1] = rng.uniform(1, 179, size=200)
    return e


@pytest.fixture
def rotations():
    return random_rotations(500, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def relion_elementwise(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out element by element (degrees in)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def cryodrgn_style(rot, tilt, psi):
    """cryoDRGN's R_from_relion construction: Rz(psi)·Ry(-tilt)·Rz(rot) (active elementary
    rotations), then conjugated by diag(1, -1, 1) (the sign flips of elements 01, 10, 12, 21)."""
    a, b, g = np.deg2rad([rot, tilt, psi])

    def rz(t):
        return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])

    ry_minus = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
    flip = np.diag([1.0, -1.0, 1.0])
    return flip @ rz(g) @ ry_minus @ rz(a) @ flip


def test_euler_matches_relion_elementwise_and_cryodrgn(eulers):
    R = euler_relion_to_matrix(torch.tensor(eulers)).numpy()
    for e, r in zip(eulers[:50], R[:50]):
        np.testing.assert_allclose(r, relion_elementwise(*e), atol=1e-12)
        np.testing.assert_allclose(r, cryodrgn_style(*e), atol=1e-12)


def test_euler_known_values():
    # rot = 90 alone: A = Rz(90)ᵀ maps the x axis to -y.
    A = euler_relion_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(A, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt = 90 alone: A = Ry(90)ᵀ, third row = (sin tilt, 0, cos tilt).
    A = euler_relion_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(A, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)


def test_scipy_relation(eulers):
    """RELION matrix = SciPy intrinsic 'ZYZ' of (rot, tilt, psi), transposed; equivalently
    extrinsic 'zyz' of (-rot, -tilt, -psi)."""
    R = euler_relion_to_matrix(torch.tensor(eulers)).numpy()
    ref = Rotation.from_euler("ZYZ", eulers, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(R, ref, atol=1e-12)
    ref2 = Rotation.from_euler("zyz", -eulers, degrees=True).as_matrix()
    np.testing.assert_allclose(R, ref2, atol=1e-12)
    # ... and not the untransposed matrix (the relation is not vacuous).
    plain = Rotation.from_euler("ZYZ", eulers, degrees=True).as_matrix()
    assert np.abs(R - plain).max() > 0.5


def test_euler_round_trip(eulers):
    e = torch.tensor(eulers)
    back = matrix_to_euler_relion(euler_relion_to_matrix(e))
    # Angles themselves come back (tilt in (0, 180), so the decomposition is unique).
    diff = (back - e + 180) % 360 - 180
    assert diff.abs().max() < 1e-9
    # And SciPy agrees on the angles of the transposed matrix.
    R = euler_relion_to_matrix(e).numpy()
    sc = Rotation.from_matrix(R.transpose(0, 2, 1)).as_euler("ZYZ", degrees=True)
    assert (((back.numpy() - sc) + 180) % 360 - 180).__abs__().max() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euler_round_trip_random_matrices(rotations, dtype):
    R = rotations.to(dtype)
    back = euler_relion_to_matrix(matrix_to_euler_relion(R))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (back - R).abs().max() < tol
    assert back.dtype == dtype


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-6, 180.0 - 1e-6])
def test_euler_gimbal_lock(tilt):
    e = torch.tensor([[35.0, tilt, -80.0], [-120.0, tilt, 10.0]], dtype=torch.float64)
    R = euler_relion_to_matrix(e)
    back = matrix_to_euler_relion(R)
    assert torch.isfinite(back).all()
    np.testing.assert_allclose(euler_relion_to_matrix(back).numpy(), R.numpy(), atol=1e-7)
    # At exact lock RELION's choice: rot = 0.
    if tilt in (0.0, 180.0):
        assert back[:, 0].abs().max() < 1e-12
        assert (back[:, 1] - tilt).abs().max() < 1e-12


def test_euler_to_matrix_gradients_finite_at_lock():
    R = euler_relion_to_matrix(torch.tensor([[10.0, 0.0, 20.0]], dtype=torch.float64)).requires_grad_(True)
    matrix_to_euler_relion(R).sum().backward()
    assert torch.isfinite(R.grad).all()


def test_quaternion_matches_scipy(rotations):
    q = matrix_to_quaternion(rotations)  # (w, x, y, z)
    assert (q[:, 0] >= 0).all()
    np.testing.assert_allclose(torch.linalg.vector_norm(q, dim=-1).numpy(), 1.0, atol=1e-12)
    ref = Rotation.from_matrix(rotations.numpy()).as_quat()  # (x, y, z, w)
    ref = ref * np.sign(ref[:, 3:4])
    np.testing.assert_allclose(q.numpy(), np.concatenate([ref[:, 3:], ref[:, :3]], 1), atol=1e-10)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), rotations.numpy(), atol=1e-12)
    # Unnormalised quaternions give the same rotation.
    np.testing.assert_allclose(quaternion_to_matrix(3.0 * q).numpy(), rotations.numpy(), atol=1e-12)


def test_quaternion_special_cases():
    # 180° rotations (w = 0) exercise the non-w branches of Shepperd's method.
    for axis in np.eye(3):
        R = torch.tensor(Rotation.from_rotvec(math.pi * axis).as_matrix())
        q = matrix_to_quaternion(R)
        np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), R.numpy(), atol=1e-12)


def test_axis_angle_matches_scipy(rotations):
    v = matrix_to_axis_angle(rotations)
    ref = Rotation.from_matrix(rotations.numpy()).as_rotvec()
    np.testing.assert_allclose(v.numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(axis_angle_to_matrix(v).numpy(), rotations.numpy(), atol=1e-12)
    # A known one: 90° about z maps x to y.
    Rz = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    np.testing.assert_allclose(Rz.numpy() @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_axis_angle_near_zero_value_and_gradient():
    for scale in [0.0, 1e-9, 1e-4, 1e-2]:
        v = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64) * scale
        v.requires_grad_(True)
        R = axis_angle_to_matrix(v)
        ref = Rotation.from_rotvec(v.detach().numpy()).as_matrix()
        np.testing.assert_allclose(R.detach().numpy(), ref, atol=1e-15)
        R.sum().backward()
        assert torch.isfinite(v.grad).all()
    # Near the identity the inverse map is finite and accurate too.
    small = torch.tensor([[1e-8, -2e-8, 3e-8]], dtype=torch.float64)
    np.testing.assert_allclose(matrix_to_axis_angle(axis_angle_to_matrix(small)).numpy(), small.numpy(), rtol=1e-6)
    assert matrix_to_axis_angle(torch.eye(3)).abs().max() == 0


def test_sixd_round_trip_and_gram_schmidt(rotations, rng):
    np.testing.assert_allclose(sixd_to_matrix(matrix_to_sixd(rotations)).numpy(), rotations.numpy(), atol=1e-12)
    assert matrix_to_sixd(rotations).shape == (500, 6)
    # Arbitrary (non-orthonormal) inputs give rotations whose first row is a1/|a1| and whose
    # second row lies in the plane of a1, a2 on a2's side.
    x = torch.tensor(rng.normal(size=(100, 6)))
    R = sixd_to_matrix(x)
    eye = torch.eye(3, dtype=R.dtype)
    assert (R @ R.transpose(-1, -2) - eye).abs().max() < 1e-12
    assert (torch.linalg.det(R) - 1).abs().max() < 1e-12
    a1, a2 = x[:, :3], x[:, 3:]
    np.testing.assert_allclose(R[:, 0].numpy(), (a1 / a1.norm(dim=-1, keepdim=True)).numpy(), atol=1e-12)
    assert ((R[:, 1] * a2).sum(-1) > 0).all()
    assert (torch.linalg.det(torch.stack([a1, a2, R[:, 1]], 1)).abs() < 1e-10).all()


def test_random_rotations_are_rotations_and_reproducible():
    R = random_rotations(64, generator=torch.Generator().manual_seed(3))
    assert R.shape == (64, 3, 3) and R.dtype == torch.float32
    assert (R @ R.transpose(-1, -2) - torch.eye(3)).abs().max() < 1e-5
    assert (torch.linalg.det(R) - 1).abs().max() < 1e-5
    R2 = random_rotations(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(R, R2)


def test_random_rotations_haar():
    n = 4000
    R = random_rotations(n, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    # E[R] = 0 under the Haar measure; each entry has variance 1/3, so its sample mean has
    # standard deviation ~0.009 here.
    assert R.mean(0).abs().max() < 0.05
    # Rotation angles follow the density (1 - cos θ)/π on [0, π], CDF (θ - sin θ)/π.
    theta = geodesic_distance(torch.eye(3, dtype=R.dtype), R).numpy()

    def cdf(t):
        return (t - np.sin(t)) / np.pi

    assert stats.kstest(theta, cdf).pvalue > 0.01
    # The test has power: uniformly drawn Euler angles are not Haar-distributed.
    rng = np.random.default_rng(0)
    bad = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], 1)
    theta_bad = geodesic_distance(torch.eye(3, dtype=R.dtype), euler_relion_to_matrix(torch.tensor(bad))).numpy()
    assert stats.kstest(theta_bad, cdf).pvalue < 1e-6


def test_geodesic_distance_known(rotations):
    axis = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3
    for angle in [0.0, 1e-6, 0.3, 2.0, math.pi]:
        Q = axis_angle_to_matrix(axis * angle)
        d = geodesic_distance(rotations, rotations @ Q)  # R1ᵀR2 = Q
        np.testing.assert_allclose(d.numpy(), angle, atol=1e-9)
    # Symmetric, and float32 resolves small angles (acos alone would return ~3e-4 for 1e-5).
    R1 = rotations[:10].float()
    R2 = R1 @ axis_angle_to_matrix(axis.float() * 1e-5)
    assert torch.allclose(geodesic_distance(R1, R2), geodesic_distance(R2, R1), atol=1e-7)
    assert (geodesic_distance(R1, R2) - 1e-5).abs().max() < 2e-6


def test_geodesic_distance_gradient_finite():
    R = random_rotations(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for R2 in (R.clone(), R @ axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi], dtype=torch.float64))):
        R1 = R.clone().requires_grad_(True)
        geodesic_distance(R1, R2).sum().backward()
        assert torch.isfinite(R1.grad).all()
