"""Coordinate systems shared by the feature volume, GetQuery, the field and the renderers.

* **pixel coordinates** ``(x, y, z)`` relative to the box centre ``D//2`` (docs/conventions.md),
  as :func:`cryoformer.physics.projector.rotated_sample_points` returns them;
* **unit coordinates** ``u = x / D + 1/2`` in ``[0, 1]³`` — what the hash grid takes. Voxel
  ``i`` of a ``D'``-grid spanning the same box has ``u = i / D'`` (D' even), so grids of any
  resolution describe the same physical box and the centre voxel sits at ``u = 1/2``;
* **block indices** of the uniform ``n×n×n`` partition of ``[0, 1]³`` (paper §3.4): block
  ``b = floor(u · n)`` along each axis; the block centre is ``u = (b + 1/2) / n``
  (:mod:`.get_query`).

Volumes are ``[z, y, x]``; a flattened voxel / block index is ``z·n² + y·n + x``.
"""

from __future__ import annotations

import math

import torch


def pixel_to_unit(points_px: torch.Tensor, box_size: int) -> torch.Tensor:
    """Map pixel coordinates (relative to the centre ``D//2``) to unit coordinates.

    Parameters
    ----------
    points_px : Tensor [..., 3]
        ``(x, y, z)`` in pixels of the training box.
    box_size : int
        ``D`` in pixels.

    Returns
    -------
    Tensor [..., 3]
        ``u = x / D + 0.5``, clamped to ``[0, 1]`` (only corners of the cube, which the
        sphere restriction excludes, fall outside).
    """
    return (points_px / box_size + 0.5).clamp(0.0, 1.0)


def grid_unit_coords(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """1-D unit coordinates ``u_i = i / resolution`` of a grid's voxels, shape ``[resolution]``."""
    return torch.arange(resolution, device=device, dtype=dtype) / resolution


def grid_points_unit(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit coordinates of every voxel of a ``resolution³`` grid.

    Returns
    -------
    Tensor [resolution³, 3]
        ``(x, y, z)`` per voxel, voxels in ``[z, y, x]`` (C) order.
    """
    u = grid_unit_coords(resolution, device, dtype)
    zz, yy, xx = torch.meshgrid(u, u, u, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)


def sphere_voxel_index(resolution: int, radius_px: float, device=None) -> torch.Tensor:
    """Flat indices of the voxels of a ``resolution³`` grid within ``radius_px`` of the centre.

    Coordinates are ``i - resolution//2`` on each axis (docs/conventions.md).

    Returns
    -------
    LongTensor [S]
    """
    c = torch.arange(resolution, device=device, dtype=torch.float32) - resolution // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    r2 = (xx * xx + yy * yy + zz * zz).reshape(-1)
    return torch.nonzero(r2 <= radius_px * radius_px).squeeze(1)


def resolution_ratio_grid(box_size: int, out_size: int, grid_resolution: int) -> int:
    """Feature-grid resolution for decoding at ``out_size`` keeping the configured ``G/D``."""
    if grid_resolution >= box_size:
        return out_size
    return max(2, int(math.ceil(out_size * grid_resolution / box_size)))
