"""GetQuery (paper eq. 5): the conditioned structure query at a point.

The ``N = n³`` structure queries own the blocks of a uniform ``n×n×n`` partition of the box
(flat block index ``z·n² + y·n + x``, :mod:`.coordinates`). They are read from a per-block
*table* ``[B, n, n, n, T]`` (the density head's ``table`` of the conditioned queries):

* ``"block"`` (paper): the query of the block holding the point;
* ``"trilinear"``: a trilinear blend of the queries of the neighbouring block centres,
  clamped to the end values outside the lattice of centres.

Two forms of the same function:

* **point form**, :func:`get_query_at_points`, at arbitrary points (direct renderer);
* **grid form**, separable: on a regular grid the 3-D weights factor into three 1-D matrices
  (:func:`interpolation_matrix`, one-hot for ``"block"``), applied by
  :func:`separable_resample`; :func:`get_query_on_grid` is the whole-grid call. The density
  field applies the matrices per z-slab and per bounding box of the requested voxels. The same
  resampler (lattice at voxel corners, ``centred=False``) upsamples a coarse ``F_S`` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .coordinates import grid_unit_coords

GET_QUERY_MODES = ("block", "trilinear")


def block_index(u: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index of the block holding each point (the paper's ``GetQuery``).

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


def get_query_at_points(table: torch.Tensor, u: torch.Tensor, mode: str) -> torch.Tensor:
    """Point form: read a per-block table at arbitrary points.

    Parameters
    ----------
    table : Tensor [B, n, n, n, T]
        Per-block entries, blocks in ``[z, y, x]`` order.
    u : Tensor [B, P, 3]
        Unit coordinates ``(x, y, z)`` of the points.
    mode : {"block", "trilinear"}

    Returns
    -------
    Tensor [B, P, T]
    """
    b, n = table.shape[0], table.shape[1]
    t = table.shape[-1]
    if mode == "block":
        idx = block_index(u, n)  # [B, P]
        flat = table.reshape(b, n ** 3, t)
        return torch.gather(flat, 1, idx.unsqueeze(-1).expand(-1, -1, t))
    # grid_sample with align_corners=False puts voxel b's centre at g = 2(b+1/2)/n - 1, i.e.
    # g = 2u - 1 reads the block-centre lattice; border padding clamps outside the centres.
    grid = (2.0 * u - 1.0).reshape(b, -1, 1, 1, 3).to(table.dtype)
    out = F.grid_sample(table.permute(0, 4, 1, 2, 3), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)  # [B, T, P, 1, 1]
    return out.reshape(b, t, -1).transpose(1, 2)


def interpolation_matrix(u: torch.Tensor, size: int, mode: str, centred: bool) -> torch.Tensor:
    """1-D resampling weights from a ``size``-lattice to points ``u`` (grid form, one axis).

    Parameters
    ----------
    u : Tensor [P]
        Unit coordinates of the output samples.
    size : int
        Number of lattice points.
    mode : {"block", "trilinear"}
        ``"block"``: one-hot on ``floor(u·size)``; ``"trilinear"``: linear interpolation.
    centred : bool
        Lattice point ``j`` sits at ``u = (j + 1/2)/size`` (block centres, GetQuery) if True,
        else at ``u = j/size`` (voxel grids, as :func:`~.coordinates.grid_unit_coords`).

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


def query_matrix(resolution: int, n: int, mode: str, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """GetQuery's 1-D weights from the ``n`` block centres to the voxels of a ``resolution``
    grid spanning the box, ``[resolution, n]`` (one-hot for ``"block"``)."""
    u = grid_unit_coords(resolution, device=device, dtype=dtype)
    return interpolation_matrix(u, n, mode, centred=True)


def get_query_on_grid(table: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """Grid form on a whole grid: per-block table ``[..., n, n, n, T]`` →
    ``[..., r, r, r, T]`` at every voxel of a ``resolution³`` grid spanning the box."""
    m = query_matrix(resolution, table.shape[-2], mode, device=table.device, dtype=table.dtype)
    return separable_resample(table, m, m, m)
