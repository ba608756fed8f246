"""Classification of particles into the back-projected groups by fit, against known states."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pytest
import torch

from cryoformer.io.mrc import read_volume
from cryoformer.refinement import Particles, PoseSearchConfig
from cryoformer.refinement.classification import classify_groups, fit_to_groups
from cryoformer.refinement.config import CLASSIFY_MIN_PARTICLES
from cryoformer.trainer import TrainConfig
from cryoformer.trainer.data import load_particle_data

D = 32


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    """The hinged molecule's two end states, 240 particles at SNR 1, D = 32, at the true poses."""
    from cryoformer.cli import main

    out = tmp_path_factory.mktemp("classify")
    assert main(["simulate", "-o", str(out), "-n", "240", "-D", str(D), "--Apix", "3", "--n-states", "2",
                 "--snr", "1", "--shift-range", "2", "--seed", "5"]) == 0
    cfg = TrainConfig.from_flat(particles=os.path.join(out, "particles.mrcs"), poses=os.path.join(out, "poses.pkl"),
                                ctf=os.path.join(out, "ctf.pkl"), outdir=os.path.join(out, "unused"))
    data = load_particle_data(cfg)
    full = dataclasses.replace(data, box_size=data.original_box)
    particles = Particles(full.images, len(data), data.original_box, data.ctf.array)
    maps = torch.stack([torch.from_numpy(read_volume(p)[0]) for p in
                        sorted(glob.glob(os.path.join(out, "gt", "state_*.mrc")))]).float()
    return particles, data.poses, np.load(os.path.join(out, "gt", "state.npy")), maps


def test_the_true_maps_fit_their_own_particles_best(two_states, single_thread):
    particles, poses, states, maps = two_states
    halves = np.arange(len(states)) % 2
    pairs = maps.repeat_interleave(2, dim=0)  # [4, D, D, D]: each state's map as both halves
    fit = fit_to_groups(pairs, particles, poses.rotations, poses.shifts_px, halves)
    assert fit.shape == (len(states), 2) and (fit >= 0).all()
    assert np.mean(fit.argmax(1) == states) > 0.9
    # at a wrong pose (rotated by 90°) the fit drops: it scores the pose, not only the density
    turned = poses.rotations @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    wrong = fit_to_groups(pairs, particles, turned, poses.shifts_px, halves)
    assert np.median(wrong.max(1)) < 0.5 * np.median(fit.max(1))


def test_classification_sharpens_noisy_groups(two_states, single_thread):
    particles, poses, states, maps = two_states
    rng = np.random.default_rng(0)
    start = np.where(rng.random(len(states)) < 0.3, 1 - states, states)  # 30 % in the wrong group
    z = np.eye(2)[start].astype(np.float32)  # latents only decide where an emptied group's members go
    groups = classify_groups(particles, poses.rotations, poses.shifts_px, start, z, rounds=2, min_group=10)
    agree = max(np.mean(groups == states), np.mean(groups == 1 - states))
    assert np.mean(start == states) < 0.75 and agree > 0.9
    # no rounds: the groups as they came
    np.testing.assert_array_equal(classify_groups(particles, poses.rotations, poses.shifts_px, start, z, 0), start)


def test_the_defaults_classify_from_ten_thousand_particles():
    c = PoseSearchConfig()
    assert c.groups(2000) == 4 and c.classification_rounds(2000) == 0
    assert c.groups(CLASSIFY_MIN_PARTICLES) == 5 and c.classification_rounds(CLASSIFY_MIN_PARTICLES) == 2
    assert c.groups(20000) == 10 and c.groups(500_000) == 16
    assert PoseSearchConfig(n_references=3, classify_rounds=1).groups(20000) == 3
    assert PoseSearchConfig(classify_rounds=1).classification_rounds(100) == 1
    model = PoseSearchConfig(reference="model", classify_rounds=3)
    assert model.groups(20000) == 16 and model.classification_rounds(20000) == 0
    with pytest.raises(ValueError, match="classify_rounds"):
        PoseSearchConfig(classify_rounds=-1)
