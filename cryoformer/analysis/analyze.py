"""``analyze`` as a library call: everything ``RUN/analysis/`` holds, from a loaded run.

:func:`analyze_run` takes a :class:`~cryoformer.trainer.run_dir.TrainedRun` (or anything with
its ``model``, ``latents``, ``box_size``, ``pixel_size_angstrom`` and ``epoch``) and writes

======================================  ==========================================================
``z.npy``                               ``[N, zdim]`` latents, the run's particle order
``pca.npy``                             ``[N, p]`` PC coordinates; ``pca_components.npy``
                                        ``[p, zdim]``, ``pca_mean.npy`` ``[zdim]``,
                                        ``pca_explained_variance.npy`` ``[p]`` and ``.png``
``umap.npy``                             ``[N, 2]`` UMAP coordinates (umap-learn; fitted on a seeded
                                        subset of at most ``umap_fit_max`` particles, the rest
                                        placed with ``transform``); absent with ``skip_umap`` or
                                        without umap-learn
``kmeans_labels.npy``                   ``[N]`` cluster of each particle (0…K−1, ordered along PC1)
``kmeans_centers.npy``                  ``[K, zdim]`` centres, each the particle latent nearest
                                        to its K-means centroid (as cryoDRGN); the particles'
                                        rows in ``kmeans_center_indices.npy``
``vol_kmeans_XX.mrc``                   volume at centre ``XX``
``attn_kmeans_XX.mrc``                  attention maps at centre ``XX``, ``[C + K_tok]`` channels
                                        (see :mod:`cryoformer.analysis.attention_maps`)
``pcN/vol_XXX.mrc``, ``pcN/z.npy``      volumes along PC1 and PC2 between the 5th and 95th
                                        percentiles
``flex_score.mrc``                      flexible-region score in ``[0, 1]``
``flex_regions.mrc``                    flexible regions (0 = not flexible, 1 … R), method "density"
``summary.png``, ``summary.html``       the one-page summary
``your_data.ipynb``                     a notebook to go on with (latents, UMAP/PCA, clusters,
                                        maps, a trajectory, export), set to this run and epoch
``analysis.json``                       what was done, with units and channel names
======================================  ==========================================================

The directory is staged and replaces the previous one only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from cryoformer.analysis.attention_maps import FLEX_METHODS, attention_channel_names, attention_stack, flex_score
from cryoformer.analysis.flexible_regions import FlexRegionConfig, flexible_regions
from cryoformer.analysis.latent_space import (UMAP_FIT_MAX, UMAP_MIN_DIST, UMAP_N_NEIGHBORS, KMeansResult,
                                             PcaResult, kmeans, pc_traversal, pca, umap_available,
                                             umap_embedding)
from cryoformer.analysis.notebook import TEMPLATE_NAME, write_prefilled_notebook
from cryoformer.analysis.summary import plot_explained_variance, plot_summary, write_summary_html
from cryoformer.analysis.traversal import write_series_movie
from cryoformer.analysis.volumes import decoded_voxel_size, iter_decoded, staged_directory, write_volumes
from cryoformer.errors import InputError, PathLike
from cryoformer.io.mrc import write_volume
from cryoformer.options import option

__all__ = ["AnalyzeConfig", "analysis_dir", "analyze_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of :func:`analyze_run`; each field with flags is also a ``cryoformer analyze`` option.

    Attributes
    ----------
    k : int
        K-means clusters.
    seed : int
        Seed of K-means, of UMAP and of the latent subsamples (UMAP fit, flexible-region score).
    n_traversal : int
        Volumes per PC traversal.
    traversal_pcs : int
        Traverse PC1 … PC``traversal_pcs`` (fewer when ``zdim`` is smaller).
    traversal_percentiles : (float, float)
        Traversal start and end, percentiles of the particles' PC coordinates.
    box_size : int or None
        Decoding box in voxels (default the training box); the voxel size follows.
    flex_method : str
        ``"queries"`` or ``"weights"`` (:func:`~cryoformer.analysis.attention_maps.flex_score`).
    batch_size : int
        Volumes decoded together.
    skip_umap : bool
        Do not compute the UMAP (``umap.npy``). Without umap-learn it is skipped anyway, with a
        note.
    umap_fit_max : int
        Most particles UMAP is fitted on; the others are placed with its ``transform``.
    progress : bool
        tqdm progress bars.
    """

    k: int = option("--k", default=10, help="number of K-means clusters (default {default})")
    seed: int = option("--seed", default=0,
                       help="seed of K-means, UMAP and latent subsampling (default {default})")
    n_traversal: int = option("--n-traversal", default=10, metavar="N", help="volumes per PC traversal (default {default})")
    traversal_pcs: int = option("--pcs", default=2, metavar="N", help="traverse PC1…PCn (default {default})")
    traversal_percentiles: Tuple[float, float] = (5.0, 95.0)
    box_size: Optional[int] = option("-D", "--box", default=None, unit="voxels", metavar="D",
                                     help="decoding box in voxels, even (default: the training box)")
    flex_method: str = option("--flex-method", default="density", choices=FLEX_METHODS,
                              help="flexible-region score: the decoder's density response to the latent "
                                   "(default; also writes flex_regions.mrc), or the attention maps: the "
                                   "variance of the conditioned queries or of the per-voxel attention weights")
    batch_size: int = option("-b", "--batch-size", default=4, help="volumes decoded together (default {default})")
    skip_umap: bool = option("--skip-umap", default=False, switch="store_true",
                             help="do not compute the UMAP of the latents (umap.npy; minutes for 10⁵ "
                                  "particles)")
    umap_fit_max: int = option("--umap-fit-max", default=UMAP_FIT_MAX, metavar="N",
                               help="fit UMAP on at most N particles (a seeded random subset) and place "
                                    "the others with its transform (default {default})")
    progress: bool = True


