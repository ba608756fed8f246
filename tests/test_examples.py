"""Example datasets/runs (used by notebooks and the demo) and the paper's pose perturbation."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from cryoformer.examples import example_dataset, example_run
from cryoformer.metadata import Poses
from cryoformer.physics.rotations import geodesic_distance, random_rotations
from cryoformer.simulation.perturb import perturb_poses


def test_perturbation_matches_the_papers_noise_model():
    n = 20000
    shifts = np.zeros((n, 2), np.float32)
    # At the identity the error angle is exactly |noise| = σ·χ₃, whose median is 1.5382 σ.
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    noisy = perturb_poses(Poses(eye, shifts, 64), sigma_rad=0.1, shift_px=2.0, seed=3)
    err = geodesic_distance(torch.from_numpy(noisy.rotations), torch.from_numpy(eye.copy())).numpy()
    assert abs(np.median(err) - 0.15382) < 0.004
    # Away from it, noise on the rotation vector moves the rotation by less (the exponential
    # map contracts), as in the paper's procedure: a median of ≈ 0.13 rad for uniform poses.
    rot = random_rotations(n, generator=torch.Generator().manual_seed(0)).numpy()
    noisy = perturb_poses(Poses(rot, shifts, 64), sigma_rad=0.1, shift_px=2.0, seed=3)
    err = geodesic_distance(torch.from_numpy(noisy.rotations), torch.from_numpy(rot)).numpy()
    assert 0.11 < np.median(err) < 0.15
    assert np.abs(noisy.shifts_px).max() <= 2.0 and abs(noisy.shifts_px.std() - 2 / np.sqrt(3)) < 0.02
    assert noisy.box_size == 64
    again = perturb_poses(Poses(rot, shifts, 64), 0.1, 2.0, seed=3)
    np.testing.assert_array_equal(again.rotations, noisy.rotations)


def test_example_run_is_made_once_and_reused(tmp_path):
    run_dir = example_run(str(tmp_path), minutes=0.5, n_particles=48, epochs=1, train_box=16)
    from cryoformer.trainer import load_run

    run = load_run(run_dir)
    assert run.latents.shape[0] == 48 and run.box_size == 16
    data = example_dataset(str(tmp_path))
    assert len(data.gt_maps) == 10 and np.load(data.gt_labels).shape == (48,)
    stamp = os.path.getmtime(os.path.join(run_dir, "config.yaml"))
    assert example_run(str(tmp_path), minutes=0.5) == run_dir  # reused, not retrained
    assert os.path.getmtime(os.path.join(run_dir, "config.yaml")) == stamp


def test_example_pose_search_run(tmp_path):
    """``pose_search=True``: perturbed poses, a search after the epoch, errors against the truth."""
    data = example_dataset(str(tmp_path), n_particles=48, n_states=1)
    assert len(data.gt_maps) == 1
    run_dir = example_run(str(tmp_path), minutes=2, epochs=1, train_box=16, dataset=data, pose_search=True)
    assert os.path.basename(run_dir) == "run_search"
    errors = pd.read_csv(os.path.join(run_dir, "pose_errors.csv"))
    assert list(errors.stage) == ["input", "search"]
    assert errors.rotation_median_rad.iloc[0] > 0.05  # started from the perturbed poses
    assert os.path.isfile(os.path.join(run_dir, "poses", "epoch_001.pkl"))
    with pytest.raises(ValueError, match="one of"):
        example_run(str(tmp_path), refine_poses=True, pose_search=True)
