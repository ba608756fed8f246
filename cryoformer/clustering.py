"""K-means of latents: the one implementation behind the latent-space analysis, the widgets and
the pose search's groups.

Two uses, two sets of options:

* **Analysis** (:func:`cryoformer.analysis.latent_space.kmeans`, the widgets): 10 restarts,
  centres moved **onto the data** (each centroid replaced by the particle latent nearest to it,
  as cryoDRGN's ``get_nearest_point``: a volume decoded at a centre is then that of a real
  particle), clusters renumbered in increasing order of their centroid's PC1 coordinate so that
  cluster 0 and cluster K−1 sit at the two ends of the dominant motion.
* **Pose search groups** (:mod:`cryoformer.refinement.references`): 3 restarts, the raw
  centroids, scikit-learn's numbering.

The fit runs in the floating-point type of the latents given (the pose search clusters float32
latents, the analysis float64 ones), since the two can assign a borderline particle differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

# Import cost: scikit-learn takes ~1 s to import, and every `cryoformer` command imports this
# module while it builds its parser (through the trainer and the pose search), so sklearn is
# imported by the functions that fit, not at the top.

__all__ = ["KMeansResult", "kmeans", "nearest_on_data", "first_principal_axis"]


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class KMeansResult:
    """K-means clustering of latents.

    Attributes
    ----------
    labels : np.ndarray
        ``[N]`` int64 cluster of every particle, ``0 … K−1``.
    centers : np.ndarray
        ``[K, zdim]`` float32: the particle latent nearest to each centroid (centres on the
        data), or the centroids themselves.
    center_indices : np.ndarray
        ``[K]`` int64 row of ``z`` that each centre is (particle order of the run); −1 when the
        centres are not on the data.
    centroids : np.ndarray
        ``[K, zdim]`` float32 K-means centroids before moving them onto the data.
    """

    labels: np.ndarray
    centers: np.ndarray
    center_indices: np.ndarray
    centroids: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def sizes(self) -> np.ndarray:
        """``[K]`` number of particles in each cluster."""
        return np.bincount(self.labels, minlength=self.k)


def nearest_on_data(points: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Row index ``[M]`` of the latent in ``z`` ``[N, zdim]`` nearest to each point ``[M, zdim]``."""
    return cKDTree(np.asarray(z, np.float64)).query(np.atleast_2d(points))[1].astype(np.int64)


def first_principal_axis(z: np.ndarray) -> np.ndarray:
    """``[zdim]`` unit PC1 of latents ``z`` ``[N, zdim]`` (exact SVD, as
    :func:`cryoformer.analysis.latent_space.pca`), its sign fixed so that its largest-magnitude
    component is positive; zeros for a single latent (no direction)."""
    if z.shape[0] < 2:
        return np.zeros(z.shape[1])
    from sklearn.decomposition import PCA  # here, not at the top: see the note on import cost

    axis = PCA(n_components=min(z.shape), svd_solver="full").fit(z).components_[0].astype(np.float64)
    return axis * (np.sign(axis[np.argmax(np.abs(axis))]) or 1.0)


def kmeans(z: np.ndarray, k: int, seed: int = 0, *, n_init: int = 10, on_data: bool = True,
           order_along_pc1: bool = True) -> KMeansResult:
    """K-means of latents (scikit-learn, k-means++ initialisation).

    Parameters
    ----------
    z : np.ndarray
        ``[N, zdim]`` finite latents, float32 or float64 (the fit runs in that type).
    k : int
        Number of clusters, ``1 ≤ k ≤ N``. With one cluster there is nothing to fit: its
        centroid is the mean latent.
    seed : int
        Random state of the initialisation.
    n_init : int
        Restarts; the best fit is kept.
    on_data : bool
        Replace each centroid by its nearest particle latent (cryoDRGN's default).
    order_along_pc1 : bool
        Renumber the clusters in increasing order of their centroid's PC1 coordinate
        (:func:`first_principal_axis`): deterministic, and the ends of the dominant motion get
        the ends of the range. Otherwise scikit-learn's numbering.

    Returns
    -------
    KMeansResult
    """
    if not 1 <= k <= z.shape[0]:
        raise ValueError(f"k must be between 1 and the number of particles ({z.shape[0]}), got {k}")
    if k == 1:
        labels, centroids = np.zeros(len(z), dtype=np.int64), z.mean(0, keepdims=True)
    else:
        from sklearn.cluster import KMeans  # here, not at the top: see the note on import cost

        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)
        labels, centroids = km.labels_.astype(np.int64), km.cluster_centers_
    if order_along_pc1:
        order = np.argsort(centroids @ first_principal_axis(z), kind="stable")  # new id → old id
        new_id = np.empty(k, dtype=np.int64)
        new_id[order] = np.arange(k)
        centroids, labels = centroids[order], new_id[labels]
    idx = nearest_on_data(centroids, z) if on_data else np.full(k, -1, dtype=np.int64)
    centers = z[idx] if on_data else centroids
    return KMeansResult(labels, centers.astype(np.float32), idx, centroids.astype(np.float32))
