"""Small example datasets and trained runs for tutorials, tests and the demo.

Everything is made on the fly from the embedded hinged molecule (a two-domain molecule whose
arm swings through ``n_states`` conformations), so nothing large is stored in the repository
and every output carries ground truth::

    >>> from cryoformer.examples import example_run
    >>> run_dir = example_run("work/example", minutes=1.0)     # simulate + train (CPU)
    >>> from cryoformer.trainer import load_run
    >>> run = load_run(run_dir)

Layout of ``out_dir``::

    data/            particles.mrcs, particles.star, poses.pkl, ctf.pkl, simulation.json
    data/gt/         state_XXX.mrc, state.npy, poses.pkl, motion.mrc (ground truth)
    data/perturbed_poses.pkl   (with refine_poses or pose_search: the paper's perturbed input poses)
    run/             a training run (``run_refine/`` with refine_poses, ``run_search/`` with pose_search)

Calls are idempotent: an existing dataset (``simulation.json``) or finished run
(``checkpoints/epoch_XXX.pt`` with latents) is reused, so notebooks re-run in seconds.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

from cryoformer.io.cryodrgn import read_poses_pkl, write_poses_pkl
from cryoformer.simulation.perturb import perturb_poses
from cryoformer.simulation.simulate import CtfRanges, SimulationConfig, simulate_dataset
from cryoformer.simulation.sources import maps_from_hinged_molecule
from cryoformer.trainer import TrainConfig, train
from cryoformer.trainer.run_dir import list_epochs


@dataclass(frozen=True)
class ExampleDataset:
    """Paths of an example dataset (all absolute).

    Attributes
    ----------
    root : str
        The ``data/`` directory.
    particles, star, poses, ctf : str
        ``particles.mrcs``, ``particles.star`` (RELION 3.1, poses and CTF inside), cryoDRGN
        ``poses.pkl`` and ``ctf.pkl``.
    gt_maps : list of str
        ``gt/state_XXX.mrc``, one per state.
    gt_labels, gt_poses, gt_motion : str
        ``gt/state.npy`` ([N] int state of each particle), ``gt/poses.pkl``, ``gt/motion.mrc``
        (per-voxel displacement between the end states, Å).
    box_size : int
        ``D`` in px.
    pixel_size_angstrom : float
    """

    root: str
    particles: str
    star: str
    poses: str
    ctf: str
    gt_maps: list
    gt_labels: str
    gt_poses: str
    gt_motion: str
    box_size: int
    pixel_size_angstrom: float


def _dataset_paths(root: str, box_size: int, pixel_size_angstrom: float) -> ExampleDataset:
    gt = os.path.join(root, "gt")
    maps = sorted(os.path.join(gt, f) for f in os.listdir(gt) if f.startswith("state_") and f.endswith(".mrc"))
    return ExampleDataset(
        root=root, particles=os.path.join(root, "particles.mrcs"), star=os.path.join(root, "particles.star"),
        poses=os.path.join(root, "poses.pkl"), ctf=os.path.join(root, "ctf.pkl"), gt_maps=maps,
        gt_labels=os.path.join(gt, "state.npy"), gt_poses=os.path.join(gt, "poses.pkl"),
        gt_motion=os.path.join(gt, "motion.mrc"), box_size=box_size,
        pixel_size_angstrom=pixel_size_angstrom)


def example_dataset(out_dir: str, n_particles: int = 2000, box_size: int = 64,
                    pixel_size_angstrom: float = 3.0, snr: float = 1.0, n_states: int = 10,
                    shift_range_px: float = 2.0, seed: int = 0) -> ExampleDataset:
    """Simulate the hinged molecule into ``out_dir/data`` (or reuse it if already there).

    Parameters
    ----------
    out_dir : str
    n_particles : int
    box_size : int
        ``D`` in px.
    pixel_size_angstrom : float
        Å/px.
    snr : float
        Signal-to-noise ratio (signal variance inside the particle / noise variance). The
        default 1.0 lets a few CPU minutes of training resolve the motion; real data are
        nearer 0.01–0.1 (use the CLI's ``simulate`` for benchmarks).
    n_states : int
        Conformations along the hinge motion; particles are spread evenly over them.
    shift_range_px : float
        Maximum in-plane shift per axis (px).
    seed : int

    Returns
    -------
    ExampleDataset
    """
    root = os.path.abspath(os.path.join(out_dir, "data"))
    if not os.path.isfile(os.path.join(root, "simulation.json")):
        maps = maps_from_hinged_molecule(n_states, box_size, pixel_size_angstrom)
        config = SimulationConfig(n_particles=n_particles, snr=snr, shift_range_px=shift_range_px,
                                  ctf=CtfRanges(), contrast="relion", seed=seed)
        simulate_dataset(maps.volumes, maps.pixel_size_angstrom, config, root,
                         motion_map=maps.motion_map, source_description=maps.description)
    return _dataset_paths(root, box_size, pixel_size_angstrom)


def _finished(run_dir: str) -> bool:
    try:
        return bool(list_epochs(run_dir))
    except Exception:  # not a run directory (yet)
        return False


def _starting_poses(data: ExampleDataset, refine_poses: bool, pose_search: bool, seed: int):
    """The poses training starts from and the extra :class:`TrainConfig` options: the true poses,
    or (``refine_poses``, ``pose_search``) the paper's perturbed poses with that refinement."""
    if not (refine_poses or pose_search):
        return data.poses, {}
    poses = os.path.join(data.root, "perturbed_poses.pkl")
    if not os.path.isfile(poses):
        gt = read_poses_pkl(data.gt_poses, box_size=data.box_size)
        write_poses_pkl(perturb_poses(gt, 0.1, 2.0, seed=seed + 1), poses)
    if pose_search:
        # a search after every epoch from the first; one reference, as the data hold one state
        return poses, dict(pose_search=True, pose_search_start=1, pose_search_groups=1, gt_poses=data.gt_poses)
    # A few pose-only passes suffice here (the encoder only has to learn the given
    # poses); the trainer's default of 50 would use up a tutorial's time budget.
    return poses, dict(refine_poses=True, gt_poses=data.gt_poses, pose_pretrain_epochs=3)


def example_run(out_dir: str, minutes: float = 4.0, refine_poses: bool = False,
                n_particles: int = 2000, train_box: int = 32, epochs: int = 100,
                seed: int = 0, progress: bool = False, dataset: Optional[ExampleDataset] = None,
                pose_search: bool = False) -> str:
    """A trained run on the example dataset (made, or reused when it exists).

    Parameters
    ----------
    out_dir : str
        Holds ``data/`` and ``run/`` (``run_refine/`` with ``refine_poses``).
    minutes : float
        Training wall-clock budget (CPU minutes; training stops cleanly at it).
    refine_poses : bool
        Start from the paper's perturbed poses (rotation-vector noise σ = 0.1 rad, shifts
        ±2 px) and train with the orientation encoder, logging errors against the ground truth.
    n_particles : int
        Size of the simulated dataset (only used when it is first made).
    train_box : int
        Training box (px), Fourier-cropped from the 64 px particles on the fly.
    epochs : int
        Upper bound on epochs (the time budget usually ends training first).
    seed : int
    progress : bool
        Show the progress bar.
    dataset : ExampleDataset, optional
        Train on this dataset instead of simulating ``out_dir/data``.
    pose_search : bool
        Start from the perturbed poses, as ``refine_poses``, and refine them by projection
        matching (``--pose-search``) after every epoch, against one back-projected reference
        (one group: suited to data of one conformation, such as
        ``example_dataset(..., n_states=1)``). Excludes ``refine_poses``.

    Returns
    -------
    str
        Absolute path of the run directory (read it with
        :func:`cryoformer.trainer.load_run`).
    """
    if refine_poses and pose_search:
        raise ValueError("choose one of refine_poses and pose_search")
    data = dataset or example_dataset(out_dir, n_particles=n_particles, seed=seed)
    name = "run_refine" if refine_poses else "run_search" if pose_search else "run"
    run_dir = os.path.abspath(os.path.join(out_dir, name))
    if _finished(run_dir):
        return run_dir
    if os.path.isdir(run_dir):  # a run that never finished an epoch: start it again
        shutil.rmtree(run_dir)
    poses, extra = _starting_poses(data, refine_poses, pose_search, seed)
    # The example data are a toy at SNR 1 (real particles: ~0.1 or less): within a few minutes the
    # maps do not fit noise, while the latent space keeps organising; a held-out loss on ~100
    # images picked epoch 4 of 14 in the demo, whose end states were then far less distinct
    # (correlation with the true end states 0.80, against 0.93 at epoch 14; docs/benchmarks.md). So the
    # examples hold out nothing and use their latest epoch; real data keep the default 5 %.
    config = TrainConfig.from_flat(particles=data.particles, poses=poses, ctf=data.ctf, outdir=run_dir,
                                   box_size=train_box, epochs=epochs, max_minutes=minutes, seed=seed,
                                   device="auto", heldout_fraction=0.0, **extra)
    train(config, progress=progress, command_line="cryoformer.examples.example_run")
    return run_dir
