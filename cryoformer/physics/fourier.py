"""Centred 2-D Fourier transforms, frequency grids, Fourier cropping and sub-pixel shifts.

Conventions (docs/conventions.md): images are ``[..., y, x]`` with box ``D`` even; the real-space origin
and the zero frequency (DC) both sit at index ``D//2``. Pixel coordinates are ``i - D//2``, so
they run over ``-D/2 … D/2 - 1``; frequency index ``k`` likewise means ``k - D//2`` cycles per
box. The forward transform is unnormalised and the inverse carries ``1/D²`` (numpy/torch
default), as cryoDRGN's ``fft2_center``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["fft2_center", "ifft2_center", "frequency_grid_2d", "fourier_crop", "shift_images"]

_DIMS = (-2, -1)


def fft2_center(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D FFT over the last two dims: ``fftshift(fft2(ifftshift(x)))``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., D, D]`` real or complex images with the origin at index ``D//2``.

    Returns
    -------
    torch.Tensor
        ``[..., D, D]`` complex spectrum with DC at index ``D//2``.
    """
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS), dim=_DIMS)


def ifft2_center(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_center`: ``fftshift(ifft2(ifftshift(X)))`` (complex result).

    Parameters
    ----------
    X : torch.Tensor
        ``[..., D, D]`` centred spectrum.

    Returns
    -------
    torch.Tensor
        ``[..., D, D]`` complex images; take ``.real`` for real data.
    """
    X = torch.fft.ifftshift(X, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(X, dim=_DIMS), dim=_DIMS)


def frequency_grid_2d(
    D: int,
    pixel_size_angstrom: float = 1.0,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spatial frequencies (1/Å) of the centred ``D × D`` spectrum.

    Parameters
    ----------
    D : int
        Box size in pixels.
    pixel_size_angstrom : float
        Pixel size in Å.
    device, dtype
        Of the result.

    Returns
    -------
    torch.Tensor
        ``[D, D, 2]``; ``[i, j, 0]`` is the x-frequency of column ``j`` and ``[i, j, 1]`` the
        y-frequency of row ``i``, both ``arange(-D/2, D/2) / (D · pixel_size_angstrom)`` —
        the grid cryoDRGN's ``add_ctf`` uses.
    """
    f = torch.arange(-(D // 2), D - D // 2, dtype=torch.float64, device=device) / (D * pixel_size_angstrom)
    fy, fx = torch.meshgrid(f, f, indexing="ij")  # [D, D] each: fy varies along rows
    return torch.stack([fx, fy], dim=-1).to(dtype)  # [D, D, 2]


def fourier_crop(images: torch.Tensor, new_D: int) -> torch.Tensor:
    """Downsample by keeping the central ``new_D × new_D`` block of the spectrum.

    The result is rescaled by ``(new_D / D)²`` so that it is **mean-preserving**: a constant
    image stays the same constant, and a band-limited image (all frequencies below the new
    Nyquist) becomes exactly its samples on the coarse grid (whose centre pixel
    ``new_D//2`` coincides with pixel ``D//2``). This is the scaling a change of pixel size
    should have for densities sampled per pixel; note that cryoDRGN's ``downsample`` does
    not rescale (its output is ``(D/new_D)²`` times ours).

    Parameters
    ----------
    images : torch.Tensor
        ``[..., D, D]`` real images, ``D`` even.
    new_D : int
        New even box size, ``new_D ≤ D``.

    Returns
    -------
    torch.Tensor
        ``[..., new_D, new_D]`` real images (the real part of the inverse transform; the
        cropped Nyquist row/column has no partner, and taking the real part halves it).
    """
    D = images.shape[-1]
    if images.shape[-2] != D:
        raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
    if new_D % 2 or D % 2:
        raise ValueError(f"box sizes must be even, got D={D}, new_D={new_D}")
    if new_D > D:
        raise ValueError(f"new_D={new_D} is larger than D={D}; fourier_crop only downsamples")
    if new_D == D:
        return images.clone()
    start = D // 2 - new_D // 2
    F = fft2_center(images)[..., start : start + new_D, start : start + new_D]  # [..., nD, nD]
    return ifft2_center(F).real * (new_D / D) ** 2


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Move image content by ``-s``: ``out(p) = in(p + s)``, by a Fourier phase ramp.

    This is the docs/conventions.md in-plane shift (``s`` = RELION ``rlnOriginX/Y`` in pixels): the image
    at pose ``(R, s)`` is the projection moved by ``-s``. Images are treated as periodic; an
    integer shift is then exact (``np.roll`` by ``-s``). For fractional shifts the Nyquist
    row/column keeps only the real part of its phase factor.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, D, D]`` (any leading dims) real images.
    shifts_px : torch.Tensor
        ``[B, 2]`` (broadcastable leading dims) shifts ``(sx, sy)`` in pixels.

    Returns
    -------
    torch.Tensor
        ``[B, D, D]`` shifted real images.
    """
    D = images.shape[-1]
    shifts = torch.as_tensor(shifts_px, device=images.device).to(images.real.dtype)
    k = frequency_grid_2d(D, 1.0, device=images.device, dtype=shifts.dtype)  # [D, D, 2] cycles/px
    # out(p) = in(p + s)  ⇔  OUT(k) = IN(k) · exp(+2πi k·s)   (k in cycles per pixel)
    phase = 2 * torch.pi * (k * shifts[..., None, None, :]).sum(-1)  # [B, D, D]
    ramp = torch.polar(torch.ones_like(phase), phase)
    return ifft2_center(fft2_center(images) * ramp).real
