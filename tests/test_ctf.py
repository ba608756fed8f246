"""CTF: hand-computed values, analytic zero rings, astigmatism, grids and sign convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoformer.physics.ctf import apply_ctf, compute_ctf, ctf_images, electron_wavelength_angstrom
from cryoformer.physics.fourier import frequency_grid_2d

F64 = torch.float64


def f(*xy):
    return torch.tensor(xy, dtype=F64)


def test_wavelength_300kv():
    # λ = 12.2639 / sqrt(300e3 + 0.97845e-6 · 300e3²) = 12.2639 / sqrt(388060.5) Å
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.01968697, abs=1e-8)


def test_hand_computed_value():
    """dfU 20000, dfV 15000, angle 30°, 300 kV, Cs 2.7 mm, w 0.1, phase 20°, f = (0.03, 0.04)/Å.

    s² = 0.0025, α = atan2(0.04, 0.03) = 53.1301°, Δf = ½(35000 + 5000 cos(2·23.1301°))
    = 19228.461 Å, λ = 0.01968697 Å,
    γ = 2π(-½·19228.461·λ·0.0025 + ¼·2.7e7·λ³·0.0025²) - 0.349066 = -3.320169,
    ctf = √0.99·sin γ - 0.1·cos γ = 0.275148; with B = 50 Å²: × exp(-50·0.0025/4) = 0.266683.
    """
    args = (20000.0, 15000.0, 30.0, 300.0, 2.7, 0.1, 20.0)
    assert float(compute_ctf(f(0.03, 0.04), *args)) == pytest.approx(0.275148226, abs=1e-8)
    assert float(compute_ctf(f(0.03, 0.04), *args, bfactor=50.0)) == pytest.approx(0.266682806, abs=1e-8)
    # At zero frequency γ = -phase: ctf = √(1-w²)·sin(-φ) - w·cos(φ).
    phi = math.radians(20)
    assert float(compute_ctf(f(0.0, 0.0), *args)) == pytest.approx(-math.sqrt(0.99) * math.sin(phi) - 0.1 * math.cos(phi), abs=1e-12)


def zero_radii(df, volt_kv, cs_mm, w, s_max):
    """Radii (1/Å) where sin(γ - asin w) = 0, i.e. γ = asin(w) - kπ, for a round CTF.

    γ(u) = 2π(-½ Δf λ u + ¼ Cs λ³ u²) with u = s²: solve the quadratic for each k and keep the
    smaller root (the branch where γ still decreases)."""
    lam = electron_wavelength_angstrom(volt_kv)
    a, b = 0.25 * cs_mm * 1e7 * lam**3, -0.5 * df * lam
    alpha = math.asin(w)
    radii = []
    for k in range(1, 200):
        c = -(alpha - k * math.pi) / (2 * math.pi)
        disc = b * b - 4 * a * c
        if disc < 0:
            break
        u = (-b - math.sqrt(disc)) / (2 * a)
        if math.sqrt(u) > s_max:
            break
        radii.append(math.sqrt(u))
    return radii


@pytest.mark.parametrize("w", [0.0, 0.1])
def test_zeros_at_analytic_radii(w):
    df, kv, cs, s_max = 12000.0, 300.0, 2.7, 0.3
    radii = zero_radii(df, kv, cs, w, s_max)
    assert len(radii) > 10
    direction = f(math.cos(0.7), math.sin(0.7))
    r = torch.tensor(radii, dtype=F64)[:, None]
    at = compute_ctf(r * direction, df, df, 0.0, kv, cs, w)
    below = compute_ctf(r * (1 - 1e-4) * direction, df, df, 0.0, kv, cs, w)
    above = compute_ctf(r * (1 + 1e-4) * direction, df, df, 0.0, kv, cs, w)
    assert at.abs().max() < 1e-9
    assert (torch.sign(below) * torch.sign(above) < 0).all()
    # No other zeros: the number of sign changes along the ray equals the number of radii.
    s = torch.linspace(1e-4, s_max, 200001, dtype=F64)[:, None]
    line = compute_ctf(s * direction, df, df, 0.0, kv, cs, w)
    assert int((torch.sign(line[1:]) != torch.sign(line[:-1])).sum()) == len(radii)


def test_astigmatism_angle_rotates_pattern(rng):
    freqs = torch.tensor(rng.uniform(-0.2, 0.2, size=(500, 2)))
    params = dict(dfu=22000.0, dfv=14000.0, volt_kv=200.0, cs_mm=2.0, w=0.07)
    theta = math.radians(35.0)
    rot = torch.tensor([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]], dtype=F64)
    # CTF with angle θ at f equals CTF with angle 0 at f rotated by -θ.
    rotated = compute_ctf(freqs, dfang_deg=35.0, **params)
    reference = compute_ctf(freqs @ rot.T, dfang_deg=0.0, **params)
    np.testing.assert_allclose(rotated.numpy(), reference.numpy(), atol=1e-12)
    # Along the angle the defocus is dfU; perpendicular to it, dfV.
    for phi, df in [(theta, 22000.0), (theta + math.pi / 2, 14000.0)]:
        pts = torch.linspace(0.01, 0.2, 50, dtype=F64)[:, None] * f(math.cos(phi), math.sin(phi))
        np.testing.assert_allclose(
            compute_ctf(pts, dfang_deg=35.0, **params).numpy(),
            compute_ctf(pts, df, df, 0.0, 200.0, 2.0, 0.07).numpy(),
            atol=1e-12,
        )
    # Point symmetry: the CTF is real and even.
    np.testing.assert_allclose(compute_ctf(-freqs, dfang_deg=35.0, **params).numpy(), rotated.numpy(), atol=1e-12)


def ctf_row(D=64, apix=1.5, dfu=20000.0, dfv=10000.0, ang=0.0, kv=300.0, cs=2.7, w=0.1, phase=0.0):
    return np.array([[D, apix, dfu, dfv, ang, kv, cs, w, phase]], dtype=np.float64)


def test_ctf_images_grid_orientation_and_dc():
    D, apix = 64, 1.5
    img = ctf_images(torch.tensor(ctf_row(D, apix)))[0]  # [D, D]
    assert img.shape == (D, D)
    assert float(img[D // 2, D // 2]) == pytest.approx(-0.1, abs=1e-12)  # DC = -w
    k = torch.arange(-D // 2, D // 2, dtype=F64) / (D * apix)
    zero = torch.zeros_like(k)
    # Centre row varies in x, where (angle 0) the defocus is dfU; centre column uses dfV.
    along_x = compute_ctf(torch.stack([k, zero], -1), 20000.0, 20000.0, 0.0, 300.0, 2.7, 0.1)
    along_y = compute_ctf(torch.stack([zero, k], -1), 10000.0, 10000.0, 0.0, 300.0, 2.7, 0.1)
    np.testing.assert_allclose(img[D // 2].numpy(), along_x.numpy(), atol=1e-12)
    np.testing.assert_allclose(img[:, D // 2].numpy(), along_y.numpy(), atol=1e-12)


def test_ctf_images_batch_numpy_bfactor_and_inversion():
    rows = np.concatenate([ctf_row(dfu=15000.0, ang=10.0), ctf_row(dfu=25000.0, ang=70.0, phase=30.0)])
    out = ctf_images(rows)  # numpy input → float32
    assert out.shape == (2, 64, 64) and out.dtype == torch.float32
    for i in range(2):
        grid = frequency_grid_2d(64, rows[i, 1], dtype=F64)
        ref = compute_ctf(grid, *map(float, rows[i, 2:]))
        # float32 γ reaches ~150 rad at Nyquist, so its rounding shows at ~1e-5.
        np.testing.assert_allclose(out[i].numpy(), ref.numpy(), atol=1e-4)
    t = torch.tensor(rows)
    grid = frequency_grid_2d(64, 1.5, dtype=F64)
    env = torch.exp(-torch.tensor([40.0, 80.0], dtype=F64)[:, None, None] / 4 * (grid**2).sum(-1))
    with_b = ctf_images(t, bfactor=np.array([40.0, 80.0]))
    np.testing.assert_allclose(with_b.numpy(), (ctf_images(t) * env).numpy(), atol=1e-12)
    np.testing.assert_allclose(ctf_images(t, invert_contrast=True).numpy(), -ctf_images(t).numpy())


def test_ctf_images_resampled_box_keeps_physical_frequencies():
    full = ctf_images(torch.tensor(ctf_row(D=64, apix=1.5, ang=25.0)))
    small = ctf_images(torch.tensor(ctf_row(D=64, apix=1.5, ang=25.0)), D=32)
    # Downsampled to 32 px the pixel is 3 Å; the spectrum is the central 32×32 of the full one.
    np.testing.assert_allclose(small[0].numpy(), full[0, 16:48, 16:48].numpy(), atol=1e-12)
    with pytest.raises(ValueError):
        ctf_images(torch.tensor(np.concatenate([ctf_row(D=64), ctf_row(D=128)])))


def test_apply_ctf_identity_and_dark_protein(rng):
    imgs = torch.tensor(rng.normal(size=(3, 32, 32)))
    np.testing.assert_allclose(apply_ctf(imgs, torch.ones(3, 32, 32, dtype=F64)).numpy(), imgs.numpy(), atol=1e-12)
    # The DC term of the CTF is -w (no phase plate): a positive density becomes dark on
    # average, the cryoDRGN convention.
    blob = torch.zeros(1, 32, 32, dtype=F64)
    blob[0, 12:20, 12:20] = 1.0
    ctf = ctf_images(torch.tensor(ctf_row(D=32, apix=2.0)))
    out = apply_ctf(blob, ctf)
    assert float(out.sum()) == pytest.approx(-0.1 * float(blob.sum()), rel=1e-10)
    # And a real CTF keeps real images real (the imaginary part we drop is rounding only).
    from cryoformer.physics.fourier import fft2_center, ifft2_center

    assert ifft2_center(fft2_center(blob) * ctf).imag.abs().max() < 1e-12
