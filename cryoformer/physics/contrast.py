"""Which contrast convention a particle stack is in, read from the images themselves.

Two conventions exist (docs/conventions.md, "Contrast"): RELION/cryoSPARC particles are
``−(projection ⊛ CTF)`` (protein white), cryoDRGN's model is ``+(projection ⊛ CTF)`` with a
CTF that is negative at low frequency (protein dark). ``cryoformer train`` inverts the images
unless ``--uninvert-data``; the wrong choice trains a map anti-correlated with the truth
without any other symptom, so the convention is measured before training.

The statistic
-------------
For each image ``I`` with CTF ``C`` and shift ``s``::

    u = Σ_k Re[ Î(k) · exp(−2πi k·s) ] · sign C(k)  /  (σ_I · D · sqrt(N_band))
        over the band 0 < |k| ≤ band_px Fourier pixels (cycles per box)

``exp(−2πi k·s)`` undoes the shift (the image is the projection moved by ``−s``, so the
particle is centred again), ``sign C`` phase-flips, ``σ_I`` is the image's standard deviation,
and the denominator makes ``u`` a standard normal number for an image of white noise. For an
image ``±(P ⊛ C)`` the flipped coefficient is ``±P̂(k)|C(k)|``, so ``u`` has the sign of the
convention whenever ``Re P̂(k) > 0`` in the band. Without a CTF, ``C ≡ 1``.

Why this band rather than a real-space "disk minus annulus": it needs no particle radius, and
its sign has a reason to hold. A real-space template meets the image wherever ``|C|`` and the
template's transform put weight, and that transform has negative lobes: flipped images and a
disk of radius 0.25·D matched this band's z, 0.15·D or 0.35·D lost a factor 2–4, and with the
images multiplied by the CTF instead of its sign (a Wiener-like weighting) a disk of 0.35·D
against the rest of the box gave AdK the *wrong* sign (docs/benchmarks.md). The lowest rings
are different: averaged around a ring of radius ``q`` (cycles/px), ``P̂`` is
``∫ V(x) J₀(2π q ρ) dx`` (``ρ`` the in-plane distance from the centre), positive for every
orientation when the density lies within ``ρ < 0.38/q``; for ``q = 1/D`` that is most of the
box. The default ``band_px = 1.5`` keeps the eight coefficients at ``|k| ∈ {1, √2}``: all
molecules, boxes and defoci measured had them positive, down to boxes barely larger than the
particle, whereas the ring ``|k| = √5`` turned negative for AdK in a 60 Å box. DC is excluded,
so a constant offset of the image (detector or normalisation) does not enter.

Images are independent, so the stack's verdict is a one-sample t-test of the ``u`` values:
``z = mean(u) / (std(u) / √n)``; ``z ≥ margin`` means cryoDRGN convention (use the images as
they are, ``--uninvert-data``), ``z ≤ −margin`` RELION convention (invert, the default),
anything between "undecided".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch

from cryoformer.metadata import CTF_COLUMNS, CtfParameters, Poses
from cryoformer.physics.ctf import ctf_images

if TYPE_CHECKING:  # physics must not import io at run time (architecture.md: io is beside it)
    from cryoformer.io.particles import ImageSource

__all__ = [
    "CONVENTIONS",
    "DEFAULT_BAND_PX",
    "DEFAULT_MARGIN_Z",
    "DEFAULT_MAX_IMAGES",
    "MIN_IMAGES",
    "ContrastEstimate",
    "contrast_statistic",
    "summarize_contrast",
    "estimate_contrast",
    "estimate_contrast_from_source",
]

CONVENTIONS = ("relion", "cryodrgn", "undecided")

#: Band edge in Fourier pixels (cycles per box): the rings |k| = 1 and √2.
DEFAULT_BAND_PX = 1.5
#: |z| needed for a verdict. Pure noise: |z| ≤ 3.7 in 1600 stacks of 50 images (≤ 2.1 in 40
#: of 2000); simulated particles at SNR 0.01 reach 6 with 13–160 images and never had the
#: wrong sign (|z| ≥ 20 with 2000; docs/benchmarks.md).
DEFAULT_MARGIN_Z = 6.0
#: Images sampled from a stack: a few seconds of work at any stack size.
DEFAULT_MAX_IMAGES = 2000
#: Below this many usable images no verdict is given (the t-test's tails are too heavy).
MIN_IMAGES = 50

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class ContrastEstimate:
    """The measured contrast convention of a particle stack.

    Attributes
    ----------
    convention : {"relion", "cryodrgn", "undecided"}
        ``"relion"``: images are ``−(projection ⊛ CTF)`` (invert them, ``train``'s default);
        ``"cryodrgn"``: ``+(projection ⊛ CTF)`` (``--uninvert-data``). Without a CTF the same
        with ``CTF ≡ 1``: bright protein reads ``"cryodrgn"``.
    z_score : float
        t-statistic of the per-image values (positive = cryoDRGN convention).
    n_images : int
        Images that entered the test.
    mean_statistic : float
        Mean per-image value ``u`` (module docstring): the particle's low-frequency signal in
        units of the noise one image of white noise would give; ``n ≈ (margin · std/mean)²``
        images reach the margin.
    std_statistic : float
        Standard deviation of ``u`` across images.
    margin_z : float
        |z| that was required for a verdict.
    """

    convention: str
    z_score: float
    n_images: int
    mean_statistic: float
    std_statistic: float
    margin_z: float

    @property
    def invert_data(self) -> Optional[bool]:
        """What ``train``'s ``invert_data`` should be: True (relion), False (cryodrgn), None."""
        return {"relion": True, "cryodrgn": False}.get(self.convention)

    def images_needed(self) -> Optional[int]:
        """Images at which the expected |z| reaches the margin (None when the mean is 0)."""
        if self.mean_statistic == 0 or not math.isfinite(self.mean_statistic):
            return None
        return int(math.ceil((self.margin_z * self.std_statistic / abs(self.mean_statistic)) ** 2))

    def summary(self) -> str:
        """One line for logs, e.g. ``contrast: relion (z = -41.3 over 2000 images, margin 6)``."""
        return (f"contrast: {self.convention} (z = {self.z_score:+.1f} over {self.n_images} images, "
                f"margin {self.margin_z:g})")


def _band_offsets(band_px: float) -> int:
    """Half-width ``h`` of the even ``2h × 2h`` spectrum crop holding every ``|k| ≤ band_px``."""
    return int(math.floor(band_px)) + 1


def _low_spectrum(imgs: torch.Tensor, h: int) -> torch.Tensor:
    """The central ``2h × 2h`` block of :func:`~cryoformer.physics.fourier.fft2_center`.

    Computed as two small DFT matrix products (``n·D²·2h`` operations instead of a full FFT's
    copies and ``n·D² log D``: 15× faster at D = 256). Each image's mean is removed first; it
    only changes DC, and without it a large detector offset would leak through float32
    rounding of the sums.

    Parameters
    ----------
    imgs : torch.Tensor
        ``[n, D, D]`` float32.
    h : int
        Half-width of the block in Fourier pixels.

    Returns
    -------
    spectrum : torch.Tensor
        ``[n, 2h, 2h]`` complex128, frequency offsets ``-h … h-1`` along ``[ky, kx]``.
    std : torch.Tensor
        ``[n]`` float64 standard deviation of each image (from the same centred copy).
    """
    D = imgs.shape[-1]
    x = torch.arange(D, dtype=torch.float64) - D // 2  # pixel coordinates (origin D//2)
    k = torch.arange(-h, h, dtype=torch.float64)  # frequency offsets, cycles per box
    angle = -2 * math.pi * x[:, None] * k[None, :] / D  # [D, 2h]
    cos, sin = torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)
    centred = imgs - imgs.mean((-1, -2), keepdim=True)  # [n, D, D]
    # Along x (columns): A[n, y, kx] = Σ_x I[n, y, x] · exp(−2πi kx·x/D); one pass over the
    # images for both parts.
    a = centred @ torch.cat([cos, sin], dim=1)  # [n, D, 4h]
    a_re, a_im = a[..., : 2 * h], a[..., 2 * h :]  # [n, D, 2h] each
    # Along y (rows): F[n, ky, kx] = Σ_y exp(−2πi ky·y/D) · A[n, y, kx].
    re = cos.T @ a_re - sin.T @ a_im  # [n, 2h, 2h]
    im = cos.T @ a_im + sin.T @ a_re
    sigma = torch.linalg.vector_norm(centred, dim=(-1, -2)) / math.sqrt(D * D - 1)  # [n] image std
    return torch.complex(re.to(torch.float64), im.to(torch.float64)), sigma.to(torch.float64)


