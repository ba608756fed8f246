"""The latent explorer's state, without any GUI: run, latents, PCA, clusters, selection, volumes.

:class:`ExplorerState` is what :class:`~cryoformer_widgets.latent_explorer.LatentExplorer` shows
and what a script can drive directly::

    state = ExplorerState("RUN/")
    state.select_polygon([[-1, -1], [1, -1], [0, 1]], pcs=(1, 2))   # rows of all particles
    state.save_selection("chosen.npy")                               # cryoformer export --selection
    vol = state.volume_at(state.latents[0])                          # [D, D, D], cached

Everything is computed on **all** particles; only the scatter plot draws a subsample
(:func:`stratified_subsample`), so a selection made on the drawing maps back to every particle.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from cryoformer.analysis import (analysis_dir, decoded_voxel_size, kmeans, pc_traversal, pca,
                                 select_clusters)
from cryoformer.analysis.export import export_run
from cryoformer.io import atomic_open, write_volume
from cryoformer.io.guard import claim_output_file
from cryoformer.trainer import TrainedRun, load_run

from .decode_worker import DecodeResult, DecodeWorker

__all__ = ["ExplorerState", "stratified_subsample", "points_in_polygon", "find_kmeans_labels"]

KMEANS = "kmeans"


def stratified_subsample(labels: np.ndarray, max_points: int, seed: int = 0,
                         min_per_label: int = 50) -> np.ndarray:
    """Rows to *draw*: at most ``max_points``, each label represented in proportion to its size.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` integer label of every particle.
    max_points : int
        Upper bound on the rows returned.
    seed : int
        Seed of the random choice within each label.
    min_per_label : int
        Small labels keep at least this many points (or all of theirs), so a rare cluster stays
        visible.

    Returns
    -------
    np.ndarray
        ``[M]`` sorted unique int64 rows, ``M = min(N, max_points)`` or slightly fewer.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = np.maximum(np.floor(counts * max_points / n), np.minimum(counts, min_per_label)).astype(np.int64)
    while quota.sum() > max_points:  # the floors of small labels pushed us over: trim the largest
        quota[np.argmax(quota)] -= quota.sum() - max_points
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    picks = [rng.choice(order[starts[k]:starts[k + 1]], size=int(quota[k]), replace=False)
             for k in range(len(values)) if quota[k] > 0]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def points_in_polygon(xy: np.ndarray, polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of ``xy`` ``[N, 2]`` inside ``polygon`` ``[M, 2]`` (M ≥ 3; closed implicitly)."""
    from matplotlib.path import Path

    poly = np.asarray(polygon, dtype=np.float64)
    if poly.ndim != 2 or poly.shape[1] != 2 or poly.shape[0] < 3:
        raise ValueError(f"a selection polygon needs at least 3 points (x, y), got shape {poly.shape}")
    return np.nonzero(Path(poly).contains_points(np.asarray(xy, dtype=np.float64)))[0].astype(np.int64)


def find_kmeans_labels(run: TrainedRun) -> Optional[Tuple[np.ndarray, Optional[np.ndarray], str]]:
    """K-means labels written by ``cryoformer analyze`` for this run's epoch, if any.

    Looks in ``RUN/analysis.E`` then ``RUN/analysis`` (when its ``analysis.json`` names this
    epoch, or names none) for ``kmeans_labels.npy`` with one label per particle.

    Returns
    -------
    (labels [N] int64, center_rows [K] int64 or None, path) or None
    """
    n = run.n_particles
    for folder in (analysis_dir(run.run_dir, run.epoch), analysis_dir(run.run_dir)):
        path = os.path.join(folder, "kmeans_labels.npy")
        if not os.path.isfile(path):
            continue
        info_path = os.path.join(folder, "analysis.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as fh:
                epoch = json.load(fh).get("epoch")
            if epoch is not None and int(epoch) != run.epoch:
                continue
        labels = np.load(path, allow_pickle=False).reshape(-1)
        if labels.size != n or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            continue
        centers_path = os.path.join(folder, "kmeans_center_indices.npy")
        centers = np.load(centers_path, allow_pickle=False).astype(np.int64) if os.path.isfile(centers_path) else None
        return labels.astype(np.int64), centers, path
    return None


class ExplorerState:
    """A loaded run and everything the explorer derives from it.

    Parameters
    ----------
    run : str or TrainedRun
        Run directory (loaded with :func:`cryoformer.trainer.load_run`) or a loaded run.
    epoch : int, optional
        Epoch to load (default: lowest held-out loss, else the latest; see ``load_run``); ignored for a loaded run.
    device : str
        Where the model decodes (``"cpu"``, ``"cuda"``, ``"auto"``).
    k : int
        K-means clusters when no ``RUN/analysis/kmeans_labels.npy`` matches (capped at N).
        Computing them takes seconds for 10⁵ particles; ``cryoformer analyze`` writes them
        once for every later session.
    seed : int
        Seed of K-means and of the drawn subsample.
    decode_box : int, optional
        Edge ``D`` of decoded volumes in voxels (even); default the training box.
    cache_size : int
        Decoded volumes kept (LRU).
    on_result : callable, optional
        ``on_result(DecodeResult)`` after each decode (worker thread; see :class:`DecodeWorker`).
    on_busy : callable, optional
        ``on_busy(busy, message)``.

    Attributes
    ----------
    latents : np.ndarray
        ``[N, zdim]`` float32, the run's particle order.
    pca : cryoformer.analysis.PcaResult
    labels : dict[str, np.ndarray]
        Label arrays ``[N]`` int64 by name; ``"kmeans"`` always, others via :meth:`add_labels`.
    center_rows : np.ndarray
        ``[K]`` particle rows of the K-means centres (on the data).
    kmeans_source : str
        Where the K-means labels came from.
    selection : np.ndarray
        ``[M]`` sorted unique rows of the selected particles.
    voxel_size_angstrom : float or None
        Voxel size of decoded volumes.
    """

    def __init__(self, run: Any, epoch: Optional[int] = None, device: str = "auto", k: int = 8,
                 seed: int = 0, decode_box: Optional[int] = None, cache_size: int = 32,
                 on_result: Optional[Callable[[DecodeResult], None]] = None,
                 on_busy: Optional[Callable[[bool, str], None]] = None) -> None:
        self.run: TrainedRun = run if isinstance(run, TrainedRun) else load_run(run, epoch=epoch, device=device)
        self.latents = np.asarray(self.run.latents, dtype=np.float32)
        self.seed = int(seed)
        self.pca = pca(self.latents)
        found = find_kmeans_labels(self.run)
        if found is not None:
            labels, centers, self.kmeans_source = found
            if centers is None or centers.size != labels.max() + 1 or centers.max() >= len(labels):
                centers = self._centres_of(labels)
        else:
            k = max(1, min(int(k), self.n_particles))
            km = kmeans(self.latents, k, seed=self.seed)
            labels, centers = km.labels, km.center_indices
            self.kmeans_source = f"computed here (K = {k}, seed {self.seed})"
        self.labels: Dict[str, np.ndarray] = {KMEANS: labels}
        self.center_rows = np.asarray(centers, dtype=np.int64)
        self.selection = np.zeros(0, dtype=np.int64)
        D = int(decode_box or self.run.box_size)
        if D < 2 or D % 2:
            raise ValueError(f"decode_box must be even and >= 2, got {D}")
        self.decode_box = D
        apix = self.run.pixel_size_angstrom
        self.voxel_size_angstrom = None if apix is None else decoded_voxel_size(self.run.box_size, apix, D)
        self._model_lock = threading.Lock()
        self.worker = DecodeWorker(self._decode, D, cache_size, on_result=on_result, on_busy=on_busy)

    # ------------------------------------------------------------------ data
    @property
    def n_particles(self) -> int:
        return int(self.latents.shape[0])

    @property
    def n_pcs(self) -> int:
        return int(self.pca.projections.shape[1])

    def _centres_of(self, labels: np.ndarray) -> np.ndarray:
        """Row of the particle nearest to each label's mean latent (labels without a centre file)."""
        from cryoformer.analysis import nearest_on_data

        means = np.stack([self.latents[labels == c].mean(0) if np.any(labels == c) else self.latents.mean(0)
                          for c in range(int(labels.max()) + 1)])
        return nearest_on_data(means, self.latents)

    def add_labels(self, name: str, labels: np.ndarray) -> np.ndarray:
        """Colour by another label array (e.g. the ground-truth state of each particle).

        Parameters
        ----------
        name : str
        labels : np.ndarray
            ``[N]`` one per run particle, or one per particle of the *original* stack (mapped
            through the run's ``particle_indices``). Non-negative integers.

        Returns
        -------
        np.ndarray
            ``[N]`` int64 labels stored under ``name``.
        """
        lab = np.asarray(labels).reshape(-1)
        idx = self.run.particle_indices
        if lab.size != self.n_particles:
            if lab.size > int(idx.max()):
                lab = lab[idx]
            else:
                raise ValueError(f"{name!r}: {lab.size} labels, but the run has {self.n_particles} particles "
                                 f"(from a stack of at least {int(idx.max()) + 1})")
        if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
            raise ValueError(f"{name!r}: labels must be non-negative integers")
        self.labels[str(name)] = lab.astype(np.int64)
        return self.labels[str(name)]

    def coords(self, pcs: Tuple[int, int]) -> np.ndarray:
        """``[N, 2]`` float32 coordinates of every particle on PCs ``pcs`` (1-based)."""
        a, b = (int(p) for p in pcs)
        if not (1 <= a <= self.n_pcs and 1 <= b <= self.n_pcs):
            raise ValueError(f"PCs must lie in 1…{self.n_pcs}, got {pcs}")
        return self.pca.projections[:, [a - 1, b - 1]]

    def drawn_rows(self, max_points: int = 20000) -> np.ndarray:
        """Rows drawn in the scatter: :func:`stratified_subsample` of the K-means labels."""
        return stratified_subsample(self.labels[KMEANS], max_points, seed=self.seed)

    def traversal_latents(self, pc: int, n_steps: int = 21,
                          percentiles: Tuple[float, float] = (5.0, 95.0)) -> np.ndarray:
        """``[n_steps, zdim]`` latents along PC ``pc`` (1-based), :func:`cryoformer.analysis.pc_traversal`."""
        return pc_traversal(self.pca, int(pc), int(n_steps), percentiles)

    # ------------------------------------------------------------------ selection
    def _apply(self, rows: np.ndarray, mode: str) -> np.ndarray:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_particles):
            raise ValueError(f"particle rows must lie in 0…{self.n_particles - 1}")
        if mode == "replace":
            self.selection = rows
        elif mode == "add":
            self.selection = np.union1d(self.selection, rows)
        elif mode == "remove":
            self.selection = np.setdiff1d(self.selection, rows)
        else:
            raise ValueError(f"mode must be replace, add or remove, got {mode!r}")
        return self.selection

    def select_rows(self, rows: Sequence[int], mode: str = "replace") -> np.ndarray:
        """Set (``replace``), extend (``add``) or reduce (``remove``) the selection; returns it."""
        return self._apply(np.asarray(rows), mode)

    def select_polygon(self, polygon: Sequence[Sequence[float]], pcs: Tuple[int, int] = (1, 2),
                       mode: str = "replace") -> np.ndarray:
        """Select every particle (not only the drawn ones) inside ``polygon`` on PCs ``pcs``."""
        return self._apply(points_in_polygon(self.coords(pcs), polygon), mode)

    def select_clusters(self, clusters: Sequence[int], label_set: str = KMEANS,
                        mode: str = "replace") -> np.ndarray:
        """Select the particles whose ``label_set`` label is in ``clusters``."""
        return self._apply(select_clusters(self.labels[label_set], clusters), mode)

    def clear_selection(self) -> None:
        self.selection = np.zeros(0, dtype=np.int64)

    def save_selection(self, path: str, force: bool = False) -> str:
        """Write the selected rows as an int64 ``.npy`` (what ``cryoformer export --selection``
        and :func:`cryoformer.analysis.load_selection` read); atomic. Returns the path.

        An existing file is replaced only with ``force``; a file of the run never."""
        path = os.path.abspath(os.fspath(path))
        if not path.endswith(".npy"):
            raise ValueError(f"a selection is saved as .npy, got {path}")
        claim_output_file(path, self.run.input_files(), force, option="path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "wb") as fh:
            np.save(fh, self.selection.astype(np.int64), allow_pickle=False)
        return path

    def export_selection(self, path: str, fmt: str = "star", force: bool = False) -> dict:
        """Write the selection for RELION / cryoSPARC / cryoDRGN through
        :func:`cryoformer.analysis.export.export_run` (indices of the original stack).

        An existing file is replaced only with ``force``; a file of the run never."""
        if self.selection.size == 0:
            raise ValueError("nothing is selected")
        path = os.path.abspath(os.fspath(path))
        claim_output_file(path, self.run.input_files(), force, option="path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return export_run(self.run, self.selection, fmt, path)

    # ------------------------------------------------------------------ volumes
    def _decode(self, z: np.ndarray, D: int) -> np.ndarray:
        import torch

        with self._model_lock, torch.no_grad():
            return self.run.model.decode_volume(z, D).float().cpu().numpy()

    def request_volume(self, z: np.ndarray, tag: Any = None):
        """Decode at ``z`` ``[zdim]`` in the background; a Future of :class:`DecodeResult`."""
        return self.worker.submit(z, self.decode_box, tag)

    def volume_at(self, z: np.ndarray) -> np.ndarray:
        """Decode at ``z`` now (cached): ``[D, D, D]`` float32, voxel :attr:`voxel_size_angstrom`."""
        return self.worker.decode_now(z, self.decode_box)

    def save_volume(self, path: str, volume: np.ndarray, force: bool = False) -> str:
        """Write ``volume`` as ``.mrc`` with the decoded voxel size (atomic). Returns the path.

        An existing file is replaced only with ``force``; a file of the run never."""
        path = os.path.abspath(os.fspath(path))
        claim_output_file(path, self.run.input_files(), force, option="path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_volume(path, np.asarray(volume, dtype=np.float32), self.voxel_size_angstrom or 1.0)
        return path

    def close(self) -> None:
        self.worker.shutdown()