def analysis_dir(run_dir: PathLike, epoch: Optional[object] = None) -> str:
    """``RUN/analysis`` (the default epoch of ``load_run``: best held-out loss, else latest) or
    ``RUN/analysis.E`` (epoch ``E``, or ``analysis.last``, asked for)."""
    name = "analysis" if epoch in (None, "best") else f"analysis.{epoch}"
    return os.path.join(os.fspath(run_dir), name)


def _save_npy(path: str, array: np.ndarray) -> None:
    np.save(path, np.asarray(array), allow_pickle=False)


def analyze_run(run, out_dir: PathLike, config: AnalyzeConfig = AnalyzeConfig()) -> Dict[str, object]:
    """Run the latent analysis of a trained run and write ``out_dir`` (see module docstring).

    Returns
    -------
    dict
        The content of ``analysis.json`` (paths relative to ``out_dir``).

    Raises
    ------
    InputError
        ``k`` larger than the number of particles, an odd / non-positive decoding box, or a
        ``umap_fit_max`` below 3.
    """
    z = np.asarray(run.latents, dtype=np.float32)  # [N, zdim]
    n = len(z)
    if not 1 <= config.k <= n:
        raise InputError(None, "--k", f"must be between 1 and the number of particles ({n}), got {config.k}")
    D = int(config.box_size or run.box_size)
    if D < 2 or D % 2:
        raise InputError(None, "-D", f"decoding box must be even and >= 2, got {D}")
    if config.umap_fit_max < 3:
        raise InputError(None, "--umap-fit-max", f"must be at least 3 particles, got {config.umap_fit_max}")
    # A stack without a recorded pixel size gives maps in pixel units (1 "Å" per training px).
    apix = decoded_voxel_size(run.box_size, run.pixel_size_angstrom or 1.0, D)
    model = run.model.eval()
    pcs = pca(z)
    km = kmeans(z, config.k, seed=config.seed)
    embedding, umap_info = _umap(z, config)
    files: Dict[str, str] = {}
    with staged_directory(out_dir, replace=True) as stage:
        def out(name: str) -> str:
            return os.path.join(stage, name)

        _write_latent_tables(out, z, pcs, km)
        if embedding is not None:
            _save_npy(out("umap.npy"), embedding)
            files["UMAP coordinates"] = "umap.npy"
        cluster_vols = _write_cluster_maps(out, model, km.centers, D, apix, config)
        files.update(_write_traversals(out, model, pcs, D, apix, config))
        if config.flex_method == "density":
            regions, score = flexible_regions(model, z, D, FlexRegionConfig(seed=config.seed))
            write_volume(out("flex_regions.mrc"), regions.astype(np.float32), apix)
            files["flexible regions"] = "flex_regions.mrc"
        else:
            score = flex_score(model, z, D, config.flex_method, seed=config.seed, progress=config.progress)
        write_volume(out("flex_score.mrc"), score, apix)
        files.update({"cluster volumes": "vol_kmeans_XX.mrc", "attention maps": "attn_kmeans_XX.mrc",
                      "flexible-region score": "flex_score.mrc", "latents": "z.npy",
                      "PC coordinates": "pca.npy", "cluster labels": "kmeans_labels.npy"})
        if getattr(run, "run_dir", None):  # a notebook to go on with, set to this run and epoch
            write_prefilled_notebook(out(TEMPLATE_NAME), run.run_dir, getattr(run, "epoch", None), config.k)
            files["notebook"] = TEMPLATE_NAME
        _write_summary(out, getattr(run, "epoch", None), z, D, apix, config, pcs, km, cluster_vols,
                       embedding, umap_info, files)
        record = _analysis_record(run, z, config, D, apix, pcs, km, attention_channel_names(model), files)
        record["umap"] = umap_info
        with open(out("analysis.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    return record


def _umap(z: np.ndarray, config: AnalyzeConfig) -> Tuple[Optional[np.ndarray], Dict[str, object]]:
    """(``[N, 2]`` UMAP coordinates or None, the record's ``umap`` entry); without umap-learn, or
    with one that cannot be imported, the UMAP is skipped with one logged note, not an error."""
    if config.skip_umap:
        return None, {"skipped": "--skip-umap"}
    if not umap_available():
        why = "umap-learn is not installed (pip install 'cryoformer[umap]')"
        logger.warning("UMAP skipped: %s; --skip-umap silences this note", why)
        return None, {"skipped": why}
    if len(z) < 3:
        return None, {"skipped": f"{len(z)} particles: UMAP needs at least 3"}
    try:
        embedding = umap_embedding(z, seed=config.seed, fit_max=config.umap_fit_max, progress=config.progress)
    except ImportError as err:  # installed but unusable (e.g. numba built for another NumPy)
        cause = err.__cause__ or err  # the import's own error, not the install hint wrapped round it
        why = f"umap-learn is installed but cannot be imported ({type(cause).__name__}: {cause})"
        logger.warning("UMAP skipped: %s; --skip-umap silences this note", why)
        return None, {"skipped": why}
    return embedding, {"file": "umap.npy", "fit_particles": int(min(len(z), config.umap_fit_max)),
                       "n_neighbors": UMAP_N_NEIGHBORS, "min_dist": UMAP_MIN_DIST, "metric": "euclidean",
                       "seed": config.seed,
                       "fit": "umap-learn UMAP fitted on a seeded uniform random subset of at most "
                              "umap_fit_max particles; the others placed with UMAP.transform"}


def _write_summary(out: Callable[[str], str], epoch, z: np.ndarray, D: int, apix: float,
                   config: AnalyzeConfig, pcs: PcaResult, km: KMeansResult, cluster_vols: List[np.ndarray],
                   embedding: Optional[np.ndarray], umap_info: Dict[str, object], files: Dict[str, str]) -> None:
    """``summary.png`` (PCA and UMAP scatters, cluster volumes) and ``summary.html``."""
    n = len(z)
    info = {
        "epoch": epoch,
        "particles": n,
        "zdim": int(z.shape[1]),
        "k": config.k,
        "decoded box (voxels)": D,
        "voxel size (Å)": round(apix, 4),
        "PC1/PC2 explained variance": ", ".join(f"{v:.3f}" for v in pcs.explained_variance_ratio[:2]),
        "UMAP": (f"skipped: {umap_info['skipped']}" if "skipped" in umap_info
                 else f"fitted on {umap_info['fit_particles']} of {n} particles (umap.npy)"),
    }
    plot_summary(out("summary.png"), pcs.projections, km.labels, pcs.projections[km.center_indices],
                 pcs.explained_variance_ratio, cluster_vols,
                 title=f"cryoformer analysis — epoch {epoch}, {n} particles", umap=embedding,
                 centers_umap=None if embedding is None else embedding[km.center_indices])
    write_summary_html(out("summary.html"), out("summary.png"), info, km.sizes().tolist(), files)


def _write_latent_tables(out: Callable[[str], str], z: np.ndarray, pcs: PcaResult, km: KMeansResult) -> None:
    """``z.npy``, the PCA arrays and plot, and the K-means arrays (``out`` names a file)."""
    _save_npy(out("z.npy"), z)
    _save_npy(out("pca.npy"), pcs.projections)
    _save_npy(out("pca_components.npy"), pcs.components)
    _save_npy(out("pca_mean.npy"), pcs.mean)
    _save_npy(out("pca_explained_variance.npy"), pcs.explained_variance_ratio)
    plot_explained_variance(pcs.explained_variance_ratio, out("pca_explained_variance.png"))
    _save_npy(out("kmeans_labels.npy"), km.labels)
    _save_npy(out("kmeans_centers.npy"), km.centers)
    _save_npy(out("kmeans_center_indices.npy"), km.center_indices)


def _write_cluster_maps(out: Callable[[str], str], model, centers: np.ndarray, D: int, apix: float,
                        config: AnalyzeConfig) -> List[np.ndarray]:
    """Volume and attention maps at each K-means centre ``[K, zdim]``; returns the volumes."""
    cluster_vols = []
    for i, vol in enumerate(iter_decoded(model, centers, D, config.batch_size, config.progress,
                                         "cluster volumes")):
        write_volume(out(f"vol_kmeans_{i:02d}.mrc"), vol, apix)
        cluster_vols.append(vol)
    for i, zc in enumerate(tqdm(centers, desc="attention maps", disable=not config.progress,
                                leave=False)):
        write_volume(out(f"attn_kmeans_{i:02d}.mrc"), attention_stack(model, zc, D), apix)
    return cluster_vols


def _write_traversals(out: Callable[[str], str], model, pcs: PcaResult, D: int, apix: float,
                      config: AnalyzeConfig) -> Dict[str, str]:
    """``pcN/z.npy`` and ``pcN/vol_XXX.mrc`` along the first PCs; their entries of ``files``."""
    files = {}
    for p in range(1, min(config.traversal_pcs, pcs.projections.shape[1]) + 1):
        zt = pc_traversal(pcs, p, config.n_traversal, config.traversal_percentiles)
        os.makedirs(out(f"pc{p}"))
        _save_npy(out(f"pc{p}/z.npy"), zt)
        maps = write_volumes(model, zt, out(f"pc{p}"), apix, D, batch_size=config.batch_size,
                             progress=config.progress, desc=f"PC{p} traversal")
        files[f"pc{p} traversal"] = f"pc{p}/"
        # Beside pcN/, not in it: one isosurface level and view for the whole traversal.
        movies = write_series_movie(maps, out(f"pc{p}_movie.gif"), progress=config.progress)
        files[f"pc{p} movie"] = ", ".join(os.path.basename(m) for m in movies)
    return files


def _analysis_record(run, z: np.ndarray, config: AnalyzeConfig, D: int, apix: float, pcs: PcaResult,
                     km: KMeansResult, channels: List[str], files: Dict[str, str]) -> Dict[str, object]:
    """The content of ``analysis.json``."""
    return {
        "epoch": getattr(run, "epoch", None), "n_particles": len(z), "zdim": int(z.shape[1]),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "box_size_voxels": D, "voxel_size_angstrom": apix,
        "training_box_size_px": int(run.box_size),
        "training_pixel_size_angstrom": run.pixel_size_angstrom,
        "explained_variance_ratio": pcs.explained_variance_ratio.tolist(),
        "cluster_sizes": km.sizes().tolist(),
        "kmeans_centers": "nearest particle latent to each scikit-learn KMeans centroid "
                          "(n_init=10, seeded); clusters numbered along PC1",
        "attention_channels": channels,
        "flex_score": {"method": config.flex_method,
                       "definition": _FLEX_DEFINITIONS[config.flex_method]},
        "files": files,
    }


_FLEX_DEFINITIONS = {
    "density": "decoded density at <= 256 particle latents (seeded subset); the leading modes of its "
               "change over latents (99 % of the squared change); per voxel the amplitude "
               "sqrt(sum_k sigma_k^2 v_k(x)^2), Gaussian-smoothed (0.5 training px); divided by its "
               "maximum. flex_regions.mrc: voxels with score >= 0.3 spectrally clustered by cos^2 of "
               "their mode trajectories",
    "queries": "per block, the summed variance across particle latents (seeded subset of <= 2048) "
               "of the conditioned structure-query channels, each channel scaled by its variance "
               "over all blocks and latents; trilinear between block centres to the grid; "
               "divided by its maximum",
    "weights": "per voxel, the summed variance across particle latents (seeded subset of <= 32) of "
               "the region-wise attention weights over the spatial tokens; divided by its maximum",
}