def contrast_statistic(
    images: ArrayLike,
    ctf: Optional[ArrayLike] = None,
    shifts_px: Optional[ArrayLike] = None,
    band_px: float = DEFAULT_BAND_PX,
) -> torch.Tensor:
    """Per-image contrast statistic ``u`` (module docstring); positive = cryoDRGN convention.

    Parameters
    ----------
    images : np.ndarray or torch.Tensor
        ``[n, D, D]`` images as stored on disk (not inverted), ``D`` even.
    ctf : np.ndarray or torch.Tensor, optional
        ``[n, 9]`` CTF parameters in cryoDRGN column order; their box (column 0) may differ
        from ``D`` when the stack was resampled (:func:`~cryoformer.physics.ctf.ctf_images`).
        ``None``: the images carry no CTF.
    shifts_px : np.ndarray or torch.Tensor, optional
        ``[n, 2]`` pose shifts ``(sx, sy)`` in pixels of ``D`` (the image is the projection
        moved by ``−s``). ``None``: particles are taken as centred.
    band_px : float
        Outer edge of the band in Fourier pixels (cycles per box); DC is always excluded.

    Returns
    -------
    torch.Tensor
        ``[n]`` float64; ``0`` for a constant (blank) image.
    """
    imgs = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    imgs = imgs.detach().to(torch.float32)  # [n, D, D]
    if imgs.dim() != 3 or imgs.shape[-1] != imgs.shape[-2]:
        raise ValueError(f"images must be [n, D, D], got {tuple(imgs.shape)}")
    n, D = imgs.shape[0], imgs.shape[-1]
    h = _band_offsets(band_px)
    if D % 2 or 2 * h > D or not band_px >= 1:
        raise ValueError(f"need an even box D ≥ {2 * h} and band_px ≥ 1, got D={D}, band_px={band_px}")
    spec, sigma = _low_spectrum(imgs, h)  # [n, 2h, 2h] with DC at [h, h]; [n]
    f = torch.arange(-h, h, dtype=torch.float64) / D  # cycles/px of the D box
    fy, fx = torch.meshgrid(f, f, indexing="ij")  # [2h, 2h]
    in_band = (torch.sqrt(fx**2 + fy**2) * D <= band_px) & ((fx != 0) | (fy != 0))  # [2h, 2h]
    if shifts_px is not None:
        s = torch.as_tensor(np.asarray(shifts_px) if not isinstance(shifts_px, torch.Tensor) else shifts_px)
        s = s.detach().to(torch.float64).reshape(n, 2)  # [n, 2]
        # The image is P moved by −s; multiplying by exp(−2πi k·s) moves it back by +s.
        phase = -2 * math.pi * (fx * s[:, 0, None, None] + fy * s[:, 1, None, None])  # [n, 2h, 2h]
        spec = spec * torch.polar(torch.ones_like(phase), phase)
    weight = in_band.to(torch.float64).expand(n, -1, -1)  # [n, 2h, 2h]
    if ctf is not None:
        p = torch.as_tensor(np.asarray(ctf) if not isinstance(ctf, torch.Tensor) else ctf)
        p = p.detach().to(torch.float64).reshape(-1, len(CTF_COLUMNS))
        if p.shape[0] != n:
            raise ValueError(f"{p.shape[0]} CTF rows for {n} images")
        # ctf_images at box 2h keeps the physical box, so it is exactly the central 2h × 2h
        # block of the CTF on this stack's grid (same frequencies in 1/Å).
        weight = weight * torch.sign(ctf_images(p, 2 * h))  # [n, 2h, 2h]
    t = (spec.real * weight).sum((-1, -2))  # [n]
    # White noise of std σ gives each coefficient variance σ²D² and Re/Im halves of it; the
    # band is Hermitian-symmetric, so Σ W·Re Î has variance σ²D²·Σ W².
    scale = sigma * D * torch.sqrt((weight**2).sum((-1, -2)))  # [n]
    return torch.where(scale > 0, t / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(t))


