"""Real-space projector: analytic Gaussian projections, shifts, equivariance, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoformer.physics.projector import project, rotated_sample_points, to_normalized
from cryoformer.physics.rotations import axis_angle_to_matrix, random_rotations


def coords(D, dtype=torch.float64):
    return torch.arange(D, dtype=dtype) - D // 2


def gaussian_volume(D, centre, sigmas, axes=None, dtype=torch.float64):
    """exp(-½ (r-c)ᵀ Σ⁻¹ (r-c)) on voxel coordinates, volume indexed [z, y, x].

    Σ = A diag(σ²) Aᵀ with A = axes (identity if None)."""
    c = coords(D, dtype)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], -1) - torch.as_tensor(centre, dtype=dtype)  # [D, D, D, 3]
    A = torch.eye(3, dtype=dtype) if axes is None else axes
    cov = A @ torch.diag(torch.as_tensor(sigmas, dtype=dtype) ** 2) @ A.T
    q = torch.einsum("...i,ij,...j->...", r, torch.linalg.inv(cov), r)
    return torch.exp(-0.5 * q), cov


def analytic_projection(D, R, shifts, centre, cov):
    """∫ dz of the Gaussian seen at pose (R, s): mean Rc - s, covariance S = (RΣRᵀ)[:2, :2],
    amplitude sqrt(2π det Σ / det S)."""
    c = coords(D, R.dtype)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    out = []
    for Rb, s in zip(R, shifts):
        m = Rb @ torch.as_tensor(centre, dtype=R.dtype)
        S = (Rb @ cov @ Rb.T)[:2, :2]
        d = torch.stack([xx - (m[0] - s[0]), yy - (m[1] - s[1])], -1)  # [D, D, 2]
        q = torch.einsum("...i,ij,...j->...", d, torch.linalg.inv(S), d)
        amp = torch.sqrt(2 * math.pi * torch.linalg.det(cov) / torch.linalg.det(S))
        out.append(amp * torch.exp(-0.5 * q))
    return torch.stack(out)


def test_to_normalized_align_corners():
    D = 10
    idx = torch.tensor([0.0, D // 2, D - 1])
    n = to_normalized((idx - D // 2)[:, None].expand(3, 3), D)
    np.testing.assert_allclose(n[:, 0].numpy(), [-1.0, (D // 2) * 2 / (D - 1) - 1, 1.0], atol=1e-7)


def test_rotated_sample_points_definition():
    D = 6
    R = random_rotations(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.tensor([[1.5, -2.0], [0.0, 0.25]], dtype=torch.float64)
    pts = rotated_sample_points(R, D, s)
    assert pts.shape == (2, D, D, D, 3)
    b, iz, iy, ix = 1, 0, 4, 5
    p = torch.tensor([ix - D // 2, iy - D // 2, iz - D // 2], dtype=torch.float64)
    expected = R[b].T @ (p + torch.tensor([s[b, 0], s[b, 1], 0.0], dtype=torch.float64))
    np.testing.assert_allclose(pts[b, iz, iy, ix].numpy(), expected.numpy(), atol=1e-12)


def test_identity_pose_is_sum_over_z(rng):
    D = 16
    V = torch.tensor(rng.normal(size=(D, D, D)), dtype=torch.float32)
    P = project(V, torch.eye(3)[None], restrict_to_sphere=False)
    assert P.shape == (1, D, D) and P.dtype == torch.float32
    np.testing.assert_allclose(P[0].numpy(), V.sum(0).numpy(), atol=2e-5)
    # With the sphere: only voxels within radius D/2 of the centre count.
    c = coords(D, torch.float32)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    inside = (x**2 + y**2 + z**2 <= (D / 2) ** 2).float()
    np.testing.assert_allclose(project(V, torch.eye(3)[None])[0].numpy(), (V * inside).sum(0).numpy(), atol=2e-5)


def test_gaussian_blob_matches_analytic_projection():
    D = 40
    centre = [4.0, -3.0, 2.0]
    axes = axis_angle_to_matrix(torch.tensor([0.3, -0.6, 0.2], dtype=torch.float64))
    V, cov = gaussian_volume(D, centre, [3.0, 4.0, 3.5], axes)
    R = random_rotations(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.tensor(np.random.default_rng(0).uniform(-2, 2, (6, 2)))
    P = project(V, R, s)
    A = analytic_projection(D, R, s, centre, cov)
    # Trilinear interpolation blurs slightly (~1-2 % of the peak at σ ≈ 3 px).
    assert ((P - A).abs().amax((1, 2)) / A.amax((1, 2))).max() < 0.025
    # Geometry is exact: the centroid is where Rc - s says (interpolation is symmetric).
    c = coords(D)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    for img, ref in zip(P, A):
        for g in (xx, yy):
            assert abs(float((img * g).sum() / img.sum() - (ref * g).sum() / ref.sum())) < 0.02
    # Mass is preserved: Σ P = Σ V (all of the blob lies inside the sphere).
    np.testing.assert_allclose(P.sum((1, 2)).numpy(), float(V.sum()), rtol=2e-3)


def test_integer_shift_moves_image_by_minus_s():
    D = 24
    V, _ = gaussian_volume(D, [2.0, 1.0, -1.0], [2.0, 2.5, 2.0], dtype=torch.float32)
    R = random_rotations(3, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([[2.0, -3.0], [-1.0, 0.0], [0.0, 4.0]])
    shifted = project(V, R, s)
    plain = project(V, R)
    for i in range(3):
        sx, sy = int(s[i, 0]), int(s[i, 1])
        # Sample points of pixel p at shift s are those of pixel p + s unshifted, so
        # shifted[y, x] = plain[y + sy, x + sx] exactly wherever p + s is inside the box.
        ys = slice(max(0, -sy), min(D, D - sy))
        xs = slice(max(0, -sx), min(D, D - sx))
        ref = plain[i, ys.start + sy : ys.stop + sy, xs.start + sx : xs.stop + sx]
        np.testing.assert_allclose(shifted[i, ys, xs].numpy(), ref.numpy(), atol=1e-5)
        # The content moved by -s: the peak position differs by exactly -s.
        peak = lambda img: np.array(np.unravel_index(int(img.argmax()), img.shape))  # noqa: E731
        assert tuple(peak(shifted[i]) - peak(plain[i])) == (-sy, -sx)


def rot90_volume_about_z(V):
    """V'(r) = V(Qᵀ r) with Q = Rz(+90°): Q(x, y, z) = (-y, x, z), so V'(x, y, z) = V(y, -x, z).

    On indices (coordinate = index - c, c = D//2): V'[z, iy, ix] = V[z, 2c - ix, iy]
    (indices wrap; the content is zero near the edges)."""
    D = V.shape[-1]
    c = D // 2
    i = torch.arange(D)
    # Output [iy, ix] reads row (2c - ix) and column iy of each z-slice.
    return V[:, (2 * c - i[None, :]) % D, i[:, None]]


def test_in_plane_rotation_equivariance():
    D = 24
    V, _ = gaussian_volume(D, [3.0, -2.0, 1.0], [1.5, 3.0, 2.0], dtype=torch.float32)
    # Coordinate +D/2 is outside the box but the index arithmetic wraps it to index 0:
    # zero row and column 0 so the wrapped reads see the zeros they should.
    V[:, 0, :] = 0
    V[:, :, 0] = 0
    Vq = rot90_volume_about_z(V)
    Q = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # Its projection is the unrotated projection rotated: P'(x, y) = P(Qᵀ(x, y)) = P(y, -x).
    P = project(V, torch.eye(3)[None])[0]
    Pq = project(Vq, torch.eye(3)[None])[0]
    c = D // 2
    i = torch.arange(D)
    expected = P[(2 * c - i[None, :]) % D, i[:, None]]  # [iy, ix] = P[row 2c - ix, column iy]
    np.testing.assert_allclose(Pq.numpy(), expected.numpy(), atol=1e-4)
    assert (Pq - P).abs().max() > 0.1  # the blob is anisotropic, so the test is not vacuous
    # Generally project(V', R) = project(V, R Q) for any pose R.
    R = random_rotations(4, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(project(Vq, R).numpy(), project(V, R @ Q).numpy(), atol=1e-5)


def test_batched_volumes_and_chunking_agree():
    D = 16
    gen = torch.Generator().manual_seed(3)
    vols = torch.randn(5, D, D, D, generator=gen)
    R = random_rotations(5, generator=gen)
    s = torch.randn(5, 2, generator=gen)
    batched = project(vols, R, s, chunk_size=2)
    single = torch.cat([project(vols[i], R[i : i + 1], s[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(batched.numpy(), single.numpy(), atol=1e-5)
    shared = project(vols[0], R, s)
    np.testing.assert_allclose(project(vols[0], R, s, chunk_size=1).numpy(), shared.numpy(), atol=1e-5)
    with pytest.raises(ValueError):
        project(vols[:3], R)


def test_gradient_flows_to_volume():
    D = 12
    V = torch.randn(D, D, D, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    project(V, torch.eye(3)[None], restrict_to_sphere=False).sum().backward()
    # Every voxel is sampled exactly once at the identity pose: d(ΣP)/dV = 1.
    np.testing.assert_allclose(V.grad.numpy(), 1.0, atol=1e-5)


def test_gradient_wrt_rotation_matches_finite_differences():
    D = 16
    V, _ = gaussian_volume(D, [1.0, -2.0, 0.5], [2.0, 2.5, 1.5])
    R0 = random_rotations(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    W = torch.randn(2, D, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Vv = V.clone().requires_grad_(True)
    R = R0.clone().requires_grad_(True)
    loss = (project(Vv, R) * W).sum()
    loss.backward()
    assert Vv.grad.abs().sum() > 0
    delta = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        fd = ((project(V, R0 + eps * delta) * W).sum() - (project(V, R0 - eps * delta) * W).sum()) / (2 * eps)
    ad = (R.grad * delta).sum()
    assert abs(float(ad)) > 1e-3
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-4)


@pytest.mark.parametrize("per_image", [False, True])
def test_unshifted_sphere_sampling_equals_full_grid_path(per_image):
    """Without shifts, project() samples only the in-sphere points and sums them into their
    pixels; a zero shift takes the full-grid path (sample D³, zero outside the sphere). The
    two must agree, values and gradients (volume and rotations)."""
    D, B = 12, 3
    g = torch.Generator().manual_seed(5)
    vol = torch.randn((B, D, D, D) if per_image else (D, D, D), generator=g, dtype=torch.float64)
    rot = random_rotations(B, generator=g).double()
    weights = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    results = []
    for shifts in (None, torch.zeros(B, 2, dtype=torch.float64)):
        v = vol.clone().requires_grad_(True)
        r = rot.clone().requires_grad_(True)
        img = project(v, r, shifts, chunk_size=2)  # two chunks
        (img * weights).sum().backward()
        results.append((img.detach(), v.grad, r.grad))
    for fast, full in zip(*results):
        assert torch.allclose(fast, full, atol=1e-10)
    # A box-filling constant volume at the identity pose counts the kept points per pixel:
    # all D at the centre (z = -6…5, |z| ≤ 6), only z = 0 at (x, y) = (0, -6), none at a corner.
    ones = torch.ones(D, D, D, dtype=torch.float64)
    img = project(ones, torch.eye(3, dtype=torch.float64)[None])[0]
    assert img[D // 2, D // 2].item() == pytest.approx(D)
    assert img[0, D // 2].item() == pytest.approx(1.0)
    assert img[0, 0].item() == 0.0
