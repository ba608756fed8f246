"""Decoding volumes at latents and writing them as MRC maps.

A :class:`~cryoformer.model.CryoFormer` decodes a volume from a latent alone
(:meth:`~cryoformer.model.CryoFormer.decode_volume`). The decoded volume always spans the
training box, so decoding at ``D`` voxels gives a voxel size of
``pixel_size_angstrom · box_size / D`` (:func:`decoded_voxel_size`).

Output directories are *staged* (:func:`staged_directory`): files are written to a hidden
sibling directory that replaces (or is merged into) the target only when everything succeeded,
so a failed or interrupted command never leaves a half-written result behind.

:class:`VolumeOptions` are the options every map-writing command shares (``eval-vol``,
``traverse``): mirror the hand, invert the sign, low-pass to a resolution, number the files
from a given index. They are declared once here and become command-line flags through
:func:`cryoformer.options.add_arguments`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cryoformer.errors import InputError, PathLike
from cryoformer.io.atomic import staged_directory  # noqa: F401  (part of this module's API)
from cryoformer.io.mrc import write_volume
from cryoformer.metrics.heterogeneity import lowpass_gaussian
from cryoformer.options import option

__all__ = ["decoded_voxel_size", "decode_volumes", "iter_decoded", "write_volumes", "staged_directory",
           "VolumeOptions", "flip_hand", "lowpass_cosine", "postprocess_volume", "LOW_PASS_SHAPES"]

LOW_PASS_SHAPES = ("gaussian", "cosine")
# Width (Fourier shells, 1/(D·voxel size) each) of the raised-cosine edge of ``lowpass_cosine``:
# two shells, as RELION's default low-pass edge, ring no more than a Gaussian would.
COSINE_EDGE_SHELLS = 2.0


@dataclass(frozen=True)
class VolumeOptions:
    """How decoded maps are post-processed and numbered before they are written.

    Attributes
    ----------
    flip : bool
        Mirror the hand: ``z → −z`` about the centre voxel ``D//2`` (index ``i → (D − i) mod D``),
        so the flipped map stays in register with the unflipped one.
    invert : bool
        Multiply the density by −1.
    low_pass_angstrom : float or None
        Low-pass to this resolution (Å): the filter's amplitude is 1/2 there. Must exceed
        twice the voxel size (Nyquist).
    low_pass_shape : str
        ``"gaussian"`` (smooth, no ringing) or ``"cosine"`` (flat to near the cutoff, then a
        two-shell raised-cosine edge: sharper, a little ringing).
    vol_start_index : int
        Number of the first file (``vol_000.mrc`` for 0, cryoDRGN's default).
    """

    flip: bool = option("--flip", default=False, switch="store_true",
                        help="mirror the hand of the maps (z → −z about the box centre), for a map "
                             "of the wrong handedness")
    invert: bool = option("--invert", default=False, switch="store_true",
                          help="multiply the density by −1 (maps decoded from data of the other "
                               "contrast convention)")
    low_pass_angstrom: Optional[float] = option(
        "--low-pass", default=None, unit="Å", metavar="Å",
        help="low-pass the maps to this resolution in Å (filter amplitude 1/2 there); must exceed "
             "2 × the voxel size")
    low_pass_shape: str = option("--low-pass-shape", default="gaussian", choices=LOW_PASS_SHAPES,
                                 help="shape of --low-pass: gaussian (no ringing) or cosine (flat, "
                                      "then a two-shell raised-cosine edge) (default {default})")
    vol_start_index: int = option("--vol-start-index", default=0, metavar="N",
                                  help="number of the first map file (default {default}: vol_000.mrc, "
                                       "as cryoDRGN)")

    def check(self, voxel_size_angstrom: float) -> None:
        """Refuse values that cannot apply to maps of ``voxel_size_angstrom`` (Å).

        Raises
        ------
        InputError
            A low-pass resolution at or below Nyquist (``2 × voxel size``), not finite, or a
            negative start index.
        """
        res = self.low_pass_angstrom
        if res is not None and not (np.isfinite(res) and res > 2.0 * voxel_size_angstrom):
            raise InputError(None, "--low-pass", f"must be a resolution in Å above Nyquist, 2 × "
                             f"{voxel_size_angstrom:.4g} Å = {2 * voxel_size_angstrom:.4g} Å, got {res}")
        if self.vol_start_index < 0:
            raise InputError(None, "--vol-start-index", f"must be >= 0, got {self.vol_start_index}")
        if self.low_pass_shape not in LOW_PASS_SHAPES:
            raise InputError(None, "--low-pass-shape", f"expected one of {LOW_PASS_SHAPES}, "
                             f"got {self.low_pass_shape!r}")


def flip_hand(volume: np.ndarray) -> np.ndarray:
    """Mirror ``[..., D, D, D]`` maps along z about the centre voxel: ``out[k] = in[(D − k) mod D]``.

    That is ``z → −z`` in the centred coordinates of docs/conventions.md, so the centre slice
    ``D//2`` stays where it is (a plain ``[::-1]`` would also shift the map by one voxel).
    """
    vol = np.asarray(volume)
    return np.roll(np.flip(vol, axis=-3), 1, axis=-3)


def lowpass_cosine(volume: np.ndarray, voxel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    """Low-pass ``[D, D, D]`` with a raised-cosine edge whose amplitude is 1/2 at ``resolution_angstrom``.

    The gain is 1 below ``f_c − w/2``, 0 above ``f_c + w/2`` and ``(1 + cos(π(f − f_c + w/2)/w))/2``
    between, with ``f_c = 1/resolution`` (1/Å) and ``w`` = :data:`COSINE_EDGE_SHELLS` Fourier
    shells of ``1/(D · voxel size)``.

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` float64.
    """
    vol = np.asarray(volume, dtype=np.float64)
    d = vol.shape[-1]
    f = np.fft.fftfreq(d) / voxel_size_angstrom                            # [D] 1/Å
    fr = np.fft.rfftfreq(d) / voxel_size_angstrom                          # [D//2 + 1] 1/Å
    radius = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)
    fc, w = 1.0 / resolution_angstrom, COSINE_EDGE_SHELLS / (d * voxel_size_angstrom)
    t = np.clip((radius - (fc - w / 2)) / w, 0.0, 1.0)
    gain = 0.5 * (1.0 + np.cos(np.pi * t))                                # [D, D, D//2 + 1]
    return np.fft.irfftn(np.fft.rfftn(vol) * gain, s=vol.shape, axes=(0, 1, 2))


def postprocess_volume(volume: np.ndarray, voxel_size_angstrom: float, options: VolumeOptions) -> np.ndarray:
    """Apply ``options`` (low-pass, then hand flip, then sign) to one ``[D, D, D]`` map.

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` float32 (the input itself when no option is set).
    """
    vol = volume
    if options.low_pass_angstrom is not None:
        lowpass = lowpass_gaussian if options.low_pass_shape == "gaussian" else lowpass_cosine
        vol = lowpass(vol, voxel_size_angstrom, options.low_pass_angstrom)
    if options.flip:
        vol = flip_hand(vol)
    if options.invert:
        vol = -np.asarray(vol)
    return np.asarray(vol, dtype=np.float32)


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
                  progress: bool = False, desc: str = "decoding",
                  options: Optional[VolumeOptions] = None) -> List[str]:
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
        File name pattern formatted with the file number (``options.vol_start_index`` + the
        latent's index).
    options : VolumeOptions, optional
        Post-processing and numbering (default: none, numbered from 0). Call
        ``options.check(voxel_size_angstrom)`` first for a one-line error on bad values.

    Returns
    -------
    list of str
        The written paths, in latent order.
    """
    options = options or VolumeOptions()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, vol in enumerate(iter_decoded(model, z, D, batch_size, progress, desc)):
        path = os.path.join(os.fspath(out_dir), pattern.format(options.vol_start_index + i))
        write_volume(path, postprocess_volume(vol, voxel_size_angstrom, options), voxel_size_angstrom)
        paths.append(path)
    return paths
