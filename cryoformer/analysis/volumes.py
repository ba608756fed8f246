"""Decoding volumes at latents and writing them as MRC maps.

A :class:`~cryoformer.model.CryoFormer` decodes a volume from a latent alone
(:meth:`~cryoformer.model.CryoFormer.decode_volume`). The decoded volume always spans the
training box, so decoding at ``D`` voxels gives a voxel size of
``pixel_size_angstrom · box_size / D`` (:func:`decoded_voxel_size`).

Output directories are *staged* (:func:`staged_directory`): files are written to a hidden
sibling directory that replaces (or is merged into) the target only when everything succeeded,
so a failed or interrupted command never leaves a half-written result behind.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cryoformer.errors import PathLike
from cryoformer.io.atomic import staged_directory  # noqa: F401  (part of this module's API)
from cryoformer.io.mrc import write_volume

__all__ = ["decoded_voxel_size", "decode_volumes", "iter_decoded", "write_volumes", "staged_directory"]


def decoded_voxel_size(box_size: int, pixel_size_angstrom: float, D: Optional[int] = None) -> float:
    """Voxel size (Å) of a volume decoded at ``D`` voxels from a model trained at ``box_size``."""
    D = int(D or box_size)
    return float(pixel_size_angstrom) * box_size / D


def iter_decoded(model, z: np.ndarray, D: Optional[int] = None, batch_size: int = 4,
                 progress: bool = False, desc: str = "decoding") -> Iterator[np.ndarray]:
    """Yield decoded volumes ``[D, D, D]`` float32 one at a time, decoding in batches.

    Parameters
    ----------
    model : CryoFormer
        In eval mode (the image-independent feature grid is then cached across batches).
    z : np.ndarray
        ``[M, zdim]`` latents.
    D : int, optional
        Output edge in voxels (default: the training box).
    batch_size : int
        Latents decoded together; memory grows with ``batch_size · D³``.
    progress : bool
        Show a tqdm progress bar (one tick per volume).
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))  # [M, zdim]
    bar = tqdm(total=len(z), desc=desc, unit="vol", disable=not progress, leave=False)
    try:
        for start in range(0, len(z), max(1, batch_size)):
            with torch.no_grad():
                vols = model.decode_volume(z[start:start + batch_size], D)  # [b, D, D, D]
            for v in vols.float().cpu().numpy():
                bar.update(1)
                yield v
    finally:
        bar.close()


def decode_volumes(model, z: np.ndarray, D: Optional[int] = None, batch_size: int = 4,
                   progress: bool = False) -> np.ndarray:
    """Decode latents ``[M, zdim]`` → volumes ``[M, D, D, D]`` float32 (kept in memory)."""
    vols = list(iter_decoded(model, z, D, batch_size, progress))
    if not vols:
        D = int(D or model.box_size)
        return np.zeros((0, D, D, D), dtype=np.float32)
    return np.stack(vols)


def write_volumes(model, z: np.ndarray, out_dir: PathLike, voxel_size_angstrom: float,
                  D: Optional[int] = None, pattern: str = "vol_{:03d}.mrc", batch_size: int = 4,
                  progress: bool = False, desc: str = "decoding") -> List[str]:
    """Decode latents and write one MRC per latent into ``out_dir``.

    Parameters
    ----------
    model : CryoFormer
    z : np.ndarray
        ``[M, zdim]`` latents.
    out_dir : path
        Existing (or creatable) directory.
    voxel_size_angstrom : float
        Header voxel size (Å) — use :func:`decoded_voxel_size` for the decoding box.
    D : int, optional
        Output edge in voxels.
    pattern : str
        File name pattern formatted with the latent's index.

    Returns
    -------
    list of str
        The written paths, in latent order.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, vol in enumerate(iter_decoded(model, z, D, batch_size, progress, desc)):
        path = os.path.join(os.fspath(out_dir), pattern.format(i))
        write_volume(path, vol, voxel_size_angstrom)
        paths.append(path)
    return paths


