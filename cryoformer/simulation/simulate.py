"""Simulated particle datasets with ground truth (the ``cryoformer simulate`` pipeline).

Given ``K`` state maps, each particle gets a state, a uniform random rotation, a uniform shift,
CTF parameters drawn from ranges and white noise at a target SNR. Images are generated in
chunks and streamed to disk, so a dataset larger than memory can be made.

Image formation (docs/conventions.md)::

    clean_i   = project(V_{state_i}, R_i, s_i)                     # P(Rᵀ(p + s)) summed along z
    signal_i  = sign · real(IFFT(FFT(clean_i) · CTF_i))            # if a CTF is applied
    image_i   = signal_i + n_i,   n_i ~ N(0, σ²),  σ² = var(signal inside the particle) / SNR

``sign`` is −1 for the RELION convention (contrast-inverted particles, what ``relion_project
--ctf`` produces and what real RELION/cryoSPARC particles look like) and +1 for the cryoDRGN
convention (what cryoDRGN's model predicts; cryoDRGN trains such data with ``--uninvert-data``).
Without a CTF both conventions give the plain projection. The convention used is recorded in
``simulation.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cryoformer import __version__
from cryoformer.errors import InputError
from cryoformer.io.atomic import atomic_open, staged_directory
from cryoformer.io.cryodrgn import write_ctf_pkl, write_poses_pkl
from cryoformer.io.mrc import write_volume
from cryoformer.io.particles import StackWriter
from cryoformer.io.star import write_star
from cryoformer.metadata import CtfParameters, Poses
from cryoformer.physics.ctf import apply_ctf, ctf_images
from cryoformer.physics.noise import particle_support_mask
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations

CONTRASTS = ("relion", "cryodrgn")


@dataclass(frozen=True)
class CtfRanges:
    """Ranges the per-particle CTF parameters are drawn from (uniformly).

    Defocus V = defocus U − U(0, ``astigmatism_max_angstrom``); the astigmatism angle is
    uniform in [0, 180) degrees.
    """

    defocus_min_angstrom: float = 10000.0
    defocus_max_angstrom: float = 25000.0
    astigmatism_max_angstrom: float = 500.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift_deg: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.defocus_min_angstrom <= self.defocus_max_angstrom:
            raise ValueError("need 0 < defocus_min_angstrom <= defocus_max_angstrom")
        if self.astigmatism_max_angstrom < 0:
            raise ValueError("astigmatism_max_angstrom must be >= 0")


@dataclass(frozen=True)
class SimulationConfig:
    """How particles are drawn from the state maps.

    Attributes
    ----------
    n_particles : int
        Number of images.
    snr : float or None
        Target SNR = var(clean signal inside the particle) / var(noise); ``None`` = noise-free.
    shift_range_px : float
        In-plane shifts are uniform in ``[-shift_range_px, shift_range_px]`` pixels per axis.
    ctf : CtfRanges or None
        CTF ranges; ``None`` = no CTF (and no ``ctf.pkl``).
    contrast : {"relion", "cryodrgn"}
        Sign convention of the written images (module docstring).
    seed : int
        Seed for every random draw (states, poses, CTF, noise).
    chunk_size : int
        Images generated and written per step (bounds memory).
    state_weights : tuple of float or None
        Relative state populations; uniform when ``None``.
    """

    n_particles: int = 1000
    snr: Optional[float] = 0.1
    shift_range_px: float = 0.0
    ctf: Optional[CtfRanges] = field(default_factory=CtfRanges)
    contrast: str = "relion"
    seed: int = 0
    chunk_size: int = 256
    state_weights: Optional[Sequence[float]] = None

    def __post_init__(self) -> None:
        if self.n_particles < 1:
            raise ValueError("n_particles must be >= 1")
        if self.snr is not None and not self.snr > 0:
            raise ValueError("snr must be > 0 (or None for noise-free)")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")


@dataclass(frozen=True)
class SimulationResult:
    """Where the dataset went and what was measured while making it."""

    out_dir: str
    files: Dict[str, str]
    measured_snr: Optional[float]
    noise_std: float


def _draw_ctf(ranges: CtfRanges, n: int, D: int, apix: float, rng: np.random.Generator) -> CtfParameters:
    dfu = rng.uniform(ranges.defocus_min_angstrom, ranges.defocus_max_angstrom, n)
    dfv = dfu - rng.uniform(0.0, ranges.astigmatism_max_angstrom, n)
    return CtfParameters.from_columns(
        n,
        box_size=D,
        pixel_size_angstrom=apix,
        defocus_u_angstrom=dfu,
        defocus_v_angstrom=dfv,
        astigmatism_angle_deg=rng.uniform(0.0, 180.0, n),
        voltage_kv=ranges.voltage_kv,
        spherical_aberration_mm=ranges.spherical_aberration_mm,
        amplitude_contrast=ranges.amplitude_contrast,
        phase_shift_deg=ranges.phase_shift_deg,
    )


def _form_images(volumes, states, rotations, shifts, ctf_array, sign):
    """Clean projections ``[n, D, D]`` and the CTF-modulated signal ``[n, D, D]`` of one chunk."""
    n = rotations.shape[0]
    D = volumes.shape[-1]
    clean = torch.empty((n, D, D), dtype=torch.float32)  # [n, D, D]
    for k in torch.unique(states).tolist():
        sel = states == k
        clean[sel] = project(volumes[k], rotations[sel], shifts[sel])
    if ctf_array is None:
        return clean, clean
    signal = sign * apply_ctf(clean, ctf_images(ctf_array, D))  # [n, D, D]
    return clean, signal


def render_particle_stack(
    path: str,
    volumes: np.ndarray,
    pixel_size_angstrom: float,
    states: np.ndarray,
    poses: Poses,
    ctf: Optional[CtfParameters],
    snr: Optional[float],
    contrast: str = "relion",
    seed: int = 0,
    chunk_size: int = 256,
    progress: bool = True,
):
    """Project state maps at given poses, apply CTF and noise, and stream the images to ``path``.

    Parameters
    ----------
    path : str
        Output ``.mrcs`` (written atomically: nothing is left under this name on failure).
    volumes : np.ndarray
        ``[K, D, D, D]`` float32 maps.
    pixel_size_angstrom : float
        Pixel size written to the stack header (Å).
    states : np.ndarray
        ``[N]`` int state index of each particle (into ``volumes``).
    poses : Poses
        ``N`` poses (docs/conventions.md), shifts in pixels of ``D``.
    ctf : CtfParameters or None
        ``N`` CTF parameter rows (their box size must be ``D``), or ``None`` for no CTF.
    snr : float or None
        Target SNR (module docstring); ``None`` = noise-free.
    contrast : {"relion", "cryodrgn"}
        Sign convention of the CTF-modulated images (module docstring).

    Returns
    -------
    noise_std : float
        The noise σ used (0 when noise-free).
    measured_snr : float or None
        var(signal inside the particle support) / var(noise) over the whole stack.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}")
    vols = _checked_volumes(volumes)  # [K, D, D, D]
    N, D = len(poses), vols.shape[-1]
    rotations = torch.from_numpy(poses.rotations)  # [N, 3, 3]
    shifts = torch.from_numpy(poses.shifts_px)  # [N, 2]
    states_t = torch.from_numpy(np.asarray(states, dtype=np.int64))  # [N]
    ctf_t = None if ctf is None else torch.from_numpy(ctf.array)  # [N, 9]
    sign = -1.0 if contrast == "relion" else 1.0
    gen = torch.Generator().manual_seed(seed)

    noise_std = 0.0
    tally = _SnrTally()
    # As a context, so a failure closes the bar and the error starts on a line of its own.
    with tqdm(total=N, desc="project", unit="img", disable=not progress) as bar, \
            StackWriter(path, N, D, pixel_size_angstrom) as writer:
        for start in range(0, N, chunk_size):
            sl = slice(start, min(N, start + chunk_size))
            clean, signal = _form_images(
                vols, states_t[sl], rotations[sl], shifts[sl], None if ctf_t is None else ctf_t[sl], sign
            )
            mask = particle_support_mask(clean)  # [n, D, D] bool
            inside = signal[mask].double()
            if start == 0 and snr is not None:
                noise_std = _noise_std(inside, snr, sl.stop)
            tally.add_signal(inside)
            if snr is not None:
                noise = noise_std * torch.randn(signal.shape, generator=gen)  # [n, D, D]
                tally.add_noise(noise)
                signal = signal + noise
            writer.write(signal.numpy(), start)
            bar.update(sl.stop - sl.start)
    measured_snr = None if snr is None else tally.snr(N * D * D)
    return noise_std, measured_snr


