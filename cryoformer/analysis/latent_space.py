"""Latent-space analysis: PCA, K-means and traversals.

What users analyse is the deformation latent ``z`` (docs/conventions.md, "The model"): one ``zdim`` vector per particle,
the mean of the encoder's output. Everything here is pure numpy / scikit-learn on a ``[N, zdim]``
array, so the notebook and napari widgets call it directly. K-means itself is
:func:`cryoformer.clustering.kmeans` (the one implementation, shared with the pose search),
called here with the analysis' options.

Conventions chosen to match cryoDRGN's ``analyze`` (so users can compare the two tools):

* K-means centres are moved **onto the data**: each centre is replaced by the particle latent
  nearest to it (``cryodrgn.analysis.get_nearest_point``). A volume decoded at a centre is then
  the volume of a real particle, never of an empty region between clusters.
* Traversals sample a principal axis between percentiles of the particles' projections
  (default the 5th to 95th), holding every other PC at zero (the data mean).

UMAP (:func:`umap_embedding`) needs the optional extra ``cryoformer[umap]`` (umap-learn); it is
fitted on a seeded subset of at most ``fit_max`` particles and the others are placed with
``transform``, so 3·10⁵ particles take minutes rather than an hour (docs/benchmarks.md).

One difference: clusters are renumbered in increasing order of their centroid's PC1 coordinate,
so that cluster 0 and cluster K−1 sit at the two ends of the dominant motion and a re-run with
the same seed gives the same numbering.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from cryoformer import clustering
from cryoformer.clustering import KMeansResult, nearest_on_data

__all__ = ["PcaResult", "KMeansResult", "pca", "kmeans", "pc_traversal", "nearest_on_data",
           "UMAP_FIT_MAX", "UMAP_N_NEIGHBORS", "UMAP_MIN_DIST", "umap_available", "umap_embedding"]

# Particles UMAP is fitted on; the rest are placed with `transform`. At 2·10⁴ the fit takes about
# a minute on two CPU cores and keeps neighbourhoods as well as a fit on everything (benchmarks).
UMAP_FIT_MAX = 20_000
UMAP_N_NEIGHBORS = 15   # cryoDRGN's analyze uses umap-learn's defaults; so do we
UMAP_MIN_DIST = 0.1


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


def _check_latents(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"latents must be [N, zdim] with N >= 1, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("latents contain NaN or infinite values")
    return z


def pca(z: np.ndarray) -> PcaResult:
    """Principal component analysis of latents ``z`` ``[N, zdim]`` (scikit-learn, exact SVD)."""
    z = _check_latents(z)
    p = min(z.shape)
    # sklearn here, not at the top: it takes ~1 s to import and every CLI command imports
    # this module while building its parser.
    from sklearn.decomposition import PCA

    model = PCA(n_components=p, svd_solver="full").fit(z)
    ratio = model.explained_variance_ratio_
    # A constant latent set has no variance: sklearn then returns NaN ratios; report zeros.
    ratio = np.nan_to_num(ratio, nan=0.0)
    return PcaResult(model.transform(z).astype(np.float32), model.components_.astype(np.float64),
                     model.mean_.astype(np.float64), ratio.astype(np.float64))


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
    return clustering.kmeans(_check_latents(z), k, seed, n_init=10, on_data=on_data, order_along_pc1=True)


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


def umap_available() -> bool:
    """Whether umap-learn (the optional extra ``cryoformer[umap]``) can be imported."""
    return importlib.util.find_spec("umap") is not None


def umap_embedding(z: np.ndarray, seed: int = 0, fit_max: int = UMAP_FIT_MAX, n_neighbors: int = UMAP_N_NEIGHBORS,
                   min_dist: float = UMAP_MIN_DIST, chunk_size: int = 50_000, progress: bool = False) -> np.ndarray:
    """2-D UMAP of the latents (umap-learn; cryoDRGN's ``analyze`` defaults: 15 neighbours,
    ``min_dist`` 0.1, Euclidean).

    UMAP is fitted on at most ``fit_max`` particles, a seeded uniform random subset; the others
    are placed by ``UMAP.transform`` against that fit, ``chunk_size`` at a time. The fit costs
    O(``fit_max``) (about a minute at 2·10⁴ on two CPU cores, plus ~10 s of numba compilation the
    first time in a Python environment) and the transform O(N − ``fit_max``), so 3·10⁵ particles
    stay usable; memory is O(N · zdim). Fitted rows get their fitted coordinates.

    Parameters
    ----------
    z : np.ndarray
        ``[N, zdim]`` latents, N ≥ 3, finite.
    seed : int
        Seed of the subset, of UMAP's fit and of its transform: the same inputs give the same
        embedding (UMAP then runs on one thread).
    fit_max : int
        Most particles UMAP is fitted on (≥ 3).
    n_neighbors : int
        UMAP's neighbourhood size (capped at the fitted particles − 1).
    min_dist : float
        UMAP's minimum distance between embedded points.
    chunk_size : int
        Particles transformed together (bounds the transform's memory).
    progress : bool
        tqdm bar over the transformed chunks.

    Returns
    -------
    np.ndarray
        ``[N, 2]`` float32 UMAP coordinates (dimensionless), in the order of ``z``.

    Raises
    ------
    ImportError
        umap-learn is not installed.
    ValueError
        Fewer than 3 particles, non-finite latents, or ``fit_max`` < 3.
    """
    z = _check_latents(z).astype(np.float32)  # [N, zdim]
    n = z.shape[0]
    if n < 3 or fit_max < 3:
        raise ValueError(f"UMAP needs at least 3 particles and fit_max >= 3, got N = {n}, fit_max = {fit_max}")
    try:
        with warnings.catch_warnings():
            # umap-learn warns at import that its TensorFlow-only ParametricUMAP is unavailable.
            warnings.filterwarnings("ignore", message=".*ParametricUMAP.*")
            # Imported here: an optional dependency, and importing it (numba) takes ~3 s.
            import umap
    except ImportError as exc:
        raise ImportError("UMAP needs umap-learn: pip install 'cryoformer[umap]'") from exc
    n_fit = min(n, fit_max)
    # The spectral initialisation needs more points than eigenvectors; a handful gets a random one.
    model = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, n_fit - 1)), min_dist=min_dist,
                      init="spectral" if n_fit >= 16 else "random", random_state=seed, transform_seed=seed)
    out = np.empty((n, 2), dtype=np.float32)  # [N, 2]
    with warnings.catch_warnings():
        # A seeded UMAP runs on one thread and says so on every call; that is the point of the seed.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        if n_fit == n:
            out[:] = model.fit_transform(z)
            return out
        fit_rows = np.sort(np.random.default_rng(seed).choice(n, n_fit, replace=False))  # [n_fit]
        model.fit(z[fit_rows])
        out[fit_rows] = model.embedding_
        rest = np.setdiff1d(np.arange(n), fit_rows)  # [N − n_fit]
        for start in tqdm(range(0, rest.size, chunk_size), desc="UMAP transform", disable=not progress,
                          leave=False):
            rows = rest[start:start + chunk_size]
            out[rows] = model.transform(z[rows])
    return out
