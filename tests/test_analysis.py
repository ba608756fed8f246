"""Analysis layer: latent space, decoding to MRC, attention maps, evaluation metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryoformer.analysis import (attention_channel_names, attention_stack, decode_volumes,
                                 decoded_voxel_size, distance_from_centre, flex_roc_auc, flex_score,
                                 fourier_crop_volume, heterogeneous_fsc, kmeans, pc_traversal, pca,
                                 resample_real, staged_directory, support_mask, write_volumes)
from cryoformer.io.mrc import read_volume, read_volume_stack


def tiny_model(box=16, zdim=4, seed=0):
    from cryoformer.model import CryoFormer, HashGridConfig, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(box_size=box, zdim=zdim, blocks_per_axis=4, encoder_hidden=16, encoder_layers=2,
                      get_query="block",  # the model these tests were written for (block GetQuery)
                      hash_backend="torch", density_head_hidden=16,
                      hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4))
    return CryoFormer(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


class BlobModel:
    """Decodes a Gaussian blob whose x position is ``z[0]`` pixels from the centre (known answer)."""

    box_size = 16

    def decode_volume(self, z, D=None):
        z = torch.as_tensor(np.asarray(z, np.float32))
        single = z.dim() == 1
        z = z.reshape(-1, z.shape[-1])
        D = D or self.box_size
        c = (torch.arange(D, dtype=torch.float32) - D // 2) * (self.box_size / D)
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        vols = torch.stack([torch.exp(-((xx - zi[0]) ** 2 + yy ** 2 + zz ** 2) / 8.0) for zi in z])
        return vols[0] if single else vols


class LookupModel:
    """Decodes ``maps[round(z[0])]``: a model whose output equals the ground truth."""

    def __init__(self, maps):
        self.maps = torch.as_tensor(maps)
        self.box_size = maps.shape[-1]

    def decode_volume(self, z, D=None):
        z = np.atleast_2d(np.asarray(z))
        return self.maps[[int(round(v)) for v in z[:, 0]]]


def three_clusters(rng, n_per=60, zdim=4):
    centres = np.array([[-6, 0, 0, 0], [0, 5, 0, 0], [6, 0, 1, 0]], dtype=float)[:, :zdim]
    z = np.concatenate([c + 0.3 * rng.standard_normal((n_per, zdim)) for c in centres])
    truth = np.repeat(np.arange(3), n_per)
    return z.astype(np.float32), truth


def test_kmeans_recovers_clusters_with_centres_on_data(rng):
    from sklearn.metrics import adjusted_rand_score

    z, truth = three_clusters(rng)
    km = kmeans(z, 3, seed=0)
    assert adjusted_rand_score(truth, km.labels) == 1.0
    # Each centre is a particle latent: the one nearest to its centroid.
    np.testing.assert_array_equal(km.centers, z[km.center_indices])
    for c, i in zip(km.centroids, km.center_indices):
        assert np.argmin(np.linalg.norm(z - c, axis=1)) == i
        assert km.labels[i] == np.argmin(np.linalg.norm(km.centroids - z[i], axis=1))
    # Clusters are numbered along PC1; same seed, same answer.
    pc1 = pca(z).projections[km.center_indices, 0]
    assert np.all(np.diff(pc1) > 0) or np.all(np.diff(pc1) < 0)
    np.testing.assert_array_equal(kmeans(z, 3, seed=0).labels, km.labels)
    assert km.sizes().tolist() == [60, 60, 60]


def test_pca_and_traversal_follow_known_direction(rng):
    direction = np.array([0.6, 0.8, 0.0, 0.0])
    t = rng.uniform(-5, 5, 400)
    z = (t[:, None] * direction + 0.05 * rng.standard_normal((400, 4))).astype(np.float32)
    p = pca(z)
    assert p.explained_variance_ratio[0] > 0.99
    assert abs(abs(p.components[0] @ direction) - 1) < 1e-3
    zt = pc_traversal(p, 1, n_points=7)
    steps = np.diff(zt @ direction)
    assert np.all(steps > 0) or np.all(steps < 0)  # monotonic along the direction
    lo, hi = np.sort([zt[0] @ direction, zt[-1] @ direction])
    assert lo == pytest.approx(np.percentile(t, 5), abs=0.2) and hi == pytest.approx(np.percentile(t, 95), abs=0.2)
    with pytest.raises(ValueError):
        pc_traversal(p, 5)


def test_traversal_volumes_move_monotonically(tmp_path, rng):
    t = rng.uniform(-4, 4, 300)
    z = np.stack([t, 0.01 * rng.standard_normal(300)], axis=1).astype(np.float32)
    zt = pc_traversal(pca(z), 1, n_points=6)
    paths = write_volumes(BlobModel(), zt, tmp_path / "pc1", voxel_size_angstrom=2.0, batch_size=4)
    assert [os.path.basename(p) for p in paths] == [f"vol_{i:03d}.mrc" for i in range(6)]
    x = np.arange(16) - 8
    centroid = []
    for path in paths:
        vol, apix = read_volume(path)
        assert apix == pytest.approx(2.0)
        centroid.append((vol.sum(axis=(0, 1)) * x).sum() / vol.sum())
    steps = np.diff(centroid)
    assert np.all(steps > 0.5) or np.all(steps < -0.5)


def test_decode_to_mrc_round_trip_scales_voxel_size(tmp_path, model):
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    apix = decoded_voxel_size(16, 2.0, 8)
    assert apix == pytest.approx(4.0)
    paths = write_volumes(model, z, tmp_path, apix, D=8, batch_size=2)
    vols = decode_volumes(model, z, D=8)
    assert vols.shape == (3, 8, 8, 8)
    for path, vol in zip(paths, vols):
        back, voxel = read_volume(path)
        np.testing.assert_allclose(back, vol, rtol=1e-5, atol=1e-8)  # batching changes round-off only
        assert voxel == pytest.approx(4.0)


def test_attention_stack_channels(tmp_path, model):
    z = np.zeros(4, np.float32)
    stack = attention_stack(model, z)
    cfg = model.config
    assert stack.shape == (cfg.token_dim + cfg.n_spatial_tokens, 16, 16, 16)
    assert len(attention_channel_names(model)) == stack.shape[0]
    queries, weights = model.attention_volumes(z)
    # Block GetQuery: every voxel of block (0, 0, 0) (4 voxels a side) carries that block's query.
    np.testing.assert_allclose(stack[: cfg.token_dim, :4, :4, :4],
                               queries[0, 0, 0].numpy()[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(4, 3),
                               rtol=1e-6)
    np.testing.assert_allclose(stack[cfg.token_dim:].sum(axis=0), 1.0, atol=1e-5)  # softmax weights
    from cryoformer.io.mrc import write_volume

    write_volume(tmp_path / "attn.mrc", stack, 3.0)
    back, voxel = read_volume_stack(tmp_path / "attn.mrc")
    np.testing.assert_array_equal(back, stack)


def test_flex_score_range_and_determinism(model):
    z = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    for method in ("queries", "weights"):
        s = flex_score(model, z, method=method, max_latents=6 if method == "weights" else None)
        assert s.shape == (16, 16, 16) and s.dtype == np.float32
        assert s.min() >= 0 and s.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(flex_score(model, z), flex_score(model, z))
    assert not flex_score(model, z[:1]).any()  # one latent: no variability


def test_fourier_crop_volume_is_mean_preserving_and_exact_for_band_limited():
    D, d = 16, 8
    assert np.allclose(fourier_crop_volume(np.full((D, D, D), 3.0), d), 3.0, atol=1e-6)
    c = np.arange(D) - D // 2
    vol = np.cos(2 * np.pi * 2 * c / D)[None, None, :] * np.ones((D, D, 1))  # 2 cycles per box
    small = fourier_crop_volume(vol, d)
    cs = np.arange(d) - d // 2
    np.testing.assert_allclose(small, np.cos(2 * np.pi * 2 * cs / d)[None, None, :] * np.ones((d, d, 1)),
                               atol=1e-5)
    # Real-space resampling keeps the centre voxel fixed.
    r = resample_real(distance_from_centre(D), d)
    np.testing.assert_allclose(r, distance_from_centre(d) * 2, atol=1e-5)


def test_fsc_of_perfect_reconstruction_is_nyquist(rng):
    maps = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    lookup = LookupModel(maps)
    states = {0: np.array([0.0, 0.0]), 1: np.array([1.0, 0.0])}
    res = heterogeneous_fsc(lookup, states, maps, voxel_size_angstrom=1.5)
    for r in res.values():
        assert r.resolution(0.5) == pytest.approx(3.0)  # Nyquist = 2 × voxel size
        assert r.au_fsc == pytest.approx(0.5, abs=1e-6)
    # The wrong state's map correlates at chance level.
    wrong = heterogeneous_fsc(lookup, {0: states[1]}, maps, 1.5)[0]
    assert wrong.au_fsc < 0.2


def test_roc_auc_perfect_score_and_distance_baseline_on_radial_motion():
    D = 16
    r = distance_from_centre(D)
    motion = np.where(r < 7, r, 0.0)  # radially symmetric: outer shell of the ball moves most
    support = r < 7
    res = flex_roc_auc({"perfect": motion, "distance_from_centre": r, "inverse": -r}, motion, 3.5, support)
    assert res["auc"]["perfect"] == 1.0
    assert res["auc"]["distance_from_centre"] == 1.0
    assert res["auc"]["inverse"] == 0.0
    assert 0 < res["n_moving"] < res["n_voxels"] == int(support.sum())
    undefined = flex_roc_auc({"perfect": motion}, motion, 100.0, support)
    assert undefined["auc"]["perfect"] is None and "note" in undefined


def test_support_mask():
    maps = np.zeros((2, 8, 8, 8), np.float32)
    maps[0, 1, 1, 1], maps[1, 5, 5, 5] = 1.0, 10.0
    s = support_mask(maps, 0.5)
    assert s.sum() == 2 and s[1, 1, 1] and s[5, 5, 5]


def test_staged_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as stage:
            open(os.path.join(stage, "a.txt"), "w").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with staged_directory(target) as stage:
        open(os.path.join(stage, "a.txt"), "w").close()
    with staged_directory(target) as stage:  # merge keeps a.txt
        open(os.path.join(stage, "b.txt"), "w").close()
    assert sorted(os.listdir(target)) == ["a.txt", "b.txt"]
    with staged_directory(target, replace=True) as stage:
        open(os.path.join(stage, "c.txt"), "w").close()
    assert os.listdir(target) == ["c.txt"]
    assert os.listdir(tmp_path) == ["out"]
