"""Real-space projection of volumes at given poses (docs/conventions.md, "Poses" and "The model: renderer").

The image of volume ``V`` at pose ``(R, s)`` is ``I(p) = Σ_z V(Rᵀ (p + s))`` with
``p = (x, y, z)`` the image-frame point and ``s = (sx, sy, 0)``: the projection
``P(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz`` moved by ``-s``. ``V`` is sampled by trilinear
interpolation (``grid_sample``, zeros outside the box) on the rotated ``D × D × D`` grid, and
the integral is the sum over the ``D`` planes (unit step, in pixel units).

Coordinates are in pixels relative to the centre voxel ``D//2`` and ordered ``(x, y, z)``;
volumes are indexed ``[z, y, x]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rotated_sample_points", "to_normalized", "project"]

# Samples per chunk when chunk_size is not given: B·D³ points cost 3 floats each for the
# grid plus one for the sampled values, so this bounds a chunk to roughly 2^23·16 B = 128 MiB.
_SAMPLES_PER_CHUNK = 2**23


def _centred_coords(D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[D]`` pixel coordinates ``i - D//2``."""
    return torch.arange(D, dtype=dtype, device=device) - D // 2


def _image_frame_points(D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[D, D, D, 3]`` image-frame points ``(x, y, z)`` indexed ``[z, y, x]``."""
    c = _centred_coords(D, dtype, device)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def rotated_sample_points(
    rotations: torch.Tensor, D: int, shifts_px: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Volume-frame coordinates of the points sampled for each image.

    Parameters
    ----------
    rotations : torch.Tensor
        ``[B, 3, 3]`` pose rotations ``R``.
    D : int
        Box size in pixels.
    shifts_px : torch.Tensor, optional
        ``[B, 2]`` in-plane shifts ``(sx, sy)`` in pixels.

    Returns
    -------
    torch.Tensor
        ``[B, D, D, D, 3]``: entry ``[b, z, y, x]`` holds ``Rᵀ (p + (sx, sy, 0))`` for the
        image-frame point ``p = (x, y, z)`` (pixels from the centre), components ``(x, y, z)``.
    """
    R = torch.as_tensor(rotations)
    p = _image_frame_points(D, R.dtype, R.device).reshape(-1, 3)  # [D³, 3]
    # Row-vector form: (Rᵀ q)ᵀ = qᵀ R, so one matmul rotates all points of every image.
    pts = p @ R  # [B, D³, 3]
    if shifts_px is not None:
        s = torch.as_tensor(shifts_px, dtype=R.dtype, device=R.device)
        s3 = torch.cat([s, torch.zeros_like(s[..., :1])], dim=-1)  # [B, 3] = (sx, sy, 0)
        pts = pts + (s3[..., None, :] @ R)  # Rᵀ(p + s) = Rᵀp + Rᵀs
    return pts.reshape(R.shape[0], D, D, D, 3)


def to_normalized(points: torch.Tensor, D: int) -> torch.Tensor:
    """Pixel coordinates → ``grid_sample`` coordinates (``align_corners=True``).

    Coordinate ``c`` (pixels from the centre) is voxel index ``c + D//2``, and with
    ``align_corners=True`` index ``0`` ↔ ``-1`` and index ``D-1`` ↔ ``+1``. The ``(x, y, z)``
    order is what ``grid_sample`` expects for a ``[.., z, y, x]`` volume (x indexes the last
    axis).

    Parameters
    ----------
    points : torch.Tensor
        ``[..., 3]`` pixel coordinates.
    D : int
        Box size.

    Returns
    -------
    torch.Tensor
        ``[..., 3]`` normalised coordinates.
    """
    return (points + D // 2) * (2.0 / (D - 1)) - 1.0


def _sphere_points(D: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-frame points with ``|p| ≤ D/2`` ([S, 3], ``(x, y, z)``) and their pixels
    ([S], flat ``y·D + x``), in ``[z, y, x]`` order."""
    p = _image_frame_points(D, dtype, device).reshape(-1, 3)  # [D³, 3]
    keep = torch.nonzero((p * p).sum(-1) <= (D / 2) ** 2).squeeze(1)  # [S]
    return p[keep], keep % (D * D)


def _sphere_weights(D: int, shifts_px, dtype, device) -> torch.Tensor:
    """``[b or 1, D, D, D]`` 1 where ``|p + s| ≤ D/2`` (= ``|Rᵀ(p + s)|``), else 0."""
    p = _image_frame_points(D, dtype, device)  # [D, D, D, 3]
    if shifts_px is None:
        r2 = (p * p).sum(-1)[None]  # [1, D, D, D]
    else:
        s = torch.as_tensor(shifts_px, dtype=dtype, device=device)
        s3 = torch.cat([s, torch.zeros_like(s[..., :1])], dim=-1)  # [b, 3]
        q = p[None] + s3[:, None, None, None, :]  # [b, D, D, D, 3]
        r2 = (q * q).sum(-1)
    return (r2 <= (D / 2) ** 2).to(dtype)


def project(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    shifts_px: Optional[torch.Tensor] = None,
    restrict_to_sphere: bool = True,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Project volume(s) at the given poses: ``I(p) = Σ_z V(Rᵀ(p + s))``.

    Parameters
    ----------
    volume : torch.Tensor
        ``[D, D, D]`` (one volume for all poses) or ``[B, D, D, D]`` (one per pose), indexed
        ``[z, y, x]``.
    rotations : torch.Tensor
        ``[B, 3, 3]`` pose rotations ``R`` (docs/conventions.md).
    shifts_px : torch.Tensor, optional
        ``[B, 2]`` shifts ``(sx, sy)`` in pixels; the image moves by ``-s``.
    restrict_to_sphere : bool
        Integrate only over sample points within radius ``D/2`` of the centre (in the volume
        frame; the set is the same for every rotation, so projections of a volume at
        different poses see the same region).
    chunk_size : int, optional
        Images per chunk; default keeps about ``2^23`` sample points per chunk. Memory grows
        with ``chunk_size · D³``.

    Returns
    -------
    torch.Tensor
        ``[B, D, D]`` images ``[y, x]`` in the volume's units × pixels (a sum over ``z``).
        Differentiable with respect to ``volume``, ``rotations`` and ``shifts_px``.
    """
    D = volume.shape[-1]
    if volume.shape[-3:] != (D, D, D) or volume.dim() not in (3, 4):
        raise ValueError(f"volume must be [D, D, D] or [B, D, D, D], got {tuple(volume.shape)}")
    R = torch.as_tensor(rotations, device=volume.device).to(volume.dtype)
    B = R.shape[0]
    if volume.dim() == 4 and volume.shape[0] != B:
        raise ValueError(f"{volume.shape[0]} volumes for {B} rotations")
    if shifts_px is not None:
        shifts_px = torch.as_tensor(shifts_px, device=volume.device).to(volume.dtype)
    if chunk_size is None:
        chunk_size = max(1, _SAMPLES_PER_CHUNK // D**3)

    sphere_only = restrict_to_sphere and shifts_px is None
    if sphere_only:
        # Without shifts the kept points are the same |p| ≤ D/2 for every image (~52 % of
        # the D³ grid): sample only those and sum them into their pixels, instead of sampling
        # the whole grid and zeroing the rest (half the interpolation work, forward and
        # backward — the canonical renderer's projection while training).
        points, pixel = _sphere_points(D, R.dtype, volume.device)  # [S, 3], [S]
    out = []
    for start in range(0, B, chunk_size):
        sl = slice(start, min(start + chunk_size, B))
        if sphere_only:
            out.append(_project_sphere_chunk(volume, R, sl, points, pixel))
        else:
            sh = None if shifts_px is None else shifts_px[sl]
            out.append(_project_grid_chunk(volume, R, sl, sh, restrict_to_sphere))
    return torch.cat(out, dim=0)


def _project_sphere_chunk(volume: torch.Tensor, R: torch.Tensor, sl: slice, points: torch.Tensor,
                          pixel: torch.Tensor) -> torch.Tensor:
    """Images ``sl`` of :func:`project` without shifts: sample only the in-sphere ``points``
    ``[S, 3]`` and add each into its ``pixel`` ``[S]`` → ``[b, D, D]``."""
    D = volume.shape[-1]
    b = sl.stop - sl.start
    grid = to_normalized(points @ R[sl], D)  # [b, S, 3]
    n_pts = grid.shape[1]
    if volume.dim() == 3:
        vals = F.grid_sample(volume[None, None], grid.reshape(1, 1, 1, b * n_pts, 3),
                             mode="bilinear", padding_mode="zeros", align_corners=True)
    else:
        vals = F.grid_sample(volume[sl, None], grid.reshape(b, 1, 1, n_pts, 3),
                             mode="bilinear", padding_mode="zeros", align_corners=True)
    vals = vals.reshape(b, n_pts)
    image = vals.new_zeros(b, D * D).index_add(1, pixel, vals)  # Σ along z
    return image.reshape(b, D, D)


def _project_grid_chunk(volume: torch.Tensor, R: torch.Tensor, sl: slice, sh: Optional[torch.Tensor],
                        restrict_to_sphere: bool) -> torch.Tensor:
    """Images ``sl`` of :func:`project` on the whole rotated ``D³`` grid (shifts ``sh`` ``[b, 2]``
    or None), zeroed outside the sphere when asked, summed along z → ``[b, D, D]``."""
    D = volume.shape[-1]
    b = sl.stop - sl.start
    grid = to_normalized(rotated_sample_points(R[sl], D, sh), D)  # [b, D, D, D, 3]
    if volume.dim() == 3:
        # One shared volume: stack the chunk's grids along depth instead of copying the
        # volume b times (grid_sample needs equal batch sizes for input and grid).
        vals = F.grid_sample(
            volume[None, None], grid.reshape(1, b * D, D, D, 3),
            mode="bilinear", padding_mode="zeros", align_corners=True,
        ).reshape(b, D, D, D)  # [b, z, y, x]
    else:
        vals = F.grid_sample(
            volume[sl, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )[:, 0]  # [b, z, y, x]
    if restrict_to_sphere:
        vals = vals * _sphere_weights(D, sh, vals.dtype, vals.device)
    return vals.sum(dim=1)  # integrate along z → [b, D, D]
