"""Contrast transfer function (docs/conventions.md), numerically cryoDRGN's ``compute_ctf``.

Sign convention
---------------
Everything here is the **cryoDRGN convention**: ``apply_ctf(projection, ctf_images(params))``
gives images with *dark* protein (positive density, negative low-frequency CTF ``≈ -w``).
RELION's particles are contrast-inverted (white protein): ``relion_project --ctf`` output is
``-(projection ⊛ CTF)``. To produce or fit RELION-convention images pass
``invert_contrast=True`` to :func:`ctf_images` (it negates the CTF); :func:`compute_ctf`
itself never negates.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from cryoformer.metadata import CTF_COLUMNS
from cryoformer.physics.fourier import fft2_center, frequency_grid_2d, ifft2_center

__all__ = ["compute_ctf", "ctf_images", "apply_ctf", "electron_wavelength_angstrom"]

Scalar = Union[float, torch.Tensor]


def compute_ctf(
    freqs: torch.Tensor,
    dfu: Scalar,
    dfv: Scalar,
    dfang_deg: Scalar,
    volt_kv: Scalar,
    cs_mm: Scalar,
    w: Scalar,
    phase_shift_deg: Scalar = 0,
    bfactor: Optional[Scalar] = None,
) -> torch.Tensor:
    """CTF values at the given spatial frequencies.

    ``ctf = sqrt(1 - w²) sin γ - w cos γ`` with
    ``γ = 2π(-½ Δf λ s² + ¼ Cs λ³ s⁴) - φ``, ``Δf = ½(dfu + dfv + (dfu - dfv) cos 2(α - dfang))``,
    ``α = atan2(fy, fx)``, ``s² = fx² + fy²`` and the relativistic electron wavelength
    ``λ = 12.2639 / sqrt(V + 0.97845e-6 V²)`` Å (``V`` in volts); multiplied by
    ``exp(-B s²/4)`` when a B-factor is given. Same operations, order and constants as
    cryoDRGN's ``compute_ctf``.

    Parameters
    ----------
    freqs : torch.Tensor
        ``[..., 2]`` frequencies ``(fx, fy)`` in 1/Å.
    dfu, dfv : float or torch.Tensor
        Defocus U and V in Å (positive = underfocus).
    dfang_deg : float or torch.Tensor
        Astigmatism angle in degrees (direction of ``dfu`` from the x axis).
    volt_kv : float or torch.Tensor
        Acceleration voltage in kV.
    cs_mm : float or torch.Tensor
        Spherical aberration in mm.
    w : float or torch.Tensor
        Amplitude contrast ratio.
    phase_shift_deg : float or torch.Tensor
        Phase-plate shift in degrees.
    bfactor : float or torch.Tensor, optional
        Envelope B-factor in Å².

    Returns
    -------
    torch.Tensor
        ``[...]`` CTF values. Tensor parameters broadcast against ``freqs[..., 0]`` (e.g.
        ``[B, 1, 1]`` parameters with ``[D, D, 2]`` frequencies give ``[B, D, D]``).
    """
    if freqs.shape[-1] != 2:
        raise ValueError(f"freqs must be [..., 2], got {tuple(freqs.shape)}")
    # Unit conversions: kV → V, mm → Å, degrees → radians.
    volt = volt_kv * 1000
    cs = cs_mm * 10**7
    dfang = dfang_deg * np.pi / 180
    phase_shift = phase_shift_deg * np.pi / 180
    # λ = h / sqrt(2 m e V_r), V_r = V + e V² / (2 m c²): relativistic wavelength in Å.
    lam = 12.2639 / (volt + 0.97845e-6 * volt**2) ** 0.5
    x = freqs[..., 0]
    y = freqs[..., 1]
    ang = torch.atan2(y, x)
    s2 = x**2 + y**2
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (ang - dfang)))
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * lam**3 * s2**2) - phase_shift
    ctf = (1 - w**2) ** 0.5 * torch.sin(gamma) - w * torch.cos(gamma)
    if bfactor is not None:
        ctf = ctf * torch.exp(-bfactor / 4 * s2)
    return ctf


def ctf_images(
    ctf_array: Union[torch.Tensor, np.ndarray],
    D: Optional[int] = None,
    bfactor: Optional[Union[float, torch.Tensor, np.ndarray]] = None,
    invert_contrast: bool = False,
) -> torch.Tensor:
    """Centred 2-D CTF images of a batch of particles.

    Parameters
    ----------
    ctf_array : torch.Tensor or np.ndarray
        ``[B, 9]`` parameters in cryoDRGN column order (:data:`cryoformer.metadata.CTF_COLUMNS`:
        box size, pixel size Å, dfU Å, dfV Å, angle deg, kV, Cs mm, w, phase deg).
    D : int, optional
        Box size of the output. Defaults to column 0 (must then be the same for all rows).
        When ``D`` differs from column 0 the images are taken to have been resampled
        (Fourier-cropped or padded) to ``D``: the pixel size becomes
        ``box_size · pixel_size / D`` so the physical box is unchanged, as cryoDRGN's
        ``load_ctf_for_training`` does.
    bfactor : float or array, optional
        Envelope B-factor in Å², scalar or ``[B]``.
    invert_contrast : bool
        Return ``-CTF`` (RELION convention, white protein) instead of the cryoDRGN CTF.

    Returns
    -------
    torch.Tensor
        ``[B, D, D]`` CTF on :func:`frequency_grid_2d` (DC at ``D//2``), dtype and device of
        ``ctf_array`` (float32 for numpy input).
    """
    p = _parameter_rows(ctf_array)  # [B, 9]
    box = p[:, 0]
    if D is None:
        D = int(round(float(box[0])))
        if not torch.all(box == box[0]):
            raise ValueError("rows have different box sizes; pass D explicitly")
    apix = box * p[:, 1] / D  # [B]; equals column 1 when D is the original box
    # Unit-pixel frequencies (cycles/px) divided by each particle's pixel size → 1/Å.
    f = frequency_grid_2d(D, 1.0, device=p.device, dtype=p.dtype)  # [D, D, 2]
    freqs = f[None] / apix[:, None, None, None]  # [B, D, D, 2]

    def col(name: str) -> torch.Tensor:
        return p[:, CTF_COLUMNS.index(name), None, None]  # [B, 1, 1]

    if bfactor is not None:
        bfactor = torch.as_tensor(bfactor, dtype=p.dtype, device=p.device).reshape(-1, 1, 1)
    ctf = compute_ctf(
        freqs,
        col("defocus_u_angstrom"),
        col("defocus_v_angstrom"),
        col("astigmatism_angle_deg"),
        col("voltage_kv"),
        col("spherical_aberration_mm"),
        col("amplitude_contrast"),
        col("phase_shift_deg"),
        bfactor,
    )  # [B, D, D]
    return -ctf if invert_contrast else ctf


def _parameter_rows(ctf_array: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """``ctf_array`` as a floating ``[B, 9]`` tensor (one row promoted to ``[1, 9]``)."""
    if isinstance(ctf_array, torch.Tensor):
        p = ctf_array if ctf_array.is_floating_point() else ctf_array.to(torch.float32)
    else:  # numpy / lists (e.g. CtfParameters.array): the package default float32
        p = torch.as_tensor(np.asarray(ctf_array), dtype=torch.float32)
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[1] != len(CTF_COLUMNS):
        raise ValueError(f"ctf_array must be [B, {len(CTF_COLUMNS)}], got {tuple(p.shape)}")
    return p


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Convolve images with the CTF: ``real(ifft2_center(fft2_center(images) · ctf))``.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, D, D]`` real images (e.g. clean projections).
    ctf : torch.Tensor
        ``[B, D, D]`` (or broadcastable) centred CTF, e.g. from :func:`ctf_images`.

    Returns
    -------
    torch.Tensor
        ``[B, D, D]`` real images in the convention of ``ctf`` (see module docstring).
    """
    return ifft2_center(fft2_center(images) * ctf).real


def electron_wavelength_angstrom(volt_kv: float) -> float:
    """Relativistic electron wavelength in Å for a voltage in kV (cryoDRGN's constants)."""
    v = volt_kv * 1000.0
    return 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)
