"""Shared fixtures of the widget tests: one tiny dataset and one tiny trained run per session.

``tiny_run`` (session scope) is a real run directory, cheap enough for every widget test file
(Jupyter and napari alike): 40 simulated particles (D = 32, 6 Å/px, 3 hinge states, shifts up to
2 px), trained at box 16 on rows 4…39 (an ``--ind`` subset, so rows of the run differ from
indices of the stack) with ``--refine-poses`` (1 pose-only pre-training epoch, then 1 joint
epoch) from *perturbed* input poses, with ``--gt-poses`` so that ``pose_errors.csv`` is written.
A few seconds on two CPU cores.

``tiny_dataset`` describes the data: paths and the exact perturbation applied to the input poses.
``spread_run`` is a copy of ``tiny_run`` whose latents form three known groups (see its docstring).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoformer.cli import main
from cryoformer.io import read_poses_pkl, write_poses_pkl
from cryoformer.metadata import Poses
from cryoformer.trainer import list_epochs

N_STACK = 40
RUN_ROWS = np.arange(4, N_STACK)  # the --ind subset

# Triton (imported by training through torch.optim where it is installed) must load its LLVM
# before Mesa's software OpenGL (llvmpipe, what Xvfb gives napari) loads its own, or the process
# crashes; loading it here, at collection, makes the order of the test files irrelevant.
if importlib.util.find_spec("triton") is not None:
    importlib.import_module("triton")


@dataclass(frozen=True)
class TinyDataset:
    root: Path
    sim: Path                  # cryoformer simulate output (particles.star, gt/…)
    input_poses: Path          # perturbed poses the run trained from (cryoDRGN .pkl)
    ind: Path                  # .npy of the stack rows trained on
    run_rows: np.ndarray       # [N] those rows (the run's particle_indices)
    angles_rad: np.ndarray     # [N_STACK] rotation perturbation of each particle (exact geodesic error)
    shift_offsets_px: np.ndarray  # [N_STACK, 2] shift perturbation (px)


@contextlib.contextmanager
def _one_thread():
    """torch on one thread while building fixtures (the CI machine's two cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: rotation by ``angle`` (rad) about unit ``axis``."""
    x, y, z = axis / np.linalg.norm(axis)
    K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """Simulated particles with ground truth, and input poses perturbed by known amounts."""
    root = tmp_path_factory.mktemp("widgets_tiny")
    sim = root / "sim"
    with _one_thread():
        assert main(["simulate", "-o", str(sim), "-n", str(N_STACK), "-D", "32", "--Apix", "6",
                     "--n-states", "3", "--snr", "1", "--shift-range", "2", "--seed", "0"]) == 0
    truth = read_poses_pkl(sim / "gt" / "poses.pkl", box_size=32)
    rng = np.random.default_rng(7)
    angles = rng.uniform(0.05, 0.5, N_STACK)          # rad
    axes = rng.normal(size=(N_STACK, 3))
    offsets = rng.uniform(-1.5, 1.5, (N_STACK, 2))    # px
    rotations = np.stack([_rotation_about(a, t) @ R for a, t, R in zip(axes, angles, truth.rotations)])
    write_poses_pkl(Poses(rotations.astype(np.float32), (truth.shifts_px + offsets).astype(np.float32), 32),
                    root / "input_poses.pkl")
    np.save(root / "ind.npy", RUN_ROWS)
    return TinyDataset(root, sim, root / "input_poses.pkl", root / "ind.npy", RUN_ROWS.copy(), angles, offsets)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset) -> str:
    """Directory of a real 2-stage training run (see the module docstring)."""
    run_dir = tiny_dataset.root / "run"
    with _one_thread():
        assert main(["train", str(tiny_dataset.sim / "particles.star"), "-o", str(run_dir),
                     "--poses", str(tiny_dataset.input_poses), "--ind", str(tiny_dataset.ind),
                     "--gt-poses", str(tiny_dataset.sim / "gt" / "poses.pkl"),
                     "--refine-poses", "--pose-pretrain-epochs", "1", "--epochs", "1", "-b", "12",
                     "--box", "16", "--zdim", "3", "--seed", "0", "--device", "cpu"]) == 0
    return str(run_dir)


@pytest.fixture(scope="session")
def spread_run(tiny_run, tiny_dataset, tmp_path_factory) -> str:
    """``tiny_run`` with its latest latents replaced by three well-separated groups.

    What a one-epoch model puts in its latents is arbitrary; the explorer tests need latents
    with a known structure (clusters K-means must find, boxes with a known content, points far
    enough apart to decode to visibly different volumes). This copy gives each particle the
    latent ``c_s + 0.3·noise`` of its true state ``s`` (centres ``c_s`` two units apart). The
    model and every other file are the real run's.
    """
    dst = tmp_path_factory.mktemp("widgets_spread") / "run"
    shutil.copytree(tiny_run, dst)
    epoch = list_epochs(dst)[-1]
    path = dst / "latents" / f"epoch_{epoch:03d}.npy"
    z = np.load(path)
    states = np.load(tiny_dataset.sim / "gt" / "state.npy")[RUN_ROWS]
    centres = np.array([[-2.0, 0.0, 1.0], [0.0, 2.0, -1.0], [2.0, 0.0, 0.0]])[:, : z.shape[1]]
    rng = np.random.default_rng(3)
    np.save(path, (centres[states] + 0.3 * rng.normal(size=z.shape)).astype(np.float32))
    return str(dst)