def _checked_volumes(volumes: np.ndarray) -> torch.Tensor:
    """``[K, D, D, D]`` float32 maps as a tensor; an InputError for a non-finite or constant map."""
    vols = torch.from_numpy(np.asarray(volumes, dtype=np.float32))  # [K, D, D, D]
    flat = vols.reshape(vols.shape[0], -1)  # [K, D³]
    if not torch.isfinite(flat).all():
        raise InputError(None, "map", "holds NaN or infinite voxels; nothing can be projected")
    constant = torch.nonzero(flat.amax(1) == flat.amin(1)).flatten()
    if constant.numel():
        # Its projections carry no signal: no noise level gives the asked SNR (0/0), and a
        # stack of empty images would train nothing.
        raise InputError(None, "map", f"state {int(constant[0])} is constant (every voxel "
                         f"{float(flat[constant[0], 0]):g}); its projections would be empty")
    return vols


def _noise_std(inside: torch.Tensor, snr: float, n_images: int) -> float:
    """Noise σ giving ``snr`` for the signal ``inside`` the particles of the first ``n_images``.

    σ is fixed once, from the first chunk, as one global value (like a detector's noise
    level), so every image shares the same noise statistics.
    """
    noise_std = float(torch.sqrt(inside.var() / snr))
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise InputError(None, "--snr", f"the first {n_images} images carry no "
                         "measurable signal inside the particle, so no noise level "
                         f"gives SNR {snr:g}; check the map and the poses")
    return noise_std


