"""Where a renderer wants the density: the message from renderer to density field.

A renderer names its sample sites with one of these; the model asks the density field for
the density there and gives the result back to the renderer. Keeping them apart from both
lets the field and the renderer each depend on this small module and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PointSites", "GridSites"]


@dataclass(frozen=True)
class PointSites:
    """Density wanted at arbitrary points.

    Attributes
    ----------
    points_px : Tensor [B, S, 3]
        ``(x, y, z)`` in pixels relative to the box centre.
    """

    points_px: torch.Tensor


@dataclass(frozen=True)
class GridSites:
    """Density wanted on voxels of a ``resolution³`` grid spanning the box.

    Attributes
    ----------
    resolution : int
        Grid edge in voxels.
    voxel_index : LongTensor [S] or None
        Sorted flat ``[z, y, x]`` voxel ids; None = every voxel.
    """

    resolution: int
    voxel_index: torch.Tensor | None = None
