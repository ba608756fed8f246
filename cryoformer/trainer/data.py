"""Training data: particle images (memory-mapped), poses, CTF and the selected subset.

:func:`load_particle_data` opens and cross-checks every input once, before anything is
written, so bad input stops with one :class:`~cryoformer.errors.InputError`: metadata rows are
matched to images by name where the files carry names (:mod:`cryoformer.io.pairing`), the CTF
is checked against the stack's physical box and brought to its box, and every image used is
scanned once for NaN/inf pixels and blank images (:func:`cryoformer.io.validate.scan_images`).
Images stay on disk (:class:`~cryoformer.io.ImageSource` maps them), so memory is bounded by a
batch and a stack larger than RAM trains.

Each batch is ``dict(images [b, D, D], rotations [b, 3, 3], shifts_px [b, 2], ctf [b, 9],
position [b])`` at the *training* box ``D``: images Fourier-cropped from ``D₀`` when ``--box``
is given, multiplied by −1 unless ``--uninvert-data``, and divided by one global scale
(:attr:`ParticleData.image_scale`, so the learning rate does not depend on the detector's grey
units); shifts scaled by ``D/D₀``; CTF rows left in the stack's units (``ctf_images`` with the
training ``D`` keeps the physical box, docs/conventions.md). ``position`` is the row in the selected subset.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from cryoformer.errors import InputError, require_file
from cryoformer.io import load_paired_metadata, load_poses, match_rows, open_particles, scan_images
from cryoformer.io.particles import ImageSource
from cryoformer.io.safe_pickle import load_pickle
from cryoformer.metadata import CtfParameters, Poses
from cryoformer.physics.contrast import ContrastEstimate, estimate_contrast_from_source
from cryoformer.physics.fourier import fourier_crop
from cryoformer.refinement import Particles

from .config import TrainConfig

# Images used to estimate the global image scale (enough for a stable std, cheap to read).
SCALE_SAMPLE = 1000

logger = logging.getLogger(__name__)


def read_indices(path: str, n_total: int) -> np.ndarray:
    """Particle indices from a ``.npy`` or ``.pkl`` file, validated against the stack size.

    Returns
    -------
    np.ndarray [N] int64, 0-based, unique, in file order.
    """
    path = require_file(path, "index file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext == ".pkl":
            arr = np.asarray(load_pickle(path))
        else:
            raise InputError(path, None, f"unknown index file extension {ext!r} (expected .npy or .pkl)")
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(path, None, f"not a readable index array ({exc})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(path, None, f"expected a non-empty 1-D array of indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(path, None, f"expected integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_total:
        raise InputError(path, None, f"indices must be in [0, {n_total - 1}] for a stack of {n_total} "
                         f"images, found {int(arr.min())}..{int(arr.max())}")
    if np.unique(arr).size != arr.size:
        raise InputError(path, None, "indices contain duplicates")
    return arr


@dataclass(frozen=True)
class ParticleData:
    """Everything a training step reads, for the selected particles (immutable: the poses a
    run refines live in its :class:`~.state.RunState`; :meth:`with_poses` serves batches at them).

    Attributes
    ----------
    source : ImageSource
        The full stack (lazy); ``indices`` select from it.
    indices : np.ndarray [N] int64
        Selected particles, rows of the original stack (order of ``--ind``).
    poses : Poses
        Poses batches are served with, shifts in pixels of ``original_box``: the input poses
        (as loaded), or a run's current ones in a copy made by :meth:`with_poses`.
    ctf : CtfParameters or None
        CTF rows of the selected particles (cryoDRGN order) at the stack's box: column 0 is
        ``D₀`` and column 1 the Å/px at ``D₀`` whatever box the file was written for (the
        physical box is kept); or None for no CTF.
    gt_poses : Poses or None
        Ground-truth poses of the selected particles (for error reports only).
    original_box : int
        ``D₀`` of the stack (px).
    box_size : int
        ``D`` trained at (px).
    pixel_size_angstrom : float or None
        Of the stack (Å/px at ``D₀``; the CTF's when a CTF is given).
    invert : bool
        Multiply images by −1.
    image_scale : float
        Images are divided by it (std of the selected, cropped, inverted images).
    """

    source: ImageSource
    indices: np.ndarray
    poses: Poses
    ctf: Optional[CtfParameters]
    gt_poses: Optional[Poses]
    original_box: int
    box_size: int
    pixel_size_angstrom: Optional[float]
    invert: bool
    image_scale: float = 1.0

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def training_pixel_size_angstrom(self) -> Optional[float]:
        """Å/px at the training box."""
        if self.pixel_size_angstrom is None:
            return None
        return self.pixel_size_angstrom * self.original_box / self.box_size

    def with_poses(self, poses: Poses) -> "ParticleData":
        """The same particles served at ``poses`` (box ``original_box``)."""
        return dataclasses.replace(self, poses=poses)

    def search_particles(self) -> Particles:
        """What a pose search reads of these particles: the images at the original box (the
        search scores finer detail than training sees) and the CTF rows."""
        full = dataclasses.replace(self, box_size=self.original_box)
        return Particles(full.images, len(self), self.original_box, None if self.ctf is None else self.ctf.array)

    def images(self, positions: np.ndarray, normalise: bool = True) -> torch.Tensor:
        """Training images of subset rows ``positions``: ``[b, D, D]`` float32."""
        raw = torch.from_numpy(self.source.images(self.indices[positions]))  # [b, D0, D0]
        imgs = fourier_crop(raw, self.box_size) if self.box_size != self.original_box else raw
        if self.invert:
            imgs = -imgs
        return imgs / self.image_scale if normalise else imgs

    def batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """One batch (see the module docstring) for subset rows ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        scale = self.box_size / self.original_box
        out = {
            "images": self.images(positions),
            "rotations": torch.from_numpy(self.poses.rotations[positions]),
            "shifts_px": torch.from_numpy(self.poses.shifts_px[positions] * scale),
            "position": torch.from_numpy(positions),
        }
        if self.ctf is not None:
            out["ctf"] = torch.from_numpy(self.ctf.array[positions])
        return out

    def estimate_image_scale(self, seed: int) -> float:
        """Std of up to :data:`SCALE_SAMPLE` images (deterministic sample), after crop/invert."""
        rng = np.random.default_rng([seed, 7])
        n = min(len(self), SCALE_SAMPLE)
        pos = np.sort(rng.choice(len(self), size=n, replace=False))
        imgs = self.images(pos, normalise=False)
        if not torch.isfinite(imgs).all():
            # Left for the NaN guard of the training loop to report with step and epoch.
            return 1.0
        std = float(imgs.double().std())
        return std if std > 0 else 1.0


def _metadata_path(given: Optional[str], particles: str) -> Optional[str]:
    """``given``, else ``particles`` itself when it carries metadata (.star / .cs)."""
    if given is not None:
        return given
    if os.path.splitext(particles)[1].lower() in (".star", ".cs"):
        return particles
    return None


def load_particle_data(config: TrainConfig) -> ParticleData:
    """Open and cross-check the inputs named by ``config``.

    Raises
    ------
    InputError
        Missing or unreadable files, particle/pose/CTF count mismatches, metadata rows that
        name other images (:func:`cryoformer.io.match_rows`), rotations that are not rotations,
        impossible CTF values, a CTF for another physical box or several pixel sizes among the
        used particles, NaN/inf or blank images, a bad ``--ind``, or a ``--box`` that is odd or
        larger than the images.
    """
    opts = config.data
    source = open_particles(opts.particles, datadir=opts.datadir)
    d0, n_total = source.box_size, len(source)
    poses_path = _metadata_path(opts.poses, opts.particles)
    if poses_path is None:
        raise InputError(None, "--poses", f"required for {os.path.basename(opts.particles)} "
                         "(only .star/.cs particle files carry poses)")
    box = opts.box_size or d0
    if box > d0:
        raise InputError(None, "--box", f"{box} px is larger than the images ({d0} px); --box only downsamples")
    indices = read_indices(opts.ind, n_total) if opts.ind else np.arange(n_total, dtype=np.int64)
    # Rows matched to images by name, CTF at the stack's box D₀ after checking its physical
    # box D·Å/px (a .pkl keeps its own D, as in cryoDRGN: a stack downsampled after CTF
    # estimation still trains); pixel sizes must agree among the used particles only.
    meta = load_paired_metadata(source, opts.particles, poses_path, _metadata_path(opts.ctf, opts.particles),
                                datadir=opts.datadir, rows=indices, cs_class=opts.cs_class)
    apix = meta.pixel_size_angstrom
    gt = None
    if opts.gt_poses is not None:
        gt = load_poses(opts.gt_poses, box_size=d0, pixel_size_angstrom=apix)
        gt = match_rows(source, opts.particles, opts.gt_poses, len(gt), opts.datadir).apply(gt)
    rank = int(os.environ.get("RANK", "0"))
    scan_images(source, indices, progress=rank == 0)
    if rank == 0:
        for note in meta.notes:  # only once everything passed, so a refusal stays one line
            logger.info(note)
    ctf = meta.ctf
    data = ParticleData(
        source=source, indices=indices, poses=meta.poses.subset(indices),
        ctf=None if ctf is None else ctf.subset(indices),
        gt_poses=None if gt is None else gt.subset(indices),
        original_box=d0, box_size=box, pixel_size_angstrom=apix, invert=opts.invert_data)
    return dataclasses.replace(data, image_scale=data.estimate_image_scale(config.optimisation.seed))


def check_contrast(data: ParticleData, particles_path: str, seed: int) -> ContrastEstimate:
    """Refuse training when the images' contrast contradicts ``data.invert``.

    The convention is read from the data (:mod:`cryoformer.physics.contrast`: the sign of the
    phase-flipped lowest Fourier rings over up to 2000 images, a verdict only at |z| ≥ 6).
    An undecided estimate lets training go on (the caller logs it).

    Raises
    ------
    InputError
        The estimate says the other convention: names the flag that matches the data, and
        ``--no-contrast-check`` for data the user knows better (e.g. phase-flipped stacks).
    """
    est = estimate_contrast_from_source(data.source, data.poses, data.ctf, rows=data.indices,
                                        seed=seed)
    if est.invert_data is None or est.invert_data == data.invert:
        return est
    if est.invert_data:
        found = ("protein is white: RELION/cryoSPARC convention, images = -(projection * CTF)"
                 if data.ctf is not None else "protein is dark")
        fix = "train without --uninvert-data"
    else:
        found = ("protein is dark: cryoDRGN convention, images = projection * CTF"
                 if data.ctf is not None else "protein is white and there is no CTF")
        fix = "add --uninvert-data"
    raise InputError(particles_path, "contrast", f"the images say {found} (z = {est.z_score:+.1f} "
                     f"over {est.n_images} images, margin {est.margin_z:g}), which the contrast "
                     f"flag contradicts; {fix}, or pass --no-contrast-check if you are sure")

class BatchPlan:
    """Deterministic, resumable, rank-aware batches of subset rows (a distributed sampler).

    Epoch ``e`` visits a permutation drawn from ``(seed, e)`` in global batches of
    ``global_batch`` rows; rank ``r`` of ``world`` takes the ``r``-th contiguous slice of each
    global batch, so ``K`` ranks with per-rank batch ``B/K`` see exactly the images one process
    with batch ``B`` sees, step for step (DDP then averages the gradients to the same value).
    The last, partial global batch is truncated to a multiple of ``world`` (equal slices), and
    kept whole with one process. Like ``DistributedSampler`` but resumable at any batch.

    Parameters
    ----------
    n : int
        Number of particles.
    global_batch : int
    seed : int
    rank, world : int
    rows : np.ndarray [m] int64, optional
        The subset rows to visit (the training rows when images are held out); default all
        ``0..n-1``.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 rows: Optional[np.ndarray] = None) -> None:
        if global_batch % world:
            raise InputError(None, "--batch-size", f"global batch {global_batch} is not divisible "
                             f"by the {world} distributed processes")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = n if rows is None else int(self.rows.size)
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world = rank, world

    def global_batches(self, epoch: int, stream: int = 0) -> list[np.ndarray]:
        """All global batches of ``epoch`` (1-based), each [≤ B] subset rows.

        ``stream`` separates independent orders (0: training, 1: pose pre-training).
        """
        perm = np.random.default_rng([self.seed, epoch, stream]).permutation(self.n)
        if self.rows is not None:
            perm = self.rows[perm]
        batches = [perm[i:i + self.global_batch] for i in range(0, self.n, self.global_batch)]
        last = batches[-1].size - batches[-1].size % self.world
        if last == 0:
            batches.pop()
        else:
            batches[-1] = batches[-1][:last]
        return batches

    def steps_per_epoch(self) -> int:
        return len(self.global_batches(1))

    def rank_batches(self, epoch: int, start: int = 0, stream: int = 0) -> Iterator[np.ndarray]:
        """This rank's slice of the global batches ``start, start+1, …`` of ``epoch``."""
        for g in self.global_batches(epoch, stream)[start:]:
            per = g.size // self.world
            yield g[self.rank * per:(self.rank + 1) * per]


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are whole batches (arrays of subset rows).

    Used with ``DataLoader(batch_size=None, sampler=...)``: a worker reads a batch with one
    sorted, memory-mapped access per stack instead of one call per image.
    """

    def __init__(self, data: ParticleData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, positions) -> dict[str, torch.Tensor]:
        return self.data.batch(np.asarray(positions))


def make_loader(data: ParticleData, batches, num_workers: int, pin_memory: bool = False):
    """DataLoader over an iterable of position arrays (in order; workers prefetch)."""
    return torch.utils.data.DataLoader(
        BatchDataset(data), batch_size=None, sampler=list(batches), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False)
