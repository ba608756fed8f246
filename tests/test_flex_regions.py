"""The density-response flexible-region score and its regions (cryoformer.analysis.flexible_regions)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from cryoformer.analysis import flex_score
from cryoformer.model import CryoFormer, HashGridConfig, ModelConfig
from cryoformer.analysis.flexible_regions import (FlexRegionConfig, density_flex_score, density_modes,
                                                  flexible_regions, modes_for_fraction, region_labels)

D = 20


def _ball(centre_vox, radius_vox: float, edge: int = D) -> np.ndarray:
    """``[edge]³`` soft ball (density 1 inside, a one-voxel edge) on a grid spanning the ``D³``
    box (centres in ``D``-grid voxels)."""
    c = (np.arange(edge) - edge // 2) * (D / edge) + D // 2  # [edge] D-grid coordinate
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt((zz - centre_vox[0]) ** 2 + (yy - centre_vox[1]) ** 2 + (xx - centre_vox[2]) ** 2)
    return np.clip(radius_vox + 0.5 - r, 0.0, 1.0)


class DomainModel:
    """A stand-in decoder: a fixed body, and arms whose positions follow latent coordinates.

    Arm ``h`` slides along x by ``3 · z[h]`` voxels. With ``jitter`` the body's density also
    gets incoherent noise that changes with every latent (a decoder's wobble, not a motion).
    """

    box_size = D

    def __init__(self, arms=((10, 5, 5),), jitter: float = 0.0):
        self.arms, self.jitter = arms, jitter
        self.body = _ball((10, 12, 11), 4.0)

    def decode_volume(self, z, D_out=None):
        edge = int(D_out or D)
        z = np.atleast_2d(np.asarray(z, np.float64))  # [b, zdim]
        body = self.body if edge == D else _ball((10, 12, 11), 4.0, edge)
        vols = []
        for zi in z:
            vol = body.copy()
            for h, (cz, cy, cx) in enumerate(self.arms):
                vol = np.maximum(vol, _ball((cz, cy, cx + 3.0 * zi[h]), 2.5, edge))
            if self.jitter:
                rng = np.random.default_rng(zlib.crc32(zi.tobytes()))  # deterministic per latent
                vol = vol + self.jitter * rng.normal(size=vol.shape) * (body > 0.5)
            vols.append(vol)
        return torch.from_numpy(np.stack(vols).astype(np.float32))  # [b, D, D, D]


def _latents(n: int, zdim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, zdim)).astype(np.float32)


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def _swept(model: DomainModel, h: int) -> np.ndarray:
    """Voxels arm ``h`` covers somewhere in its range (and the body never does)."""
    ends = [_ball((c[0], c[1], c[2] + s), 2.5) for c in model.arms[h:h + 1] for s in (-3, 0, 3)]
    return (np.max(ends, axis=0) > 0.5) & (model.body < 0.5)


def test_score_ranks_the_moving_domain_above_the_rigid_body():
    model = DomainModel()
    score = flex_score(model, _latents(64, 2), method="density")
    assert score.shape == (D, D, D) and score.dtype == np.float32
    assert score.max() == pytest.approx(1.0) and score.min() >= 0.0
    arm, body = _swept(model, 0), model.body > 0.9
    assert score[arm].mean() > 5 * score[body].mean()
    molecule = arm | body
    assert _auc(score[molecule], arm[molecule]) > 0.95


@pytest.mark.parametrize("seed", [0, 1])
def test_modes_drop_incoherent_jitter_that_the_plain_variance_counts(seed):
    model = DomainModel(jitter=0.12)
    z = _latents(96, 2, seed)
    dense = density_flex_score(model, z, config=FlexRegionConfig(smoothing_sigma_px=0.0,
                                                                 mode_variance_fraction=0.9))
    variance = density_flex_score(model, z, config=FlexRegionConfig(smoothing_sigma_px=0.0,
                                                                    mode_variance_fraction=1.0))
    arm, body = _swept(model, 0), model.body > 0.5
    molecule = arm | body
    # All modes = the voxel variance: the jittering body competes with the arm's edges
    # (measured: 0.997–1.0 against 0.90–0.95 over three latent seeds).
    assert _auc(dense[molecule], arm[molecule]) > _auc(variance[molecule], arm[molecule]) + 0.03
    assert _auc(dense[molecule], arm[molecule]) > 0.98


def test_two_independent_domains_land_in_different_regions():
    model = DomainModel(arms=((10, 5, 5), (4, 14, 15)))
    labels, score = flexible_regions(model, _latents(96, 2, seed=1))
    assert labels.max() == 2
    majors = []
    for h in range(2):
        lab = labels[_swept(model, h) & (score >= 0.3)]
        assert lab.size > 20
        major = np.bincount(lab).argmax()
        assert major > 0 and np.mean(lab == major) > 0.9
        majors.append(major)
    assert majors[0] != majors[1]
    assert not labels[model.body > 0.9].any()  # the rigid body's interior is in no region


def test_one_moving_domain_is_one_region():
    labels, _ = flexible_regions(DomainModel(), _latents(64, 2))
    assert labels.max() == 1


def test_region_labels_split_orthogonal_trajectories_and_ignore_sign():
    rng = np.random.default_rng(0)
    traj = np.zeros((2, 4, 4, 4))
    traj[0, :2] = rng.uniform(0.5, 1.0, (2, 4, 4)) * rng.choice([-1, 1], (2, 4, 4))  # leading and trailing edges
    traj[1, 2:] = rng.uniform(0.5, 1.0, (2, 4, 4))
    labels = region_labels(traj, np.ones((4, 4, 4)), FlexRegionConfig(region_threshold=0.5))
    assert set(np.unique(labels[:2])) | set(np.unique(labels[2:])) == {1, 2}
    assert len(np.unique(labels[:2])) == 1 and len(np.unique(labels[2:])) == 1


def test_modes_for_fraction():
    assert modes_for_fraction(np.array([3.0, 0.9, 0.1]), 0.9) == 1  # 9 / 9.82 ≥ 0.9
    assert modes_for_fraction(np.array([3.0, 1.0, 0.1]), 0.9) == 2  # 9 / 10.01 < 0.9
    assert modes_for_fraction(np.array([1.0, 1.0, 1.0]), 0.9) == 3
    assert modes_for_fraction(np.zeros(3), 0.9) == 1


def test_deterministic_at_a_seed_and_zero_without_variability():
    torch.manual_seed(0)
    cfg = ModelConfig(box_size=16, zdim=4, blocks_per_axis=4, encoder_hidden=16, encoder_layers=2,
                      hash_backend="torch", density_head_hidden=16,
                      hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4))
    model = CryoFormer(cfg).eval()
    z = _latents(40, model.config.zdim)
    a = flex_score(model, z)  # the default method is "density"
    np.testing.assert_array_equal(a, flex_score(model, z, method="density"))
    np.testing.assert_array_equal(a, flex_score(model, z))
    assert 0.0 <= a.min() and a.max() == pytest.approx(1.0)
    assert not flex_score(model, z[:1]).any()
    modes = density_modes(model, z, config=FlexRegionConfig(n_modes=2))
    assert modes.modes.shape == (2, 16, 16, 16) and np.all(np.diff(modes.singular_values) <= 0)
    np.testing.assert_allclose(np.linalg.norm(modes.modes.reshape(2, -1), axis=1), 1.0, rtol=1e-6)


def test_a_box_larger_than_the_mode_grid_is_resampled_from_it():
    model = DomainModel(arms=((10, 5, 5), (4, 14, 15)))
    z = _latents(48, 2)
    coarse = FlexRegionConfig(max_grid_voxels=10)  # modes on 10³, output on 20³
    labels, score = flexible_regions(model, z, D, coarse)
    assert labels.shape == score.shape == (D, D, D) and score.max() <= 1.0
    small_labels, small_score = flexible_regions(model, z, 10, coarse)
    # Voxel 2i of the fine grid sits on voxel i of the coarse one (centres coincide).
    np.testing.assert_array_equal(labels[::2, ::2, ::2], small_labels)
    np.testing.assert_allclose(score[::2, ::2, ::2], small_score, atol=1e-6)
