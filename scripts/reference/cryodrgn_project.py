"""Project a volume at the poses of a cryoDRGN pose ``.pkl`` with cryoDRGN's image-formation
model.

cryoDRGN 4.3.1 ships no projection command (``project3d`` lives only in its source tree, not in
the released wheel), so this script assembles cryoDRGN's forward model from the functions its
training loop uses, which fix every convention that matters:

* volume read with ``cryodrgn.mrcfile.parse_mrc`` (array ``[z, y, x]``);
* 3-D Hartley transform with ``cryodrgn.fft.htn_center``;
* central-slice coordinates ``Lattice(D + 1).coords @ R`` exactly as ``train_nn`` /
  ``backproject_voxel`` rotate them;
* the in-plane shift with ``Lattice.translate_ht``: cryoDRGN aligns a data image ``y`` to the
  model slice by ``translate_ht(y, +trans·D)``, so the image it expects is
  ``translate_ht(slice, -trans·D)``;
* back to real space with ``cryodrgn.fft.iht2_center``.

The only piece that is ours is the interpolation of the volume's transform at the slice
coordinates (trilinear, on a 2× zero-padded transform, like RELION's projector); cryoDRGN
evaluates a neural network there instead.

Usage: python cryodrgn_project.py VOLUME.mrc POSES.pkl OUT.mrcs
"""

from __future__ import annotations

import sys

import mrcfile
import numpy as np
import torch
import torch.nn.functional as F
from cryodrgn import fft, utils
from cryodrgn.lattice import Lattice
from cryodrgn.mrcfile import parse_mrc

PAD = 2


def project(vol: np.ndarray, rot: np.ndarray, trans_px: np.ndarray) -> np.ndarray:
    D = vol.shape[0]
    Dp = PAD * D
    padded = np.zeros((Dp, Dp, Dp), dtype=np.float64)
    a = (Dp - D) // 2  # centre voxel D//2 lands on Dp//2
    padded[a : a + D, a : a + D, a : a + D] = vol
    vol_ht = fft.htn_center(torch.tensor(padded))  # [kz, ky, kx], DC at Dp//2

    lattice = Lattice(D + 1, extent=0.5)  # coords in cycles/pixel, step 1/D
    coords = lattice.coords.to(torch.float64)
    R = torch.tensor(rot, dtype=torch.float64)
    k = coords @ R  # [B, (D+1)^2, 3], as train_nn: model(lattice.coords @ rot)
    idx = Dp // 2 + k * Dp  # index in the padded transform, (x, y, z) order
    grid = idx / (Dp - 1) * 2 - 1  # grid_sample, align_corners=True
    B = R.shape[0]
    slices = F.grid_sample(
        vol_ht[None, None].expand(B, 1, Dp, Dp, Dp),
        grid.view(B, 1, 1, -1, 3),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    ).view(B, -1)

    t = torch.tensor(trans_px, dtype=torch.float32)  # Lattice.freqs2d is float32
    shifted = lattice.translate_ht(slices, -t.unsqueeze(1)).view(B, D + 1, D + 1)
    images = fft.iht2_center(shifted[:, :D, :D])
    return images.numpy().astype(np.float32)


def main(volume_path: str, poses_path: str, out: str) -> None:
    vol, header = parse_mrc(volume_path)
    vol = np.asarray(vol, dtype=np.float64)
    D = vol.shape[0]
    rot, trans = utils.load_pkl(poses_path)
    images = project(vol, np.asarray(rot), np.asarray(trans) * D)
    with mrcfile.new(out, overwrite=True) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = float(header.apix) if hasattr(header, "apix") else 1.0
        mrc.header.label[0] = b"cryoformer: cryoDRGN-model projections (cryodrgn_project.py)"  # no timestamp: stable bytes
    print(f"wrote {out}: {images.shape}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
