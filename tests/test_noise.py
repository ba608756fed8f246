"""Noise at a target SNR = var(clean signal inside the particle) / var(noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.physics.ctf import apply_ctf, ctf_images
from cryoformer.physics.noise import add_noise, particle_support_mask, signal_variance
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations


def blobby_volume(D, n_blobs=6, seed=0):
    """A small 'molecule': a few Gaussian blobs (σ 1.5–3 px) within radius D/4."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    V = torch.zeros(D, D, D)
    for _ in range(n_blobs):
        centre = (torch.rand(3, generator=g) - 0.5) * D / 2
        sigma = 1.5 + 1.5 * torch.rand(1, generator=g)
        V += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))
    return V


def test_particle_support_mask_threshold():
    imgs = torch.zeros(2, 4, 4)
    imgs[0, 1, 1] = 10.0
    imgs[0, 2, 2] = 0.05  # below 1 % of the stack maximum
    imgs[1, 3, 3] = -0.2  # |value| counts; above 1 % of 10
    m = particle_support_mask(imgs)
    assert m.dtype == torch.bool
    assert sorted(map(tuple, torch.nonzero(m).tolist())) == [(0, 1, 1), (1, 3, 3)]
    assert int(particle_support_mask(imgs, threshold_fraction=0.001).sum()) == 3


def test_signal_variance_is_pooled_population_variance():
    imgs = torch.tensor([[[1.0, 2.0], [9.0, 9.0]], [[3.0, 9.0], [4.0, 9.0]]])
    mask = imgs < 9
    # Masked values 1, 2, 3, 4: mean 2.5, population variance 1.25.
    assert signal_variance(imgs, mask) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        signal_variance(imgs, torch.zeros_like(mask))


def test_add_noise_hits_target_snr_on_realistic_stack():
    D, B, snr = 32, 96, 0.1
    V = blobby_volume(D)
    gen = torch.Generator().manual_seed(1)
    R = random_rotations(B, generator=gen)
    shifts = (torch.rand(B, 2, generator=gen) - 0.5) * 4
    clean = project(V, R, shifts)  # [B, D, D] CTF-free
    mask = particle_support_mask(clean)
    assert 0.1 < mask.float().mean() < 0.9  # the particle fills part of the box, not all
    params = np.zeros((B, 9), dtype=np.float32)
    params[:] = [D, 2.0, 15000, 14000, 30, 300, 2.7, 0.1, 0]
    params[:, 2] += torch.rand(B, generator=gen).numpy() * 10000  # varied defocus
    signal = apply_ctf(clean, ctf_images(params))  # [B, D, D]
    noisy, std = add_noise(signal, snr, signal_mask=mask, generator=gen)
    noise = noisy - signal
    measured = signal_variance(signal, mask) / float(noise.double().var())
    assert measured == pytest.approx(snr, rel=0.05)
    assert std == pytest.approx((signal_variance(signal, mask) / snr) ** 0.5)
    assert abs(float(noise.mean())) < 0.05 * std  # zero-mean white noise
    # The SNR refers to the particle, not the box: padding the box with empty background
    # leaves the noise level unchanged.
    padded = torch.nn.functional.pad(signal, (8, 8, 8, 8))
    pmask = torch.nn.functional.pad(mask, (8, 8, 8, 8))
    _, std_padded = add_noise(padded, snr, signal_mask=pmask, generator=torch.Generator().manual_seed(0))
    assert std_padded == pytest.approx(std, rel=1e-9)


def test_add_noise_reproducible_and_default_mask():
    imgs = project(blobby_volume(16, seed=3), random_rotations(4, generator=torch.Generator().manual_seed(0)))
    a, s1 = add_noise(imgs, 0.5, generator=torch.Generator().manual_seed(5))
    b, s2 = add_noise(imgs, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and s1 == s2
    # Without a mask the support is taken from the images themselves.
    assert s1 == pytest.approx((signal_variance(imgs, particle_support_mask(imgs)) / 0.5) ** 0.5)
    assert a.dtype == imgs.dtype and a.shape == imgs.shape
    with pytest.raises(ValueError):
        add_noise(imgs, 0.0)
