"""UMAP of the latents: cluster structure kept, fit-on-subset + transform, seeds, the optional
dependency, and the summary figure that draws it beside the PCA."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cryoformer.analysis.latent_space import umap_available, umap_embedding
from cryoformer.analysis.summary import plot_summary

needs_umap = pytest.mark.skipif(not umap_available(), reason="umap-learn is not installed (cryoformer[umap])")


def clusters(n: int, zdim: int = 8, k: int = 4, seed: int = 0):
    """``[n, zdim]`` latents around ``k`` centres 10 σ apart, and their labels ``[n]``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, zdim)) * 10.0
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.normal(size=(n, zdim))).astype(np.float32), labels


def neighbour_label_agreement(xy: np.ndarray, labels: np.ndarray, queries: np.ndarray, pool: np.ndarray) -> float:
    """Share of ``queries`` rows whose nearest ``pool`` row in ``xy`` has the same label."""
    d = ((xy[queries, None, :] - xy[None, pool, :]) ** 2).sum(-1)  # [q, p]
    d[queries[:, None] == pool[None, :]] = np.inf  # not itself
    return float(np.mean(labels[pool[np.argmin(d, axis=1)]] == labels[queries]))


@needs_umap
def test_umap_keeps_well_separated_clusters():
    from sklearn.manifold import trustworthiness

    z, labels = clusters(1200)
    xy = umap_embedding(z, seed=0)
    assert xy.shape == (1200, 2) and xy.dtype == np.float32 and np.all(np.isfinite(xy))
    rows = np.arange(1200)
    assert neighbour_label_agreement(xy, labels, rows, rows) > 0.99
    # Four blobs 10 σ apart: each cluster's UMAP spread is far smaller than the gaps between them.
    means = np.stack([xy[labels == c].mean(0) for c in range(4)])
    spread = max(np.linalg.norm(xy[labels == c] - means[c], axis=1).mean() for c in range(4))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 3 * spread
    assert trustworthiness(z, xy, n_neighbors=10) > 0.9


@needs_umap
def test_fit_on_subset_places_the_rest_with_their_cluster():
    z, labels = clusters(3000, seed=1)
    xy = umap_embedding(z, seed=3, fit_max=500)
    assert xy.shape == (3000, 2) and np.all(np.isfinite(xy))
    fitted = np.sort(np.random.default_rng(3).choice(3000, 500, replace=False))  # the documented subset
    rest = np.setdiff1d(np.arange(3000), fitted)
    # Every transformed particle lands beside fitted particles of its own cluster.
    assert neighbour_label_agreement(xy, labels, rest[:800], fitted) > 0.98
    np.testing.assert_array_equal(xy, umap_embedding(z, seed=3, fit_max=500))  # seeded: reproducible
    assert not np.array_equal(xy, umap_embedding(z, seed=4, fit_max=500))


@needs_umap
def test_tiny_inputs_and_bad_latents():
    xy = umap_embedding(np.array([[0, 0], [1, 0], [5, 5]], np.float32), seed=0)
    assert xy.shape == (3, 2) and np.all(np.isfinite(xy))
    with pytest.raises(ValueError, match="at least 3"):
        umap_embedding(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 3"):
        umap_embedding(np.zeros((10, 4)), fit_max=2)
    with pytest.raises(ValueError, match="NaN"):
        umap_embedding(np.full((10, 4), np.nan))


def test_without_umap_learn_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    assert not umap_available()
    with pytest.raises(ImportError, match=r"cryoformer\[umap\]"):
        umap_embedding(np.random.default_rng(0).normal(size=(20, 3)))


def test_summary_draws_umap_beside_pca(tmp_path):
    rng = np.random.default_rng(0)
    pc, labels = rng.normal(size=(50, 2)), rng.integers(0, 2, 50)
    vols = [rng.normal(size=(8, 8, 8)).astype(np.float32) for _ in range(2)]
    # SVG keeps each text as a comment: what the figure says can be read back.
    plot_summary(tmp_path / "with.svg", pc, labels, pc[:2], np.array([0.7, 0.3]), vols,
                 umap=rng.normal(size=(50, 2)), centers_umap=np.zeros((2, 2)))
    plot_summary(tmp_path / "without.svg", pc, labels, pc[:2], np.array([0.7, 0.3]), vols)
    with_umap, without = (tmp_path / "with.svg").read_text(), (tmp_path / "without.svg").read_text()
    assert "UMAP, coloured by K-means cluster" in with_umap and "UMAP1" in with_umap
    assert "PCA, coloured by K-means cluster" in with_umap and "PCA, coloured by K-means cluster" in without
    assert "UMAP" not in without
