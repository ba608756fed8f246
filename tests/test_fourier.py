"""Centred FFTs, frequency grid, Fourier cropping and Fourier shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.physics.fourier import (
    fft2_center,
    fourier_crop,
    frequency_grid_2d,
    ifft2_center,
    shift_images,
)


def cosine_image(D, waves, dtype=torch.float64):
    """Σ a·cos(2π(kx·x + ky·y)/D + φ) on pixel coordinates i - D//2; waves = [(a, kx, ky, φ)]."""
    c = torch.arange(D, dtype=dtype) - D // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    img = torch.zeros(D, D, dtype=dtype)
    for a, kx, ky, phi in waves:
        img = img + a * torch.cos(2 * np.pi * (kx * x + ky * y) / D + phi)
    return img


def test_fft_dc_at_centre_and_round_trip(rng):
    D = 16
    x = torch.tensor(rng.normal(size=(3, D, D)))
    X = fft2_center(x)
    np.testing.assert_allclose(X[:, D // 2, D // 2].real.numpy(), x.sum((-1, -2)).numpy(), atol=1e-10)
    np.testing.assert_allclose(ifft2_center(X).real.numpy(), x.numpy(), atol=1e-12)
    # A delta at the centre pixel has a flat, real spectrum (origin at index D//2).
    delta = torch.zeros(D, D, dtype=torch.float64)
    delta[D // 2, D // 2] = 1
    np.testing.assert_allclose(fft2_center(delta).numpy(), np.ones((D, D)), atol=1e-12)


def test_fft_frequency_index_matches_grid():
    """A cosine of kx cycles per box along x peaks at column D//2 ± kx of the spectrum."""
    D = 32
    X = fft2_center(cosine_image(D, [(1.0, 5, 0, 0.0)])).abs()
    peaks = sorted(map(tuple, torch.nonzero(X > 1).tolist()))
    assert peaks == [(D // 2, D // 2 - 5), (D // 2, D // 2 + 5)]


def test_frequency_grid_2d():
    D, apix = 8, 1.5
    g = frequency_grid_2d(D, apix)
    assert g.shape == (D, D, 2) and g.dtype == torch.float32
    expected = np.arange(-D / 2, D / 2) / (D * apix)
    # [..., 0] varies along columns, [..., 1] along rows, as np.meshgrid(x, y) in cryoDRGN.
    fx, fy = np.meshgrid(expected, expected)
    np.testing.assert_allclose(g[..., 0].numpy(), fx, rtol=1e-6)
    np.testing.assert_allclose(g[..., 1].numpy(), fy, rtol=1e-6)
    assert g[D // 2, D // 2].abs().max() == 0


def test_fourier_crop_band_limited_equals_coarse_sampling():
    D, new_D = 64, 32
    # All frequencies (cycles per box) below the new Nyquist of 16.
    waves = [(1.0, 0, 0, 0.0), (0.7, 3, -2, 0.4), (0.5, -7, 5, 1.1), (0.3, 11, 9, -2.0), (0.2, 0, 15, 0.3)]
    fine = cosine_image(D, waves)
    coarse = cosine_image(new_D, waves)  # same function: fine pixel x ↔ coarse pixel x·new_D/D
    out = fourier_crop(fine[None], new_D)[0]
    assert out.shape == (new_D, new_D)
    np.testing.assert_allclose(out.numpy(), coarse.numpy(), atol=1e-10)


def test_fourier_crop_constant_and_batch_shapes():
    img = torch.full((2, 3, 16, 16), 2.5)
    out = fourier_crop(img, 8)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), 2.5, rtol=1e-6)
    assert torch.equal(fourier_crop(img, 16), img)
    with pytest.raises(ValueError):
        fourier_crop(img, 32)
    with pytest.raises(ValueError):
        fourier_crop(img, 7)


@pytest.mark.parametrize("s", [(3, 0), (0, -2), (5, 7), (-4, 1)])
def test_shift_integer_equals_roll(rng, s):
    img = torch.tensor(rng.normal(size=(1, 16, 16)))
    out = shift_images(img, torch.tensor([s], dtype=torch.float64))
    # out(p) = in(p + s): content moves by -s, i.e. np.roll by (-sy, -sx).
    np.testing.assert_allclose(out[0].numpy(), np.roll(img[0].numpy(), (-s[1], -s[0]), axis=(0, 1)), atol=1e-12)


def test_shift_moves_content_by_minus_s():
    D = 16
    img = torch.zeros(1, D, D, dtype=torch.float64)
    img[0, 8, 8] = 1.0  # y = 0, x = 0
    out = shift_images(img, torch.tensor([[2.0, -3.0]], dtype=torch.float64))
    # The peak lands at p = -s = (x=-2, y=3) → index [8+3, 8-2].
    assert tuple(torch.nonzero(out[0] > 0.5)[0].tolist()) == (11, 6)


def test_fractional_shifts_compose_and_match_band_limited_function():
    D = 32
    waves = [(1.0, 2, 1, 0.2), (0.5, -5, 3, 1.0), (0.25, 7, -9, -0.5)]
    img = cosine_image(D, waves)[None]
    a = torch.tensor([[0.3, -1.7]], dtype=torch.float64)
    b = torch.tensor([[2.45, 0.6]], dtype=torch.float64)
    twice = shift_images(shift_images(img, a), b)
    once = shift_images(img, a + b)
    np.testing.assert_allclose(twice.numpy(), once.numpy(), atol=1e-12)
    # For a band-limited function the shift is exact: out(x, y) = f(x + sx, y + sy).
    s = (a + b)[0].tolist()
    expected = cosine_image(D, [(amp, kx, ky, phi + 2 * np.pi * (kx * s[0] + ky * s[1]) / D) for amp, kx, ky, phi in waves])
    np.testing.assert_allclose(once[0].numpy(), expected.numpy(), atol=1e-12)
    # Shifting back undoes it.
    np.testing.assert_allclose(shift_images(once, -(a + b)).numpy(), img.numpy(), atol=1e-12)


def test_shift_batched_float32():
    imgs = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))
    shifts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 3.0], [0.0, 0.0]])
    out = shift_images(imgs, shifts)
    assert out.shape == imgs.shape and out.dtype == torch.float32
    for i in range(4):
        sx, sy = (int(v) for v in shifts[i])
        np.testing.assert_allclose(out[i].numpy(), np.roll(imgs[i].numpy(), (-sy, -sx), (0, 1)), atol=1e-5)
