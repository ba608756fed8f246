"""Heterogeneity scores that a consensus map cannot pass, on maps with a known motion."""

from __future__ import annotations

import numpy as np
import pytest

from cryoformer.metrics.heterogeneity import difference_map_correlation, lowpass_gaussian, motion_mask

D, APIX = 24, 3.0


def blob(centre, sigma=2.0):
    c = np.arange(D) - D // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma ** 2))


@pytest.fixture(scope="module")
def states():
    """A fixed body (most of the mass) and a small arm sliding along x: four states."""
    body = 3 * blob((-3, 0, 0), 3.0)
    return np.stack([body + 0.5 * blob((3 + s, 3, 0)) for s in (0, 1, 2, 3)]).astype(np.float32)


def test_the_true_maps_score_one_and_a_consensus_zero(states):
    assert difference_map_correlation(states, states, APIX) == pytest.approx(1.0, abs=1e-9)
    consensus = np.broadcast_to(states.mean(axis=0), states.shape)
    assert difference_map_correlation(consensus, states, APIX) == 0.0


def test_units_and_contrast_of_the_recovered_maps_do_not_matter(states):
    assert difference_map_correlation(-7.0 * states + 2.0, states, APIX) == pytest.approx(1.0, abs=1e-6)


def test_motion_the_wrong_way_is_negative(states):
    assert difference_map_correlation(states[::-1], states, APIX) < -0.5


@pytest.mark.parametrize("seed", range(4))
def test_noisy_copies_score_high_and_half_the_motion_scores_less_than_all(states, seed):
    # Noise of the size of the state-to-state change (its std is 0.0099): 0.926-0.929 over 8 seeds.
    rng = np.random.default_rng(seed)
    noisy = states + rng.normal(scale=0.01, size=states.shape)
    assert difference_map_correlation(noisy, states, APIX) > 0.8
    # The same four maps with only the first two states' change: a partial motion.
    partial = np.stack([states[0], states[1], states[1], states[1]])
    assert 0.4 < difference_map_correlation(partial, states, APIX) < 0.85  # 0.69


def test_lowpass_halves_the_amplitude_at_its_resolution():
    d = 32
    x = np.arange(d)
    wave = np.broadcast_to(np.cos(2 * np.pi * 4 * x / d), (d, d, d))  # 4 cycles per box
    res = d * APIX / 4  # Å of that wave
    out = lowpass_gaussian(wave, APIX, res)
    assert np.abs(out).max() == pytest.approx(0.5, rel=1e-6)


def test_motion_mask_is_one_where_voxels_move_and_zero_far_away():
    motion = np.zeros((D, D, D))
    motion[10:14, 10:14, 10:14] = 5.0
    mask = motion_mask(motion, 1.0)
    assert mask[10:14, 10:14, 10:14].min() == 1.0 and mask.max() == 1.0
    assert mask[0, 0, 0] < 1e-3 and 0 < mask[12, 12, 15] < 1
    assert not motion_mask(np.zeros((D, D, D)), 1.0).any()
