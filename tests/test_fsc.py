"""FSC, resolution, AU-FSC and masks against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.metrics.fsc import FscResult, au_fsc, fsc, plot_fsc, resolution_at, soft_spherical_mask


def _fsc_full_spectrum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force reference: full complex FFT, explicit loop over shells."""
    D = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(D, 1.0 / D)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    out = []
    for s in range(D // 2 + 1):
        sel = np.rint(r) == s
        num = np.sum(fa[sel] * np.conj(fb[sel])).real
        out.append(num / np.sqrt(np.sum(np.abs(fa[sel]) ** 2) * np.sum(np.abs(fb[sel]) ** 2)))
    return np.array(out)


def _lowpass(vol: np.ndarray, radius_fourier_px: float) -> np.ndarray:
    """Hard spherical low-pass: keep frequencies with |k| <= radius (Fourier pixels)."""
    D = vol.shape[0]
    k = np.fft.fftfreq(D, 1.0 / D)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.fft.ifftn(np.fft.fftn(vol) * (r <= radius_fourier_px)).real


def test_identical_volumes_correlate_perfectly_in_every_shell(rng):
    vol = rng.normal(size=(32, 32, 32)).astype(np.float32)
    freq, curve = fsc(vol, vol)
    assert freq.shape == curve.shape == (17,)
    np.testing.assert_allclose(freq, np.arange(17) / 32)
    np.testing.assert_allclose(curve, 1.0, atol=1e-12)
    # torch input gives the same answer
    _, curve_t = fsc(torch.from_numpy(vol), torch.from_numpy(vol))
    np.testing.assert_allclose(curve_t, curve)


def test_half_spectrum_weighting_equals_the_full_spectrum_sum(rng):
    a = rng.normal(size=(16, 16, 16))
    b = a + rng.normal(size=a.shape) * 2.0
    np.testing.assert_allclose(fsc(a, b)[1], _fsc_full_spectrum(a, b), atol=1e-12)


def test_independent_noise_volumes_do_not_correlate(rng):
    a = rng.normal(size=(48, 48, 48))
    b = rng.normal(size=(48, 48, 48))
    _, curve = fsc(a, b)
    beyond = curve[3:]
    assert abs(beyond.mean()) < 0.1
    assert np.abs(beyond).max() < 0.3  # ~1/sqrt(voxels per shell)


def test_lowpass_cutoff_gives_the_resolution_of_the_cutoff(rng):
    D, apix = 64, 2.0
    vol = rng.normal(size=(D, D, D))
    f_cut = 0.25  # cycles/px → 1/f_cut · apix = 8 Å
    _, curve = fsc(vol, _lowpass(vol, f_cut * D))
    freq = np.arange(D // 2 + 1) / D
    assert np.all(curve[: int(f_cut * D)] > 0.99) and np.all(curve[int(f_cut * D) + 1:] < 0.01)
    assert resolution_at(freq, curve, 0.5, apix) == pytest.approx(apix / f_cut, rel=0.03)
    assert resolution_at(freq, curve, 0.143, apix) == pytest.approx(apix / f_cut, rel=0.05)


def test_resolution_at_interpolates_and_reports_nyquist_when_never_below():
    freq = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    curve = np.array([1.0, 0.9, 0.7, 0.3, 0.1, 0.0])
    # 0.5 is crossed halfway between 0.2 (0.7) and 0.3 (0.3): f = 0.25 → 1.5 / 0.25 = 6 Å.
    assert resolution_at(freq, curve, 0.5, 1.5) == pytest.approx(6.0)
    # first crossing counts, even if the curve comes back up
    bumpy = np.array([1.0, 0.4, 0.8, 0.8, 0.8, 0.8])
    assert resolution_at(freq, bumpy, 0.5, 1.0) == pytest.approx(1.0 / (0.1 * 5 / 6))
    assert resolution_at(freq, np.ones(6), 0.143, 1.5) == pytest.approx(3.0)  # Nyquist 2·apix


def test_au_fsc_of_perfect_and_null_curves():
    freq = np.arange(33) / 64
    assert au_fsc(freq, np.ones(33)) == pytest.approx(0.5)
    assert au_fsc(freq, np.zeros(33)) == 0.0
    assert au_fsc(freq, -np.ones(33)) == pytest.approx(0.5)  # |FSC|
    assert au_fsc(freq, -np.ones(33), absolute=False) == pytest.approx(-0.5)
    # CryoBench's variant (signed, shells up to (D/2 − 1)/D): perfect = 0.5 − 1/D
    assert au_fsc(freq, np.ones(33), absolute=False, max_freq=0.5 - 1 / 64) == pytest.approx(0.5 - 1 / 64)


def test_soft_spherical_mask_profile_and_masked_fsc(rng):
    D = 32
    m = soft_spherical_mask(D, radius_px=8, edge_px=4)
    c = D // 2
    assert m.dtype == np.float32 and m[c, c, c] == 1.0
    assert m[c, c, c + 8] == 1.0 and m[c, c, c + 12] == 0.0 and m[0, 0, 0] == 0.0
    assert m[c, c, c + 10] == pytest.approx(0.5)
    profile = m[c, c, c:]
    assert np.all(np.diff(profile) <= 0)
    hard = soft_spherical_mask(D, 8, 0)
    assert set(np.unique(hard)) == {0.0, 1.0}
    vol = rng.normal(size=(D, D, D))
    np.testing.assert_allclose(fsc(vol, 3.0 * vol, mask=m)[1], 1.0, atol=1e-12)  # scale-invariant


def test_fsc_result_text_roundtrip_and_plot(tmp_path, rng):
    D, apix = 32, 1.5
    vol = rng.normal(size=(D, D, D))
    res = FscResult.compute(vol, _lowpass(vol, 8), apix, label="lowpass")
    assert res.resolution(0.5) == pytest.approx(apix * D / 8, rel=0.05)
    assert 0.0 < res.au_fsc < 0.5
    summary = res.summary()
    assert summary["label"] == "lowpass" and summary["resolution_fsc0.5_angstrom"] == res.resolution(0.5)
    text = res.to_text(tmp_path / "fsc.txt")
    assert text.splitlines()[0] == "pixres fsc" and len(text.splitlines()) == D // 2 + 2
    back = FscResult.from_text(tmp_path / "fsc.txt", apix)
    np.testing.assert_allclose(back.curve, res.curve, atol=1e-6)
    np.testing.assert_allclose(back.freq_per_angstrom, res.freq_per_angstrom, atol=1e-6)
    out = tmp_path / "fsc.png"
    plot_fsc([res, FscResult.compute(vol, vol, apix, label="self")], out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 4)))