@dataclass
class _SnrTally:
    """Running sums for the SNR actually achieved: signal inside the support, and noise."""

    sig_sum: float = 0.0
    sig_sq: float = 0.0
    sig_n: float = 0.0
    noise_sq: float = 0.0

    def add_signal(self, inside: torch.Tensor) -> None:
        self.sig_sum += float(inside.sum())
        self.sig_sq += float((inside**2).sum())
        self.sig_n += inside.numel()

    def add_noise(self, noise: torch.Tensor) -> None:
        self.noise_sq += float((noise.double() ** 2).sum())

    def snr(self, n_pixels: int) -> float:
        """var(signal inside the support) / var(noise) over ``n_pixels`` noise pixels."""
        var_signal = self.sig_sq / self.sig_n - (self.sig_sum / self.sig_n) ** 2
        return float(var_signal / (self.noise_sq / n_pixels))


def simulate_dataset(
    state_volumes: np.ndarray,
    pixel_size_angstrom: float,
    config: SimulationConfig,
    out_dir: str,
    motion_map: Optional[np.ndarray] = None,
    source_description: str = "",
    progress: bool = True,
    domain_motion_maps: Optional[np.ndarray] = None,
) -> SimulationResult:
    """Simulate a particle dataset from ``K`` state maps and write it with its ground truth.

    Parameters
    ----------
    state_volumes : np.ndarray
        ``[K, D, D, D]`` float32 maps (``[z, y, x]``), one per conformational state.
    pixel_size_angstrom : float
        Voxel size of the maps = pixel size of the images (Å).
    config : SimulationConfig
        Sampling parameters.
    out_dir : str
        Output directory (created). Written: ``particles.mrcs``, ``poses.pkl`` (cryoDRGN),
        ``ctf.pkl`` (cryoDRGN, when a CTF is applied), ``particles.star`` (RELION 3.1),
        ``gt/state_XXX.mrc``, ``gt/state.npy`` (state label per particle), ``gt/poses.pkl``,
        ``gt/motion.mrc`` (when ``motion_map`` is given) and ``simulation.json``.
    motion_map : np.ndarray, optional
        ``[D, D, D]`` per-voxel displacement (Å) between the end states, kept as ground truth
        for flexible-region metrics.
    source_description : str
        Free text recorded in ``simulation.json`` (where the maps came from).
    progress : bool
        Show a progress bar.
    domain_motion_maps : np.ndarray, optional
        ``[H, D, D, D]`` displacement (Å) of each independently moving domain alone, written as
        ``gt/motion_domain_H.mrc``.
    """
    vols_np = np.asarray(state_volumes, dtype=np.float32)
    if vols_np.ndim != 4 or len(set(vols_np.shape[1:])) != 1:
        raise ValueError(f"state_volumes must be [K, D, D, D], got {vols_np.shape}")
    K, D = vols_np.shape[0], vols_np.shape[-1]
    N = config.n_particles
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    weights = np.ones(K) if config.state_weights is None else np.asarray(config.state_weights, float)
    if weights.shape != (K,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"state_weights must be {K} non-negative numbers")
    states = rng.choice(K, size=N, p=weights / weights.sum())
    rotations = random_rotations(N, generator=gen)  # [N, 3, 3]
    shifts = rng.uniform(-config.shift_range_px, config.shift_range_px, (N, 2)).astype(np.float32)
    poses = Poses(rotations.numpy(), shifts, box_size=D)
    ctf = None if config.ctf is None else _draw_ctf(config.ctf, N, D, pixel_size_angstrom, rng)

    # Everything is written into a hidden directory beside ``out_dir`` and moved into it only
    # when complete: an error or Ctrl-C half way leaves no partial dataset behind.
    with staged_directory(out_dir) as stage:
        files = _write_dataset(stage, vols_np, pixel_size_angstrom, config, states, poses, ctf,
                               motion_map, source_description, progress, domain_motion_maps)
    files = {k: os.path.join(out_dir, os.path.relpath(v, stage)) for k, v in files.items()}
    record_path = files["record"]
    with open(record_path, encoding="utf-8") as fh:
        record = json.load(fh)
    return SimulationResult(out_dir, files, record["measured_snr"], record["noise_std"])


