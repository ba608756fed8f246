"""Image formation from a density field (paper eqs. 1 and 6, docs/conventions.md, "The model").

Both renderers compute the clean projection ``P(p) = Σ_z σ̂(Rᵀ p)`` over the image-frame
sample grid ``p = (x, y, z)`` (pixels relative to ``D//2``) restricted to the sphere
``|p| ≤ D/2``, unit step along z, then move it by ``−s`` with a Fourier phase shift
(:func:`cryoformer.physics.fourier.shift_images`) and multiply by the CTF in Fourier space
(:func:`cryoformer.physics.ctf.apply_ctf`) — the PSF ``ĝ`` of eq. 6.

* :class:`DirectRenderer` evaluates the field at the rotated points themselves: exact for the
  field, cost ``≈ 0.52·D³`` field evaluations (spatial features included) per image.
* :class:`CanonicalGridRenderer` evaluates the image-independent ``F_S`` once on the fixed
  canonical grid (shared by the batch, optionally coarser than ``D``), runs only the
  per-image head on the ``D³`` grid to get a per-image volume, and projects it with
  trilinear resampling (:func:`cryoformer.physics.projector.project`). It differs from the
  direct renderer by trilinear interpolation error, and on the sphere's surface at
  coordinate ``+D/2`` (beyond the last voxel centre ``D/2 − 1``), where the projector reads
  zero padding — particles belong well inside the sphere, so this shell carries no signal.

A *field* is any object with ``box_size`` and two methods (the model implements them; tests
pass analytic fields)::

    density_at_points(points_px [B, P, 3], state) -> [B, P]
    density_on_grid(state, resolution, voxel_index [S] | None) -> [B, S]

where ``state`` is the per-image conditioning (for the model, the per-block query table).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..physics import ctf as ctf_mod
from ..physics import fourier, projector
from .sampling import sphere_voxel_index


class DensityField(Protocol):
    box_size: int

    def density_at_points(self, points_px: torch.Tensor, state: Any) -> torch.Tensor: ...

    def density_on_grid(self, state: Any, resolution: int,
                        voxel_index: torch.Tensor | None = None) -> torch.Tensor: ...


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
    """Evaluate the field at the rotated sample points ``Rᵀp`` inside the sphere, sum along z.

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

    def forward(self, field: DensityField, state: Any, rotations: torch.Tensor,
                shifts_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Render images.

        Parameters
        ----------
        field : DensityField
        state : Any
            Per-image conditioning passed to the field (batch size ``B``).
        rotations : Tensor [B, 3, 3]
        shifts_px, ctf : see :func:`form_image`.

        Returns
        -------
        Tensor [B, D, D]
        """
        d = self.box_size
        b = rotations.shape[0]
        # Row-vector form of Rᵀp: (Rᵀp)ᵀ = pᵀR, for all sphere points at once.
        pts = torch.matmul(self.points.to(rotations.dtype), rotations)  # [B, S, 3] px
        dens = field.density_at_points(pts, state).float()  # [B, S]
        proj = torch.zeros(b, d * d, dtype=dens.dtype, device=dens.device)
        proj = proj.index_add(1, self.pixel, dens)  # Σ over z (unit step), eq. 1
        return form_image(proj.reshape(b, d, d), shifts_px, ctf)


class CanonicalGridRenderer(nn.Module):
    """Per-image volume on the canonical grid, then trilinear projection at the pose.

    The head is evaluated only on voxels within ``D/2 + 2`` px of the centre: every
    trilinear neighbour of an in-sphere sample point lies there, so the result equals that
    of the full ``D³`` volume at ~55 % of the cost.

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

    def volumes(self, field: DensityField, state: Any, batch: int) -> torch.Tensor:
        """Per-image volumes ``[B, D, D, D]`` (zero outside radius ``D/2 + 2``, and outside
        the field's support when it has one: ``field.restrict_voxel_index``)."""
        d = self.box_size
        index = self.voxel_index
        restrict = getattr(field, "restrict_voxel_index", None)
        if restrict is not None:
            index = restrict(index, d)
        dens = field.density_on_grid(state, d, index)  # [B, S]
        vol = torch.zeros(batch, d ** 3, dtype=dens.dtype, device=dens.device)
        return vol.index_copy(1, index, dens).reshape(batch, d, d, d)

    def forward(self, field: DensityField, state: Any, rotations: torch.Tensor,
                shifts_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Render images; same contract as :meth:`DirectRenderer.forward`."""
        vol = self.volumes(field, state, rotations.shape[0])  # [B, D, D, D]
        # Projection in float32 even under autocast: fp16 sample coordinates would be off by
        # up to ~D/2000 px, and the FFTs of shift/CTF need float32 for non-power-of-2 D.
        proj = projector.project(vol.float(), rotations.float())  # [B, D, D], in the sphere
        return form_image(proj, shifts_px, ctf)


def make_renderer(kind: str, box_size: int) -> nn.Module:
    """``"canonical"`` → :class:`CanonicalGridRenderer`, ``"direct"`` → :class:`DirectRenderer`."""
    if kind == "canonical":
        return CanonicalGridRenderer(box_size)
    if kind == "direct":
        return DirectRenderer(box_size)
    raise ValueError(f"unknown renderer {kind!r}")
