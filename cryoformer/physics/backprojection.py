"""Direct Fourier inversion: maps from images at known poses, with gold-standard half maps.

The reconstruction step of classical refinement (RELION, cryoSPARC), here used to give the
pose search (:mod:`cryoformer.refinement`) references at the particles' full box
that do not depend on how well a network has learned the map. By the Fourier slice theorem
each image's spectrum, the CTF-weighted slice ``c(k) · V̂(Rᵀk)`` plus noise, is a set of
samples of the 3-D spectrum on a plane. Every sample is spread onto its 8 neighbouring voxels
with trilinear weights, accumulating

    N(q) = Σ w · c · Î        (the data)      W(q) = Σ w · c²        (the weights)

and the map is the Wiener estimate ``V̂ = N / (W + λ)`` with ``λ(|q|) = σ²/S(|q|)``, the
noise-to-signal ratio of each frequency shell. ``λ`` is not a tuning knob: it is read off the
Fourier shell correlation of two half maps from disjoint halves of the particles, as RELION
does, since for half maps ``FSC = S / (S + σ²/W_half)``.

Two details make the maps match the rest of the package:

* **Gridding correction.** Trilinear spreading convolves the spectrum with a tent, which
  multiplies the real-space map by ``sinc²(x/D)`` per axis; the map is divided by it.
* **The real-space renderer's damping.** Images formed as docs/conventions.md does (and as the model
  renders) carry the trilinear-sampling damping ``Π sinc²(q_i)`` in the volume frame
  (:mod:`.slice_projector`); the spectrum is divided by it so that slicing the map with
  ``match_trilinear`` reproduces the images instead of damping them twice.

Frequencies are in cycles per pixel; spectra are the unnormalised centred transforms of
:mod:`cryoformer.physics.fourier`, so ``Î`` is ``fft2_center(image)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .fourier import frequency_grid_2d

__all__ = ["FourierBackprojector", "Reconstruction"]


@dataclass(frozen=True)
class Reconstruction:
    """Wiener-filtered maps of each group of particles.

    Attributes
    ----------
    half_maps : torch.Tensor
        ``[K, 2, D, D, D]`` the two half maps of each of the ``K`` groups (indexed
        ``[z, y, x]``, origin at voxel ``D//2``), each from its own half of the particles.
    maps : torch.Tensor
        ``[K, D, D, D]`` the maps from all particles of each group.
    fsc : np.ndarray
        ``[K, D//2 + 1]`` FSC between the half maps per shell ``r`` (frequency ``r/D``
        cycles/px).
    """

    half_maps: torch.Tensor
    maps: torch.Tensor
    fsc: np.ndarray

    def resolution_px(self, threshold: float = 0.143) -> np.ndarray:
        """``[K]`` resolution (px per cycle, i.e. Å when multiplied by the pixel size) where the
        half-map FSC first drops below ``threshold``: the gold-standard criterion at 0.143."""
        D = 2 * (self.fsc.shape[1] - 1)
        out = np.empty(len(self.fsc))
        for g, curve in enumerate(self.fsc):
            below = np.nonzero(curve[1:] < threshold)[0]
            # never below the threshold: resolved to Nyquist (2 px per cycle)
            out[g] = D / max(int(below[0]), 1) if below.size else 2.0
        return out


class FourierBackprojector:
    """Accumulates images into the spectra of ``n_groups`` maps × 2 halves.

    Parameters
    ----------
    box_size : int
        ``D`` of the images and the maps.
    n_groups : int
        Separate maps (e.g. K-means classes of the latents).
    """

    def __init__(self, box_size: int, n_groups: int = 1) -> None:
        if box_size < 4 or n_groups < 1:
            raise ValueError(f"need box_size >= 4 and n_groups >= 1, got {box_size}, {n_groups}")
        D = box_size
        self.box_size, self.n_groups = D, n_groups
        k = frequency_grid_2d(D, 1.0)  # [D, D, 2] cycles/px
        self.band = k.norm(dim=-1) <= 0.5  # [D, D]
        freqs = k[self.band]  # [M, 2]
        self.freqs = freqs
        self._k3 = torch.cat([freqs, freqs.new_zeros(len(freqs), 1)], dim=-1)  # [M, 3]
        self.data = torch.zeros(n_groups * 2 * D ** 3, dtype=torch.complex64)  # N(q), flat
        self.weight = torch.zeros(n_groups * 2 * D ** 3)  # W(q), flat

    def insert(self, spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
               shifts_px: torch.Tensor, groups: torch.Tensor, halves: torch.Tensor) -> None:
        """Add a batch of images.

        Parameters
        ----------
        spectra : torch.Tensor
            ``[B, M]`` complex ``fft2_center(image)`` at the frequencies of ``self.band``.
        ctf : torch.Tensor
            ``[B, M]`` CTF at the same frequencies (ones when there is none).
        rotations : torch.Tensor
            ``[B, 3, 3]`` pose rotations (docs/conventions.md).
        shifts_px : torch.Tensor
            ``[B, 2]`` image shifts, pixels.
        groups : torch.Tensor
            ``[B]`` int map index in ``[0, n_groups)``.
        halves : torch.Tensor
            ``[B]`` int half (0 or 1).
        """
        D = self.box_size
        if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= self.n_groups):
            raise ValueError(f"groups must be in [0, {self.n_groups}), got {int(groups.min())}..{int(groups.max())}")
        if len(halves) and not bool(((halves == 0) | (halves == 1)).all()):
            raise ValueError("halves must be 0 or 1")
        freqs = self.freqs
        phase = 2 * torch.pi * (shifts_px.float() @ freqs.T)  # [B, M]
        # the image model is slice · e^{+2πi k·s} (as the pose search scores it): undo the shift
        y = spectra.to(torch.complex64) * torch.polar(torch.ones_like(phase), -phase)
        cy, c2 = ctf.float() * y, ctf.float() ** 2  # [B, M]
        g = self._k3 @ rotations.float() * D + D // 2  # [B, M, 3]: Rᵀk as voxel index, (x, y, z)
        g0 = g.floor()
        frac = g - g0  # [B, M, 3]
        g0 = g0.long()
        base = ((groups.long() * 2 + halves.long()) * D ** 3)[:, None]  # [B, 1]
        for corner in range(8):
            off = [(corner >> a) & 1 for a in range(3)]  # x, y, z offsets
            w = torch.ones_like(frac[..., 0])
            idx = []
            for a in range(3):
                w = w * (frac[..., a] if off[a] else 1 - frac[..., a])
                idx.append(g0[..., a] + off[a])
            ix, iy, iz = idx
            ok = (ix >= 0) & (ix < D) & (iy >= 0) & (iy < D) & (iz >= 0) & (iz < D)
            flat = (base + (iz * D + iy) * D + ix)[ok]
            self.data.index_add_(0, flat, (w * cy)[ok])
            self.weight.index_add_(0, flat, (w * c2)[ok])

    def reconstruct(self) -> Reconstruction:
        """Half-map FSC per group, then the Wiener-filtered half maps and full maps."""
        D, K = self.box_size, self.n_groups
        num = self.data.view(K, 2, D ** 3)
        wts = self.weight.view(K, 2, D ** 3)
        c = torch.arange(D, dtype=torch.float32) - D // 2
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        shell = torch.sqrt(xx ** 2 + yy ** 2 + zz ** 2).round().long().reshape(-1).clamp(max=D)  # [D³]
        n_shell = D + 1

        def shell_sum(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n_shell, dtype=v.dtype).index_add_(0, shell, v)

        tent = torch.sinc(c / D) ** 2  # [D]: the tent's transform on the spectrum's grid
        # Π sinc² over the axes: on the spectrum's grid, the renderer's damping; the same
        # numbers read in real space (x/D), the gridding correction of the spreading
        sinc3 = tent[:, None, None] * tent[None, :, None] * tent[None, None, :]  # [D, D, D]
        renderer, gridding = sinc3.reshape(-1), sinc3
        count = shell_sum(torch.ones(D ** 3))
        half_maps, maps, curves = [], [], []
        for g in range(K):
            est = num[g] / wts[g].clamp(min=1e-12)  # [2, D³] unregularised half estimates
            cross = shell_sum((est[0] * est[1].conj()).real)
            power = shell_sum(est[0].abs() ** 2) * shell_sum(est[1].abs() ** 2)
            fsc = cross / power.sqrt().clamp(min=1e-30)  # [n_shell]
            curves.append(fsc[:D // 2 + 1].numpy())
            f = fsc.clamp(1e-3, 0.999)
            lam = shell_sum(wts[g].mean(0)) / count.clamp(min=1) * (1 - f) / f  # σ²/S per shell
            lam[D // 2 + 1:] = float("inf")  # beyond Nyquist: nothing was measured
            lam_v = lam[shell]  # [D³]
            den = torch.cat([wts[g] + lam_v, (wts[g].sum(0) + lam_v)[None]])  # [3, D³]
            # 0/0 where nothing was inserted (an empty group, DC with CTF(0) = 0): no information
            spectra = torch.where(den > 0, torch.cat([num[g], num[g].sum(0)[None]]) / den.clamp(min=1e-30), 0)
            spectra = spectra / renderer  # [3, D³]
            spec = spectra.reshape(3, D, D, D)
            dims = (-3, -2, -1)
            vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spec, dim=dims), dim=dims), dim=dims)
            vol = vol.real / gridding  # [3, D, D, D]
            half_maps.append(vol[:2])
            maps.append(vol[2])
        return Reconstruction(torch.stack(half_maps).float(), torch.stack(maps).float(), np.stack(curves))
