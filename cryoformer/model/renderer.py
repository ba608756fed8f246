"""Image formation from densities (paper eqs. 1 and 6, docs/conventions.md, "The model").

A renderer says which *sites* it needs the density at (:meth:`sites`) and turns the density
there into images (``forward``): project, shift, CTF. It never sees the density field: the
model asks the field for the density at the renderer's sites and hands over the result.

Both renderers compute the clean projection ``P(p) = Σ_z σ̂(Rᵀ p)`` over the image-frame
sample grid ``p = (x, y, z)`` (pixels relative to ``D//2``) restricted to the sphere
``|p| ≤ D/2``, unit step along z, then move it by ``−s`` with a Fourier phase shift
(:func:`cryoformer.physics.fourier.shift_images`) and multiply by the CTF in Fourier space
(:func:`cryoformer.physics.ctf.apply_ctf`) — the PSF ``ĝ`` of eq. 6 (:func:`form_image`).

* :class:`DirectRenderer` needs the density at the rotated points themselves
  (:class:`PointSites`): exact for the field, cost ``≈ 0.52·D³`` field evaluations (spatial
  features included) per image.
* :class:`CanonicalGridRenderer` needs the density on the voxels of the fixed canonical
  ``D³`` grid (:class:`GridSites`; the field may evaluate the image-independent ``F_S`` once
  for the batch there, optionally on a coarser grid) and projects the per-image volume with
  trilinear resampling (:func:`cryoformer.physics.projector.project`). It differs from the
  direct renderer by trilinear interpolation error, and on the sphere's surface at
  coordinate ``+D/2`` (beyond the last voxel centre ``D/2 − 1``), where the projector reads
  zero padding — particles belong well inside the sphere, so this shell carries no signal.
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics import ctf as ctf_mod
from ..physics import fourier, projector
from .coordinates import sphere_voxel_index
from .sites import GridSites, PointSites

RENDERERS = ("canonical", "direct")


def form_image(projection: torch.Tensor, shifts_px: torch.Tensor | None = None,
               ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Shift and CTF-modulate clean projections.

    Parameters
    ----------
    projection : Tensor [B, D, D]
    shifts_px : Tensor [B, 2] or None
        ``s`` in pixels; the image is ``I(p) = P(p + s)`` (docs/conventions.md).
    ctf : Tensor [B, 9] or [B, D, D] or None
        cryoDRGN CTF parameter rows (computed here with
        :func:`~cryoformer.physics.ctf.ctf_images`) or precomputed CTF images
        (centred Fourier layout, as ``ctf_images`` returns them).

    Returns
    -------
    Tensor [B, D, D]
    """
    images = projection
    if shifts_px is not None:
        images = fourier.shift_images(images, shifts_px)
    if ctf is not None:
        if ctf.dim() == 2:
            ctf = ctf_mod.ctf_images(ctf, images.shape[-1])
        images = ctf_mod.apply_ctf(images, ctf.to(images.dtype))
    return images


class DirectRenderer(nn.Module):
    """Density at the rotated sample points ``Rᵀp`` inside the sphere, summed along z.

    Parameters
    ----------
    box_size : int
        ``D``.
    """

    def __init__(self, box_size: int) -> None:
        super().__init__()
        self.box_size = d = box_size
        index = sphere_voxel_index(d, d / 2)  # [S] flat [z, y, x] ids in the sphere
        c = torch.arange(d, dtype=torch.float32) - d // 2
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        points = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)[index]  # [S, 3] image frame
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("pixel", index % (d * d), persistent=False)  # [S] y·D + x

    def sites(self, rotations: torch.Tensor) -> PointSites:
        """The in-sphere sample points rotated into the volume frame, ``[B, S, 3]`` px."""
        # Row-vector form of Rᵀp: (Rᵀp)ᵀ = pᵀR, for all sphere points at once.
        return PointSites(torch.matmul(self.points.to(rotations.dtype), rotations))

    def forward(self, density: torch.Tensor, sites: PointSites, rotations: torch.Tensor,
                shifts_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Render images.

        Parameters
        ----------
        density : Tensor [B, S]
            Density at ``sites`` (from :meth:`sites`).
        sites : PointSites
        rotations : Tensor [B, 3, 3]
            Unused (the points are already rotated); the argument keeps both renderers'
            calls the same.
        shifts_px, ctf : see :func:`form_image`.

        Returns
        -------
        Tensor [B, D, D]
        """
        d = self.box_size
        dens = density.float()
        b = dens.shape[0]
        proj = torch.zeros(b, d * d, dtype=dens.dtype, device=dens.device)
        proj = proj.index_add(1, self.pixel, dens)  # Σ over z (unit step), eq. 1
        return form_image(proj.reshape(b, d, d), shifts_px, ctf)


class CanonicalGridRenderer(nn.Module):
    """Per-image volume on the canonical grid, then trilinear projection at the pose.

    It reads only voxels within ``D/2 + 2`` px of the centre: every trilinear neighbour of an
    in-sphere sample point lies there, so the result equals that of the full ``D³`` volume
    at ~55 % of the cost. The voxels may be restricted further (the support) before the
    density is evaluated; the volume is zero at voxels the density was not given for.

    Parameters
    ----------
    box_size : int
        ``D``.
    """

    def __init__(self, box_size: int) -> None:
        super().__init__()
        self.box_size = box_size
        self.register_buffer("voxel_index", sphere_voxel_index(box_size, box_size / 2 + 2),
                             persistent=False)

    def sites(self, rotations: torch.Tensor) -> GridSites:
        """The voxels of the ``D³`` grid this renderer reads (the same for every pose)."""
        return GridSites(self.box_size, self.voxel_index)

    def volumes(self, density: torch.Tensor, sites: GridSites) -> torch.Tensor:
        """Per-image volumes ``[B, D, D, D]`` from the density [B, S] at ``sites`` (zero
        elsewhere)."""
        d = self.box_size
        b = density.shape[0]
        vol = torch.zeros(b, d ** 3, dtype=density.dtype, device=density.device)
        return vol.index_copy(1, sites.voxel_index, density).reshape(b, d, d, d)

    def forward(self, density: torch.Tensor, sites: GridSites, rotations: torch.Tensor,
                shifts_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Render images; same contract as :meth:`DirectRenderer.forward`."""
        vol = self.volumes(density, sites)  # [B, D, D, D]
        # Projection in float32 even under autocast: fp16 sample coordinates would be off by
        # up to ~D/2000 px, and the FFTs of shift/CTF need float32 for non-power-of-2 D.
        proj = projector.project(vol.float(), rotations.float())  # [B, D, D], in the sphere
        return form_image(proj, shifts_px, ctf)


def make_renderer(kind: str, box_size: int) -> DirectRenderer | CanonicalGridRenderer:
    """The renderer named ``kind``: ``"canonical"`` or ``"direct"``."""
    if kind == "canonical":
        return CanonicalGridRenderer(box_size)
    if kind == "direct":
        return DirectRenderer(box_size)
    raise ValueError(f"unknown renderer {kind!r}")
