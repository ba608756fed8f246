"""Latent-space analysis: PCA, K-means and traversals.

What users analyse is the deformation latent ``z`` (docs/conventions.md, "The model"): one ``zdim`` vector per particle,
the mean of the encoder's output. Everything here is pure numpy / scikit-learn on a ``[N, zdim]``
array, so the notebook and napari widgets call it directly.

Conventions chosen to match cryoDRGN's ``analyze`` (so users can compare the two tools):

* K-means centres are moved **onto the data**: each centre is replaced by the particle latent
  nearest to it (``cryodrgn.analysis.get_nearest_point``). A volume decoded at a centre is then
  the volume of a real particle, never of an empty region between clusters.
* Traversals sample a principal axis between percentiles of the particles' projections
  (default the 5th to 95th), holding every other PC at zero (the data mean).

One difference: clusters are renumbered in increasing order of their centre's PC1 coordinate,
so that cluster 0 and cluster K−1 sit at the two ends of the dominant motion and a re-run with
the same seed gives the same numbering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PcaResult", "KMeansResult", "pca", "kmeans", "pc_traversal", "nearest_on_data"]


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class PcaResult:
    """Principal components of the latents.

    Attributes
    ----------
    projections : np.ndarray
        ``[N, p]`` float32 coordinates of every particle on the PCs (``p = min(N, zdim)``).
    components : np.ndarray
        ``[p, zdim]`` unit principal axes, by decreasing variance.
    mean : np.ndarray
        ``[zdim]`` mean latent.
    explained_variance_ratio : np.ndarray
        ``[p]`` fraction of the total variance along each PC.
    """

    projections: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: np.ndarray

    def to_latent(self, coords: np.ndarray) -> np.ndarray:
        """PC coordinates ``[M, q]`` (``q ≤ p``; missing PCs are zero) → latents ``[M, zdim]``."""
        c = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        return (self.mean + c @ self.components[: c.shape[1]]).astype(np.float32)


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """K-means clustering of the latents, with centres moved onto the data.

    Attributes
    ----------
    labels : np.ndarray
        ``[N]`` int64 cluster of every particle, ``0 … K−1``.
    centers : np.ndarray
        ``[K, zdim]`` float32: the particle latent nearest to each K-means centroid.
    center_indices : np.ndarray
        ``[K]`` int64 row of ``z`` that each centre is (particle order of the run).
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


def _check_latents(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"latents must be [N, zdim] with N >= 1, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("latents contain NaN or infinite values")
    return z


def pca(z: np.ndarray) -> PcaResult:
    """Principal component analysis of latents ``z`` ``[N, zdim]`` (scikit-learn, exact SVD)."""
    from sklearn.decomposition import PCA

    z = _check_latents(z)
    p = min(z.shape)
    model = PCA(n_components=p, svd_solver="full").fit(z)
    ratio = model.explained_variance_ratio_
    # A constant latent set has no variance: sklearn then returns NaN ratios; report zeros.
    ratio = np.nan_to_num(ratio, nan=0.0)
    return PcaResult(model.transform(z).astype(np.float32), model.components_.astype(np.float64),
                     model.mean_.astype(np.float64), ratio.astype(np.float64))


def nearest_on_data(points: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Row index ``[M]`` of the latent in ``z`` ``[N, zdim]`` nearest to each point ``[M, zdim]``."""
    from scipy.spatial import cKDTree

    return cKDTree(np.asarray(z, np.float64)).query(np.atleast_2d(points))[1].astype(np.int64)


def kmeans(z: np.ndarray, k: int, seed: int = 0, on_data: bool = True) -> KMeansResult:
    """K-means on latents, centres moved onto the data and clusters ordered along PC1.

    Parameters
    ----------
    z : np.ndarray
        ``[N, zdim]`` latents.
    k : int
        Number of clusters, ``1 ≤ k ≤ N``.
    seed : int
        Random state of scikit-learn's k-means++ initialisation (10 restarts).
    on_data : bool
        Replace each centroid by its nearest particle latent (cryoDRGN's default).

    Returns
    -------
    KMeansResult
    """
    from sklearn.cluster import KMeans

    z = _check_latents(z)
    if not 1 <= k <= z.shape[0]:
        raise ValueError(f"k must be between 1 and the number of particles ({z.shape[0]}), got {k}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
    centroids, labels = km.cluster_centers_, km.labels_.astype(np.int64)
    # Renumber along PC1 (sign fixed so the PC1 of the data correlates positively with the
    # first latent coordinate): deterministic, and ends of the motion get ends of the range.
    axis = pca(z).components[0] if z.shape[0] > 1 else np.zeros(z.shape[1])
    axis = axis * (np.sign(axis[np.argmax(np.abs(axis))]) or 1.0)
    order = np.argsort(centroids @ axis, kind="stable")  # new id → old id
    new_id = np.empty(k, dtype=np.int64)
    new_id[order] = np.arange(k)
    centroids, labels = centroids[order], new_id[labels]
    idx = nearest_on_data(centroids, z) if on_data else np.full(k, -1, dtype=np.int64)
    centers = z[idx] if on_data else centroids
    return KMeansResult(labels, centers.astype(np.float32), idx, centroids.astype(np.float32))


def pc_traversal(pca_result: PcaResult, pc: int, n_points: int = 10,
                 percentiles: Sequence[float] = (5.0, 95.0)) -> np.ndarray:
    """Latents along one principal axis, evenly spaced between two percentiles.

    Parameters
    ----------
    pca_result : PcaResult
    pc : int
        Principal component, 1-based (``1`` = PC1), as cryoDRGN numbers them.
    n_points : int
        Number of latents.
    percentiles : (float, float)
        Start and end, as percentiles (0–100) of the particles' coordinates on that PC.

    Returns
    -------
    np.ndarray
        ``[n_points, zdim]`` float32; every other PC coordinate is zero (the mean latent).
    """
    p = pca_result.projections.shape[1]
    if not 1 <= pc <= p:
        raise ValueError(f"pc must be between 1 and {p}, got {pc}")
    if n_points < 1:
        raise ValueError("n_points must be positive")
    lo, hi = np.percentile(pca_result.projections[:, pc - 1], list(percentiles))
    coords = np.zeros((n_points, pc))
    coords[:, pc - 1] = np.linspace(lo, hi, n_points)
    return pca_result.to_latent(coords)
