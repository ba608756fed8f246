"""``analyze`` as a library call: everything ``RUN/analysis/`` holds, from a loaded run.

:func:`analyze_run` takes a :class:`~cryoformer.trainer.run_dir.TrainedRun` (or anything with
its ``model``, ``latents``, ``box_size``, ``pixel_size_angstrom`` and ``epoch``) and writes

======================================  ==========================================================
``z.npy``                               ``[N, zdim]`` latents, the run's particle order
``pca.npy``                             ``[N, p]`` PC coordinates; ``pca_components.npy``
                                        ``[p, zdim]``, ``pca_mean.npy`` ``[zdim]``,
                                        ``pca_explained_variance.npy`` ``[p]`` and ``.png``
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
``summary.png``, ``summary.html``       the one-page summary
``analysis.json``                       what was done, with units and channel names
======================================  ==========================================================

The directory is staged and replaces the previous one only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from cryoformer.analysis.attention_maps import attention_channel_names, attention_stack, flex_score
from cryoformer.analysis.latent_space import KMeansResult, PcaResult, kmeans, pc_traversal, pca
from cryoformer.analysis.summary import plot_explained_variance, plot_summary, write_summary_html
from cryoformer.analysis.volumes import decoded_voxel_size, iter_decoded, staged_directory, write_volumes
from cryoformer.errors import InputError, PathLike
from cryoformer.io.mrc import write_volume

__all__ = ["AnalyzeConfig", "analysis_dir", "analyze_run"]


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of :func:`analyze_run`.

    Attributes
    ----------
    k : int
        K-means clusters.
    seed : int
        Seed of K-means and of the latent subsample of the flexible-region score.
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
    progress : bool
        tqdm progress bars.
    """

    k: int = 10
    seed: int = 0
    n_traversal: int = 10
    traversal_pcs: int = 2
    traversal_percentiles: Tuple[float, float] = (5.0, 95.0)
    box_size: Optional[int] = None
    flex_method: str = "queries"
    batch_size: int = 4
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
        ``k`` larger than the number of particles, or an odd / non-positive decoding box.
    """
    z = np.asarray(run.latents, dtype=np.float32)  # [N, zdim]
    n = len(z)
    if not 1 <= config.k <= n:
        raise InputError(None, "--k", f"must be between 1 and the number of particles ({n}), got {config.k}")
    D = int(config.box_size or run.box_size)
    if D < 2 or D % 2:
        raise InputError(None, "-D", f"decoding box must be even and >= 2, got {D}")
    # A stack without a recorded pixel size gives maps in pixel units (1 "Å" per training px).
    apix = decoded_voxel_size(run.box_size, run.pixel_size_angstrom or 1.0, D)
    model = run.model.eval()
    pcs = pca(z)
    km = kmeans(z, config.k, seed=config.seed)
    files: Dict[str, str] = {}
    with staged_directory(out_dir, replace=True) as stage:
        def out(name: str) -> str:
            return os.path.join(stage, name)

        _write_latent_tables(out, z, pcs, km)
        cluster_vols = _write_cluster_maps(out, model, km.centers, D, apix, config)
        files.update(_write_traversals(out, model, pcs, D, apix, config))
        write_volume(out("flex_score.mrc"),
                     flex_score(model, z, D, config.flex_method, seed=config.seed,
                                progress=config.progress), apix)

        centers_pc = pcs.projections[km.center_indices]
        info = {
            "epoch": getattr(run, "epoch", None),
            "particles": n,
            "zdim": int(z.shape[1]),
            "k": config.k,
            "decoded box (voxels)": D,
            "voxel size (Å)": round(apix, 4),
            "PC1/PC2 explained variance": ", ".join(f"{v:.3f}" for v in pcs.explained_variance_ratio[:2]),
        }
        plot_summary(out("summary.png"), pcs.projections, km.labels, centers_pc,
                     pcs.explained_variance_ratio, cluster_vols,
                     title=f"cryoformer analysis — epoch {info['epoch']}, {n} particles")
        files.update({"cluster volumes": "vol_kmeans_XX.mrc", "attention maps": "attn_kmeans_XX.mrc",
                      "flexible-region score": "flex_score.mrc", "latents": "z.npy",
                      "PC coordinates": "pca.npy", "cluster labels": "kmeans_labels.npy"})
        write_summary_html(out("summary.html"), out("summary.png"), info, km.sizes().tolist(), files)
        record = _analysis_record(run, z, config, D, apix, pcs, km, attention_channel_names(model), files)
        with open(out("analysis.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    return record


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
        write_volumes(model, zt, out(f"pc{p}"), apix, D, batch_size=config.batch_size,
                      progress=config.progress, desc=f"PC{p} traversal")
        files[f"pc{p} traversal"] = f"pc{p}/"
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
    "queries": "per block, the summed variance across particle latents (seeded subset of <= 2048) "
               "of the conditioned structure-query channels, each channel scaled by its variance "
               "over all blocks and latents; trilinear between block centres to the grid; "
               "divided by its maximum",
    "weights": "per voxel, the summed variance across particle latents (seeded subset of <= 32) of "
               "the region-wise attention weights over the spatial tokens; divided by its maximum",
}
