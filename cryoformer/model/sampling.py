"""Coordinate conventions shared by the feature volume, the queries and the renderers.

Three coordinate systems appear in the model:

* **pixel coordinates** ``(x, y, z)`` relative to the box centre ``D//2`` (docs/conventions.md), as
  :func:`cryoformer.physics.projector.rotated_sample_points` returns them;
* **unit coordinates** ``u = x / D + 1/2`` in ``[0, 1]³`` — what the hash grid takes. Voxel
  ``i`` of a ``D'``-grid spanning the same box has ``u = i / D'`` (D' even), so grids of any
  resolution describe the same physical box and the centre voxel sits at ``u = 1/2``;
* **block indices** of the uniform ``n×n×n`` partition of ``[0, 1]³`` (paper §3.4): block
  ``b = floor(u · n)`` along each axis; the block centre is ``u = (b + 1/2) / n``.

Volumes are ``[z, y, x]``; a flattened voxel / block index is ``z·n² + y·n + x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def block_index(u: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index of the block holding each point (paper's ``GetQuery``).

    Parameters
    ----------
    u : Tensor [..., 3]
        Unit coordinates ``(x, y, z)``.
    n : int
        Blocks per axis.

    Returns
    -------
    LongTensor [...]
        ``bz·n² + by·n + bx`` with ``b = clamp(floor(u·n), 0, n-1)``.
    """
    b = torch.floor(u * n).long().clamp_(0, n - 1)
    return (b[..., 2] * n + b[..., 1]) * n + b[..., 0]


def sample_block_volume(volume: torch.Tensor, u: torch.Tensor, mode: str) -> torch.Tensor:
    """Read a per-block table at arbitrary points, by block or trilinear between block centres.

    Parameters
    ----------
    volume : Tensor [B, n, n, n, F]
        Per-block features, blocks in ``[z, y, x]`` order.
    u : Tensor [B, P, 3]
        Unit coordinates ``(x, y, z)`` of the points.
    mode : {"block", "trilinear"}

    Returns
    -------
    Tensor [B, P, F]
    """
    b, n = volume.shape[0], volume.shape[1]
    feat = volume.shape[-1]
    if mode == "block":
        idx = block_index(u, n)  # [B, P]
        flat = volume.reshape(b, n ** 3, feat)
        return torch.gather(flat, 1, idx.unsqueeze(-1).expand(-1, -1, feat))
    # grid_sample with align_corners=False puts voxel b's centre at g = 2(b+1/2)/n - 1, i.e.
    # g = 2u - 1 reads the block-centre lattice; border padding clamps outside the centres.
    grid = (2.0 * u - 1.0).reshape(b, -1, 1, 1, 3).to(volume.dtype)
    out = F.grid_sample(volume.permute(0, 4, 1, 2, 3), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)  # [B, F, P, 1, 1]
    return out.reshape(b, feat, -1).transpose(1, 2)


def interpolation_matrix(u: torch.Tensor, size: int, mode: str, centred: bool) -> torch.Tensor:
    """1-D resampling weights from a ``size``-lattice to points ``u``.

    Parameters
    ----------
    u : Tensor [P]
        Unit coordinates of the output samples.
    size : int
        Number of lattice points.
    mode : {"block", "trilinear"}
        ``"block"``: one-hot on ``floor(u·size)``; ``"trilinear"``: linear interpolation.
    centred : bool
        Lattice point ``j`` sits at ``u = (j + 1/2)/size`` (block centres) if True, else at
        ``u = j/size`` (voxel grids, same convention as :func:`grid_unit_coords`).

    Returns
    -------
    Tensor [P, size]
        Rows sum to one; outside the lattice the nearest end value is used (clamping).
    """
    w = torch.zeros(u.shape[0], size, dtype=u.dtype, device=u.device)
    rows = torch.arange(u.shape[0], device=u.device)
    if mode == "block" or size == 1:
        j = torch.floor(u * size).long().clamp(0, size - 1)
        w[rows, j] = 1.0
        return w
    c = (u * size - (0.5 if centred else 0.0)).clamp(0, size - 1)  # continuous lattice index
    j0 = torch.floor(c).long().clamp(max=size - 2)
    t = c - j0
    w[rows, j0] = 1.0 - t
    w[rows, j0 + 1] += t
    return w


def separable_resample(volume: torch.Tensor, mz: torch.Tensor, my: torch.Tensor,
                       mx: torch.Tensor) -> torch.Tensor:
    """Apply 1-D resampling matrices along z, y, x (exact trilinear / block resampling).

    Parameters
    ----------
    volume : Tensor [..., a, b, c, F]
        Channels-last volume, axes ``[z, y, x]``.
    mz, my, mx : Tensor [Dz, a], [Dy, b], [Dx, c]
        Per-axis matrices from :func:`interpolation_matrix`.

    Returns
    -------
    Tensor [..., Dz, Dy, Dx, F]
    """
    out = torch.einsum("za,...abcf->...zbcf", mz, volume)
    out = torch.einsum("yb,...zbcf->...zycf", my, out)
    return torch.einsum("xc,...zycf->...zyxf", mx, out)


def resolution_ratio_grid(box_size: int, out_size: int, grid_resolution: int) -> int:
    """Feature-grid resolution for decoding at ``out_size`` keeping the configured ``G/D``."""
    if grid_resolution >= box_size:
        return out_size
    return max(2, int(math.ceil(out_size * grid_resolution / box_size)))