def summarize_contrast(values: ArrayLike, margin_z: float = DEFAULT_MARGIN_Z,
                       min_images: int = MIN_IMAGES) -> ContrastEstimate:
    """Verdict from per-image statistics (one-sample t-test, module docstring).

    Parameters
    ----------
    values : np.ndarray or torch.Tensor
        ``[n]`` values of :func:`contrast_statistic`; non-finite ones are dropped.
    margin_z : float
        |z| needed for a verdict.
    min_images : int
        Fewer usable images than this give "undecided".
    """
    u = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    u = u[np.isfinite(u)]
    n = int(u.size)
    mean = float(u.mean()) if n else 0.0
    std = float(u.std(ddof=1)) if n > 1 else 0.0
    z = mean / std * math.sqrt(n) if std > 0 else 0.0
    convention = "undecided"
    if n >= min_images and abs(z) >= margin_z:
        convention = "cryodrgn" if z > 0 else "relion"
    return ContrastEstimate(convention, float(z), n, mean, std, float(margin_z))


def estimate_contrast(
    images: ArrayLike,
    ctf: Optional[ArrayLike] = None,
    shifts_px: Optional[ArrayLike] = None,
    band_px: float = DEFAULT_BAND_PX,
    margin_z: float = DEFAULT_MARGIN_Z,
    chunk_size: int = 512,
) -> ContrastEstimate:
    """Contrast convention of images in memory.

    Parameters
    ----------
    images : np.ndarray or torch.Tensor
        ``[n, D, D]`` float32 images as stored on disk (not inverted).
    ctf : np.ndarray or torch.Tensor, optional
        ``[n, 9]`` cryoDRGN-order CTF parameters, or ``None`` for CTF-free images.
    shifts_px : np.ndarray or torch.Tensor, optional
        ``[n, 2]`` shifts in pixels of ``D`` (the image is the projection moved by ``−s``).
    band_px : float
        Band edge in Fourier pixels (:func:`contrast_statistic`).
    margin_z : float
        |z| needed for a verdict.
    chunk_size : int
        Images transformed at once (bounds memory).

    Returns
    -------
    ContrastEstimate
    """
    n = len(images)
    parts = []
    for a in range(0, n, chunk_size):
        b = min(n, a + chunk_size)
        parts.append(contrast_statistic(images[a:b], None if ctf is None else ctf[a:b],
                                        None if shifts_px is None else shifts_px[a:b], band_px))
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return summarize_contrast(values, margin_z)


