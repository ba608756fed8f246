"""The one K-means (cryoformer.clustering) with the options of its two callers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from cryoformer.clustering import first_principal_axis, kmeans, nearest_on_data
from cryoformer.refinement.references import latent_groups


@pytest.fixture
def blobs():
    """Three clusters along one line in 4-D, shuffled."""
    rng = np.random.default_rng(1)
    centres = np.array([[-6.0, 0, 0, 0], [0, 0, 1, 0], [6.0, 0, 0, 0]])
    z = np.concatenate([rng.normal(c, 0.5, size=(40, 4)) for c in centres])
    return z[rng.permutation(len(z))]


def test_analysis_options_order_along_pc1_and_centre_on_data(blobs):
    km = kmeans(blobs, 3, seed=0)
    axis = first_principal_axis(blobs)
    assert np.all(np.diff(km.centroids @ axis) > 0)  # cluster 0 … K−1 along PC1
    np.testing.assert_array_equal(km.centers, blobs[km.center_indices].astype(np.float32))
    np.testing.assert_array_equal(km.center_indices, nearest_on_data(km.centroids, blobs))
    assert km.k == 3 and km.sizes().tolist() == [40, 40, 40]


def test_search_options_are_scikit_learns_fit(blobs):
    z = blobs.astype(np.float32)
    km = kmeans(z, 3, seed=2, n_init=3, on_data=False, order_along_pc1=False)
    ref = KMeans(n_clusters=3, n_init=3, random_state=2).fit(z)
    np.testing.assert_array_equal(km.labels, ref.labels_)
    np.testing.assert_array_equal(km.centroids, ref.cluster_centers_)  # float32 fit kept
    np.testing.assert_array_equal(km.centers, km.centroids)
    assert (km.center_indices == -1).all()
    groups = latent_groups(z, 3, seed=2)
    np.testing.assert_array_equal(groups.labels, ref.labels_)


def test_one_cluster_is_the_mean_and_k_is_checked(blobs):
    km = kmeans(blobs, 1, seed=0, on_data=False)
    assert (km.labels == 0).all()
    np.testing.assert_array_equal(km.centroids[0], blobs.mean(0).astype(np.float32))
    with pytest.raises(ValueError, match="k must be between 1"):
        kmeans(blobs, 0)
    with pytest.raises(ValueError, match="k must be between 1"):
        kmeans(blobs, len(blobs) + 1)
    # the search asks for more groups than it has particles: as many as there are
    assert latent_groups(blobs[:2], 4, seed=0).k == 2


def test_principal_axis_sign_is_fixed():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3)) * [1.0, 5.0, 0.1]
    axis = first_principal_axis(z)
    assert np.argmax(np.abs(axis)) == 1 and axis[1] > 0
    np.testing.assert_allclose(first_principal_axis(-z), axis)
    assert (first_principal_axis(z[:1]) == 0).all()