def _write_dataset(stage: str, vols_np: np.ndarray, pixel_size_angstrom: float,
                   config: SimulationConfig, states: np.ndarray, poses: Poses,
                   ctf: Optional[CtfParameters], motion_map: Optional[np.ndarray],
                   source_description: str, progress: bool,
                   domain_motion_maps: Optional[np.ndarray] = None) -> Dict[str, str]:
    """Write the particles, metadata and ground truth of :func:`simulate_dataset` into ``stage``;
    returns the written paths by role."""
    K, D = vols_np.shape[0], vols_np.shape[-1]
    N = config.n_particles
    os.makedirs(os.path.join(stage, "gt"), exist_ok=True)
    files = {"particles": os.path.join(stage, "particles.mrcs")}
    noise_std, measured_snr = render_particle_stack(
        files["particles"], vols_np, pixel_size_angstrom, states, poses, ctf, config.snr,
        config.contrast, config.seed + 1, config.chunk_size, progress,
    )

    files["poses"] = os.path.join(stage, "poses.pkl")
    write_poses_pkl(poses, files["poses"])
    files["gt_poses"] = os.path.join(stage, "gt", "poses.pkl")
    write_poses_pkl(poses, files["gt_poses"])
    if ctf is not None:
        files["ctf"] = os.path.join(stage, "ctf.pkl")
        write_ctf_pkl(ctf, files["ctf"])
    files["star"] = os.path.join(stage, "particles.star")
    image_names = [f"{i + 1:06d}@particles.mrcs" for i in range(N)]
    write_star(files["star"], poses, ctf, image_names, pixel_size_angstrom)
    files["gt_states"] = os.path.join(stage, "gt", "state.npy")
    with atomic_open(files["gt_states"], "wb") as fh:
        np.save(fh, states.astype(np.int64))
    for k in range(K):
        write_volume(os.path.join(stage, "gt", f"state_{k:03d}.mrc"), vols_np[k], pixel_size_angstrom)
    files["gt_maps"] = os.path.join(stage, "gt", "state_*.mrc")
    if motion_map is not None:
        files["gt_motion"] = os.path.join(stage, "gt", "motion.mrc")
        write_volume(files["gt_motion"], np.asarray(motion_map, np.float32), pixel_size_angstrom)
    for h, domain_map in enumerate([] if domain_motion_maps is None else domain_motion_maps):
        files[f"gt_motion_domain_{h}"] = os.path.join(stage, "gt", f"motion_domain_{h}.mrc")
        write_volume(files[f"gt_motion_domain_{h}"], np.asarray(domain_map, np.float32), pixel_size_angstrom)

    record = {
        "cryoformer_version": __version__,
        "source": source_description,
        "box_size": D,
        "pixel_size_angstrom": pixel_size_angstrom,
        "n_states": K,
        "config": dataclasses.asdict(config),
        "contrast": config.contrast,
        "contrast_note": (
            "relion: images = -(projection * CTF) (contrast-inverted, as relion_project --ctf); "
            "cryodrgn: images = projection * CTF (train cryoDRGN with --uninvert-data)"
        ),
        "noise_std": noise_std,
        "measured_snr": measured_snr,
        "files": {k: os.path.relpath(v, stage) for k, v in files.items()},
    }
    files["record"] = os.path.join(stage, "simulation.json")
    with atomic_open(files["record"], "w") as fh:
        json.dump(record, fh, indent=2)
    return files