def estimate_contrast_from_source(
    source: "ImageSource",
    poses: Optional[Poses] = None,
    ctf: Optional[CtfParameters] = None,
    rows: Optional[Sequence[int]] = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    chunk_size: int = 256,
    seed: int = 0,
    band_px: float = DEFAULT_BAND_PX,
    margin_z: float = DEFAULT_MARGIN_Z,
) -> ContrastEstimate:
    """Contrast convention of a particle stack, from a deterministic sample of its images.

    Parameters
    ----------
    source : cryoformer.io.particles.ImageSource
        The particle images (read lazily; only the sample is read, ``chunk_size`` at a time).
    poses : Poses, optional
        One pose per entry of ``rows``; shifts are in pixels of ``poses.box_size`` (rescaled
        to the stack's box when that differs). ``None``: particles taken as centred.
    ctf : CtfParameters, optional
        One CTF row per entry of ``rows``; ``None`` for CTF-free images.
    rows : sequence of int, optional
        Source indices the metadata rows refer to (e.g. ``train``'s ``--ind`` selection);
        default all images in order.
    max_images : int
        At most this many images are used, drawn without replacement with ``seed``.
    chunk_size : int
        Images read per step.
    seed : int
        Seed of the sample.
    band_px, margin_z : float
        As in :func:`estimate_contrast`.

    Returns
    -------
    ContrastEstimate
    """
    rows_arr = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    m = int(rows_arr.size)
    for name, meta in (("poses", poses), ("ctf", ctf)):
        if meta is not None and len(meta) != m:
            raise ValueError(f"{len(meta)} {name} rows for {m} particles")
    if m > max_images:
        pick = np.sort(np.random.default_rng([seed, 17]).choice(m, size=max_images, replace=False))
    else:
        pick = np.arange(m)
    D = source.box_size
    shifts = None
    if poses is not None:
        scale = 1.0 if not poses.box_size else D / float(poses.box_size)
        shifts = poses.shifts_px[pick].astype(np.float64) * scale  # [k, 2] px of D
    ctf_rows = None if ctf is None else ctf.array[pick]  # [k, 9]
    parts = []
    for a in range(0, pick.size, chunk_size):
        b = min(pick.size, a + chunk_size)
        imgs = source.images(rows_arr[pick[a:b]])  # [c, D, D]
        parts.append(contrast_statistic(imgs, None if ctf_rows is None else ctf_rows[a:b],
                                        None if shifts is None else shifts[a:b], band_px))
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return summarize_contrast(values, margin_z)
