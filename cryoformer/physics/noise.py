"""Noise at a prescribed signal-to-noise ratio (docs/conventions.md).

Definition used throughout cryoformer (as in the paper's simulations)::

    SNR = var(clean signal inside the particle) / var(noise)

* *clean signal* is the noise-free image as recorded (projection, shifted, CTF applied when
  the data have a CTF);
* *inside the particle* is a support mask: the pixels where the CTF-free projection is
  non-negligible (:func:`particle_support_mask`), pooled over the whole stack;
* the noise is white Gaussian with one standard deviation for the whole stack.

Because the variance is taken inside the particle only, the SNR does not depend on how much
empty background the box holds.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["particle_support_mask", "signal_variance", "add_noise"]


def particle_support_mask(clean_projections: torch.Tensor, threshold_fraction: float = 0.01) -> torch.Tensor:
    """Pixels that belong to the particle.

    Parameters
    ----------
    clean_projections : torch.Tensor
        ``[B, D, D]`` CTF-free projections (no noise).
    threshold_fraction : float
        A pixel is inside when ``|value| > threshold_fraction × max |value|`` with the maximum
        taken over the whole stack (one threshold for all images, so a view in which the
        particle looks thin is not given a lower bar).

    Returns
    -------
    torch.Tensor
        ``[B, D, D]`` bool mask.
    """
    a = clean_projections.detach().abs()
    return a > threshold_fraction * a.max()


def signal_variance(images: torch.Tensor, mask: torch.Tensor) -> float:
    """Variance of the pixels of ``images`` selected by ``mask``, pooled over all images.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, D, D]`` clean images.
    mask : torch.Tensor
        ``[B, D, D]`` (or broadcastable) bool mask, e.g. from :func:`particle_support_mask`.

    Returns
    -------
    float
        Population variance (divides by the pixel count) in the images' units squared.
    """
    m = torch.broadcast_to(mask.to(torch.bool), images.shape)
    vals = images.detach()[m].to(torch.float64)  # pooled in float64: sums over many pixels
    if vals.numel() == 0:
        raise ValueError("the signal mask selects no pixel")
    return float(((vals - vals.mean()) ** 2).mean())


def add_noise(
    images: torch.Tensor,
    snr: float,
    signal_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, float]:
    """Add white Gaussian noise at ``SNR = var(signal in mask) / var(noise)``.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, D, D]`` clean images (CTF applied when the data have one).
    snr : float
        Target signal-to-noise ratio (> 0), see the module docstring.
    signal_mask : torch.Tensor, optional
        ``[B, D, D]`` bool particle support. Pass :func:`particle_support_mask` of the
        **CTF-free** projections; if omitted it is computed from ``images`` themselves, which
        is only right for CTF-free images (the CTF spreads the signal and changes its sign).
    generator : torch.Generator, optional
        Random source (draws happen on its device, then move to ``images.device``).

    Returns
    -------
    noisy : torch.Tensor
        ``[B, D, D]`` ``images + noise``.
    noise_std : float
        The standard deviation used, ``sqrt(var_signal / snr)``.
    """
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if signal_mask is None:
        signal_mask = particle_support_mask(images)
    noise_std = (signal_variance(images, signal_mask) / snr) ** 0.5
    gen_device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=gen_device)
    return images + noise.to(images.device) * noise_std, noise_std
