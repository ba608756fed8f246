"""Choosing a latent in a trained run: PC coordinates, a K-means cluster, or a particle.

:class:`RunSession` bundles a loaded run with its PCA and K-means (computed once, when the run
is opened) and turns each kind of choice into a latent ``[zdim]`` plus a short label for layer
names and metadata. The conventions are :mod:`cryoformer.analysis.latent_space`'s (K-means
centres moved onto the data and numbered along PC1, as ``cryoformer analyze`` writes them), so
"cluster 3" here is ``vol_kmeans_03.mrc`` there for the same ``k`` and seed. No Qt import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["RunSession", "latent_from_pcs", "latent_from_cluster", "latent_from_particle",
           "pc_label"]


def latent_from_pcs(pca_result, coords: Sequence[float]) -> np.ndarray:
    """Latent ``[zdim]`` at PC coordinates ``coords`` (PC1, PC2, …; missing PCs are zero).

    Coordinates are in latent units along the unit principal axes (the scale of
    ``pca_result.projections``), around the mean latent.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(1, -1)
    p = pca_result.components.shape[0]
    if c.shape[1] > p:
        raise ValueError(f"{c.shape[1]} PC coordinates given but the latents have only {p} PCs")
    return pca_result.to_latent(c)[0]


def latent_from_cluster(kmeans_result, cluster: int) -> np.ndarray:
    """Latent ``[zdim]`` of a K-means cluster's centre (a real particle's latent)."""
    k = kmeans_result.k
    if not 0 <= int(cluster) < k:
        raise ValueError(f"cluster {cluster} out of range 0…{k - 1}")
    return np.asarray(kmeans_result.centers[int(cluster)], dtype=np.float32)


def latent_from_particle(latents: np.ndarray, particle_indices: np.ndarray, index: int,
                         original: bool = False) -> np.ndarray:
    """Latent ``[zdim]`` of one particle.

    Parameters
    ----------
    latents : np.ndarray
        ``[N, zdim]`` the run's latents.
    particle_indices : np.ndarray
        ``[N]`` row of the original stack of each latent (``TrainedRun.particle_indices``).
    index : int
        Row of ``latents`` (``original=False``) or of the original particle stack (``True``).
    """
    n = latents.shape[0]
    if original:
        rows = np.nonzero(np.asarray(particle_indices) == int(index))[0]
        if rows.size == 0:
            raise ValueError(f"particle {index} of the stack was not part of this run (--ind subset)")
        return np.asarray(latents[rows[0]], dtype=np.float32)
    if not 0 <= int(index) < n:
        raise ValueError(f"particle {index} out of range 0…{n - 1}")
    return np.asarray(latents[int(index)], dtype=np.float32)


def pc_label(coords: Sequence[float]) -> str:
    """``"PC1=0.12, PC2=-0.3"`` for layer metadata and status lines."""
    return ", ".join(f"PC{i + 1}={float(c):.3g}" for i, c in enumerate(coords))


@dataclass(eq=False)
class RunSession:
    """A loaded run with what the latent choosers need.

    Attributes
    ----------
    run : TrainedRun
    pca : PcaResult
    kmeans : KMeansResult
    """

    run: object
    pca: object
    kmeans: object

    @classmethod
    def open(cls, run_dir: str, k: int = 10, seed: int = 0, epoch: Optional[int] = None,
             device: str = "auto") -> "RunSession":
        """Load ``run_dir`` (by default the epoch with the lowest held-out loss, else the latest), then PCA and K-means of its latents.

        ``k`` is clamped to the number of particles. Raises
        :class:`cryoformer.errors.InputError` for a directory that is not a finished run.
        """
        from cryoformer.analysis import kmeans, pca
        from cryoformer.trainer.run_dir import load_run

        run = load_run(run_dir, epoch=epoch, device=device)
        z = run.latents
        return cls(run, pca(z), kmeans(z, max(1, min(int(k), z.shape[0])), seed=seed))

    @property
    def n_particles(self) -> int:
        return int(self.run.latents.shape[0])

    @property
    def n_pcs(self) -> int:
        return int(self.pca.components.shape[0])

    def pc_range(self, pc: int, percentiles: Tuple[float, float] = (1.0, 99.0)) -> Tuple[float, float]:
        """Slider range of PC ``pc`` (1-based): percentiles of the particles' coordinates."""
        lo, hi = np.percentile(self.pca.projections[:, pc - 1], list(percentiles))
        return float(lo), float(hi)

    def cluster_names(self) -> List[str]:
        """``"cluster 0 (n=12)"`` … for a combo box."""
        return [f"cluster {i} (n={n})" for i, n in enumerate(self.kmeans.sizes())]

    def from_pcs(self, coords: Sequence[float]) -> Tuple[np.ndarray, str]:
        """(latent ``[zdim]``, label) at PC coordinates."""
        return latent_from_pcs(self.pca, coords), pc_label(coords)

    def from_cluster(self, cluster: int) -> Tuple[np.ndarray, str]:
        """(latent, label) of cluster ``cluster``'s centre."""
        z = latent_from_cluster(self.kmeans, cluster)
        row = int(self.kmeans.center_indices[int(cluster)])
        original = int(self.run.particle_indices[row]) if row >= 0 else -1
        return z, f"cluster {int(cluster)} (particle {original})"

    def from_particle(self, index: int, original: bool = False) -> Tuple[np.ndarray, str]:
        """(latent, label) of a particle (row of the run, or of the stack with ``original``)."""
        z = latent_from_particle(self.run.latents, self.run.particle_indices, index, original)
        stack_row = int(index) if original else int(self.run.particle_indices[int(index)])
        return z, f"particle {stack_row}"

    def decode(self, z, D: Optional[int] = None, iso_level: Optional[float] = None, label: str = ""):
        """:func:`cryoformer_widgets.napari_layers.decode_latent` on this run."""
        from .napari_layers import decode_latent

        return decode_latent(self.run, z, D, iso_level, label)
