"""The one run session of the Jupyter and napari front ends, without any GUI.

:class:`RunSession` is a loaded run and everything both front ends derive from it: the latents,
their PCA, the K-means clusters, the particle selection, and volumes decoded through one
:class:`~cryoformer_widgets.decode_worker.DecodeWorker` (background thread, LRU cache). The
Jupyter :class:`~cryoformer_widgets.latent_explorer.LatentExplorer` and the napari
:class:`~cryoformer_widgets.napari_dock.RunExplorerDock` only wire controls to it, so "cluster 3"
is the same particle's latent in both, and the same as ``vol_kmeans_03.mrc`` of
``cryoformer analyze`` (same default ``k`` and seed; its labels are reused when it wrote them).
A script can drive it directly::

    session = RunSession("RUN/")
    z, label = session.from_cluster(3)                                  # latent [zdim], "cluster 3 (…)"
    vol = session.volume_at(z)                                          # [D, D, D], cached
    session.select_polygon([[-1, -1], [1, -1], [0, 1]], pcs=(1, 2))     # rows of all particles
    session.save_selection("chosen.npy")                                # cryoformer export --selection
    session.coords(("UMAP1", "UMAP2"))                                  # [N, 2]; also ("z0", "z3")

Scatter axes are named as in cryoDRGN's analysis notebooks: ``PC1`` … (principal components),
``UMAP1``/``UMAP2`` (offered only when ``cryoformer analyze`` wrote ``umap.npy`` for this epoch:
a UMAP is not recomputed here) and ``z0`` … ``z{zdim-1}`` (the latent dimensions themselves).

Particles can be coloured by any of :meth:`RunSession.colourings`: label sets (K-means, the
held-out images, a user's integer labels) and continuous values read from the run by
:mod:`~cryoformer_widgets.particle_values` (defocus, astigmatism, input Euler angles, shift,
pose change after refinement, UMAP coordinates) or given with :meth:`RunSession.add_values`.

Everything is computed on **all** particles; a scatter may draw a subsample
(:func:`stratified_subsample`, above 500 000 points in Jupyter), and a selection made on the
drawing maps back to every particle. :meth:`RunSession.from_latents` opens a session on
latents made elsewhere (another embedding, a simulated latent set) decoded by a run's model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.path import Path

from cryoformer.analysis import AnalyzeConfig, analysis_dir, attention_stack, decoded_voxel_size
from cryoformer.analysis.export import export_run, select_clusters
from cryoformer.analysis.latent_space import kmeans, nearest_on_data, pc_traversal, pca
from cryoformer.io import atomic_open, write_volume
from cryoformer.io.guard import claim_output_file
from cryoformer.trainer import TrainedRun, load_run

from .decode_worker import DecodeResult, DecodeWorker
from .particle_values import (CATEGORICAL, CONTINUOUS, ParticleMetadata, ParticleValue, as_particle_value,
                              read_run_metadata, values_from_metadata)

__all__ = ["RunSession", "ExplorerState", "DEFAULT_K", "KMEANS", "UMAP_AXES", "stratified_subsample",
           "points_in_polygon", "find_kmeans_labels", "find_umap", "pc_label"]

KMEANS = "kmeans"  # name of the K-means label set
# K-means clusters when the run has no labels of `cryoformer analyze`: its own default, so a
# session's clusters are the ones analyze writes (declared once, in AnalyzeConfig).
DEFAULT_K = AnalyzeConfig().k
PC_SLIDER_PERCENTILES = (1.0, 99.0)  # PC slider ranges: wide, but not stretched by outliers
TRAVERSAL_PERCENTILES = (5.0, 95.0)  # PC traversals: those of `cryoformer analyze`
UMAP_AXES = ("UMAP1", "UMAP2")
_AXIS_NAME = re.compile(r"(PC|UMAP|z)(\d+)")
Axis = Union[int, str]  # a 1-based PC number, or an axis name ("PC2", "UMAP1", "z0")


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
    poly = np.asarray(polygon, dtype=np.float64)
    if poly.ndim != 2 or poly.shape[1] != 2 or poly.shape[0] < 3:
        raise ValueError(f"a selection polygon needs at least 3 points (x, y), got shape {poly.shape}")
    return np.nonzero(Path(poly).contains_points(np.asarray(xy, dtype=np.float64)))[0].astype(np.int64)


def _analysis_folders(run: TrainedRun) -> Iterator[str]:
    """``RUN/analysis.E`` then ``RUN/analysis``, each unless its ``analysis.json`` names another
    epoch than the run's (an analysis without an epoch is taken as this one's)."""
    for folder in (analysis_dir(run.run_dir, run.epoch), analysis_dir(run.run_dir)):
        info_path = os.path.join(folder, "analysis.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as fh:
                epoch = json.load(fh).get("epoch")
            if epoch is not None and int(epoch) != run.epoch:
                continue
        yield folder


def find_kmeans_labels(run: TrainedRun) -> Optional[Tuple[np.ndarray, Optional[np.ndarray], str]]:
    """K-means labels written by ``cryoformer analyze`` for this run's epoch, if any.

    Looks in ``RUN/analysis.E`` then ``RUN/analysis`` (when its ``analysis.json`` names this
    epoch, or names none) for ``kmeans_labels.npy`` with one label per particle.

    Returns
    -------
    (labels [N] int64, center_rows [K] int64 or None, path) or None
    """
    n = run.n_particles
    for folder in _analysis_folders(run):
        path = os.path.join(folder, "kmeans_labels.npy")
        if not os.path.isfile(path):
            continue
        labels = np.load(path, allow_pickle=False).reshape(-1)
        if labels.size != n or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            continue
        centers_path = os.path.join(folder, "kmeans_center_indices.npy")
        centers = np.load(centers_path, allow_pickle=False).astype(np.int64) if os.path.isfile(centers_path) else None
        return labels.astype(np.int64), centers, path
    return None


def find_umap(run: TrainedRun) -> Optional[Tuple[np.ndarray, str]]:
    """UMAP coordinates written by ``cryoformer analyze`` for this run's epoch, if any.

    Looks where :func:`find_kmeans_labels` does for ``umap.npy`` of shape ``[N, 2]``, finite.

    Returns
    -------
    (coordinates [N, 2] float32, path) or None
    """
    for folder in _analysis_folders(run):
        path = os.path.join(folder, "umap.npy")
        if not os.path.isfile(path):
            continue
        xy = np.load(path, allow_pickle=False)
        if xy.shape == (run.n_particles, 2) and np.issubdtype(xy.dtype, np.floating) and np.all(np.isfinite(xy)):
            return xy.astype(np.float32), path
    return None


def pc_label(coords: Sequence[float]) -> str:
    """``"PC1=0.12, PC2=-0.3"`` for layer metadata and status lines."""
    return ", ".join(f"PC{i + 1}={float(c):.3g}" for i, c in enumerate(coords))


class RunSession:
    """A loaded run and everything the front ends derive from it.

    Parameters
    ----------
    run : str or TrainedRun
        Run directory (loaded with :func:`cryoformer.trainer.load_run`) or a loaded run.
        A directory that is not a finished run raises :class:`cryoformer.errors.InputError`.
    epoch : int, optional
        Epoch to load (default: lowest held-out loss, else the latest; see ``load_run``);
        ignored for a loaded run.
    device : str
        Where the model decodes (``"cpu"``, ``"cuda"``, ``"auto"``).
    k : int
        K-means clusters when no ``RUN/analysis/kmeans_labels.npy`` matches the epoch (capped
        at N); default :data:`DEFAULT_K`, that of ``cryoformer analyze``. Computing them takes
        seconds for 10⁵ particles; ``cryoformer analyze`` writes them once for every session.
    seed : int
        Seed of K-means and of the drawn subsample.
    decode_box : int, optional
        Default edge ``D`` of decoded volumes in voxels (even); default the training box.
    cache_size : int
        Decoded volumes kept (LRU).
    on_result : callable, optional
        ``on_result(DecodeResult)`` after each background decode (worker thread; see
        :class:`DecodeWorker`).
    on_busy : callable, optional
        ``on_busy(busy, message)``.
    metadata : ParticleMetadata, optional
        Metadata of the session's particles (CTF, poses, held-out images); default read from
        the run (:func:`~cryoformer_widgets.particle_values.read_run_metadata`).
    kmeans_labels : np.ndarray, optional
        ``[N]`` non-negative cluster labels to use instead of reading or computing K-means
        (e.g. those of an earlier ``cryoformer analyze``; centres are the particles nearest to
        each cluster's mean latent).

    Attributes
    ----------
    run : TrainedRun
    latents : np.ndarray
        ``[N, zdim]`` float32, the run's particle order.
    pca : cryoformer.analysis.PcaResult
    labels : dict[str, np.ndarray]
        Label arrays ``[N]`` int64 by name; ``"kmeans"`` always, others via :meth:`add_labels`.
    center_rows : np.ndarray
        ``[K]`` particle rows of the K-means centres (on the data); cluster ``c``'s latent is
        ``latents[center_rows[c]]``.
    kmeans_source : str
        Where the K-means labels came from.
    umap : np.ndarray or None
        ``[N, 2]`` float32 UMAP coordinates of ``cryoformer analyze`` for this epoch, else None.
    umap_source : str
        Where they came from, or why there are none.
    values : dict[str, ParticleValue]
        Continuous values ``[N]`` float32 by name (NaN = unknown), for colouring.
    value_notes : list[str]
        Metadata the run names but that could not be read, and why.
    selection : np.ndarray
        ``[M]`` sorted unique rows of the selected particles.
    decode_box : int
        Default edge ``D`` of decoded volumes (voxels).
    worker : DecodeWorker
        The one decoder of this session (its cache is shared by every request).
    """

    def __init__(self, run: Any, *, epoch: Optional[int] = None, device: str = "auto",
                 k: int = DEFAULT_K, seed: int = 0, decode_box: Optional[int] = None,
                 cache_size: int = 32, on_result: Optional[Callable[[DecodeResult], None]] = None,
                 on_busy: Optional[Callable[[bool, str], None]] = None,
                 metadata: Optional[ParticleMetadata] = None, kmeans_labels: Optional[np.ndarray] = None) -> None:
        self.run: TrainedRun = run if isinstance(run, TrainedRun) else load_run(run, epoch=epoch, device=device)
        self.latents = np.asarray(self.run.latents, dtype=np.float32)
        self.seed = int(seed)
        self.pca = pca(self.latents)
        if kmeans_labels is None:
            labels, self.center_rows, self.kmeans_source = self._clusters(int(k))
        else:
            labels = self._given_labels(kmeans_labels)
            self.center_rows, self.kmeans_source = self._centres_of(labels), "given"
        self.labels: Dict[str, np.ndarray] = {KMEANS: labels}
        found = find_umap(self.run)
        self.umap: Optional[np.ndarray] = None if found is None else found[0]
        self.umap_source = (found[1] if found is not None else
                            f"no umap.npy of `cryoformer analyze` for epoch {self.run.epoch}")
        self.values: Dict[str, ParticleValue] = {}
        self.value_notes: List[str] = []
        self._read_values(metadata)
        self.selection = np.zeros(0, dtype=np.int64)
        D = int(decode_box or self.run.box_size)
        if D < 2 or D % 2:
            raise ValueError(f"decode_box must be even and >= 2, got {D}")
        self.decode_box = D
        # The worker thread decodes volumes and the caller's thread attention maps: one model, one at a time.
        self._model_lock = threading.Lock()
        self.worker = DecodeWorker(self._decode, D, cache_size, on_result=on_result, on_busy=on_busy)

    def _clusters(self, k: int) -> Tuple[np.ndarray, np.ndarray, str]:
        """(labels ``[N]``, centre rows ``[K]``, source): those of ``cryoformer analyze``, else computed."""
        found = find_kmeans_labels(self.run)
        if found is not None:
            labels, centers, source = found
            if centers is None or centers.size != labels.max() + 1 or centers.max() >= len(labels):
                centers = self._centres_of(labels)
            return labels, np.asarray(centers, dtype=np.int64), source
        k = max(1, min(k, self.n_particles))
        km = kmeans(self.latents, k, seed=self.seed)
        return km.labels, np.asarray(km.center_indices, dtype=np.int64), f"computed here (K = {k}, seed {self.seed})"

    def _given_labels(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` checked: ``[N]`` non-negative integers (int64)."""
        lab = np.asarray(labels).reshape(-1)
        if lab.size != self.n_particles or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
            raise ValueError(f"kmeans_labels must be {self.n_particles} non-negative integers, "
                             f"got {lab.size} of type {lab.dtype}")
        return lab.astype(np.int64)

    def _read_values(self, metadata: Optional[ParticleMetadata]) -> None:
        """Colourings read from the run's metadata (or ``metadata``) and its UMAP."""
        if metadata is None:
            metadata, self.value_notes = read_run_metadata(self.run)
        for name, value in values_from_metadata(metadata).items():
            if value.values.shape[0] != self.n_particles:
                self.value_notes.append(f"{name}: {value.values.shape[0]} values for {self.n_particles} particles")
            elif value.kind == CATEGORICAL:
                self.labels[name] = value.values
            else:
                self.values[name] = value
        if self.umap is not None:
            for col, name in enumerate(UMAP_AXES):
                self.values[name] = ParticleValue(name, self.umap[:, col], CONTINUOUS, self.umap_source)

    @classmethod
    def from_latents(cls, run: Any, latents: np.ndarray, *, particle_indices: Optional[np.ndarray] = None,
                     **kwargs: Any) -> "RunSession":
        """A session on ``latents`` made elsewhere, decoded with ``run``'s model.

        Parameters
        ----------
        run : str or TrainedRun
            The run whose model decodes (a directory is loaded with ``load_run``).
        latents : np.ndarray
            ``[N, zdim]`` finite latents (``zdim`` that of the run's model), e.g. a simulated
            latent set or latents encoded from other particles.
        particle_indices : np.ndarray, optional
            ``[N]`` rows of the run's original stack that the latents belong to; their CTF and
            input poses are then read from the run's metadata. Without them the latents are
            numbered ``0 … N − 1`` and nothing is read from the run's metadata (it describes
            other particles): pass ``metadata=`` instead.
        **kwargs
            As :class:`RunSession` (``metadata=``: a :class:`ParticleMetadata` of these
            particles; ``kmeans_labels=`` to skip K-means).
        """
        loaded = run if isinstance(run, TrainedRun) else load_run(run, epoch=kwargs.pop("epoch", None),
                                                                  device=kwargs.pop("device", "auto"))
        z = np.asarray(latents, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != loaded.model_config.zdim or not np.all(np.isfinite(z)):
            raise ValueError(f"latents must be finite [N, {loaded.model_config.zdim}], got shape {z.shape}")
        idx = (np.arange(z.shape[0], dtype=np.int64) if particle_indices is None
               else np.asarray(particle_indices, dtype=np.int64).reshape(-1))
        if idx.size != z.shape[0]:
            raise ValueError(f"{idx.size} particle indices for {z.shape[0]} latents")
        if particle_indices is None:
            kwargs.setdefault("metadata", ParticleMetadata())
        # refined poses are stored in the run's own particle order: valid only for those particles
        same = np.array_equal(idx, loaded.particle_indices)
        return cls(dataclasses.replace(loaded, latents=z, particle_indices=idx,
                                       refined_poses_path=loaded.refined_poses_path if same else None), **kwargs)

    def _centres_of(self, labels: np.ndarray) -> np.ndarray:
        """Row of the particle nearest to each label's mean latent (labels without a centre file)."""
        means = np.stack([self.latents[labels == c].mean(0) if np.any(labels == c) else self.latents.mean(0)
                          for c in range(int(labels.max()) + 1)])
        return nearest_on_data(means, self.latents)

    # ------------------------------------------------------------------ latent space
    @property
    def n_particles(self) -> int:
        return int(self.latents.shape[0])

    @property
    def n_pcs(self) -> int:
        return int(self.pca.projections.shape[1])

    @property
    def n_clusters(self) -> int:
        return int(self.center_rows.size)

    def add_labels(self, name: str, labels: np.ndarray) -> np.ndarray:
        """Another label set (e.g. the ground-truth state of each particle), for colouring.

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
        self.values.pop(str(name), None)  # one colouring per name
        self.labels[str(name)] = lab.astype(np.int64)
        return self.labels[str(name)]

    def add_values(self, name: str, values: np.ndarray) -> ParticleValue:
        """Another colouring: float → continuous (NaN = unknown), integer → categories.

        Parameters
        ----------
        name : str
        values : np.ndarray
            ``[N]`` one per run particle, or ``[N₀]`` one per particle of the original stack.

        Returns
        -------
        ParticleValue
            Continuous values are kept in :attr:`values`, categories in :attr:`labels`.

        Raises
        ------
        ValueError
            See :func:`~cryoformer_widgets.particle_values.as_particle_value`; the name
            ``"kmeans"`` is the session's own clustering and cannot be replaced.
        """
        if name == KMEANS:
            raise ValueError(f"{KMEANS!r} is the session's K-means; choose another name")
        value = as_particle_value(name, values, self.run.particle_indices)
        self.labels.pop(value.name, None)
        self.values.pop(value.name, None)
        if value.kind == CATEGORICAL:
            self.labels[value.name] = value.values
        else:
            self.values[value.name] = value
        return value

    def colourings(self) -> List[str]:
        """Names a scatter may be coloured by: label sets (K-means first), then continuous values."""
        return list(self.labels) + list(self.values)

    def colouring(self, name: str) -> ParticleValue:
        """The colouring ``name`` of :meth:`colourings` as a :class:`ParticleValue`."""
        if name in self.labels:
            return ParticleValue(name, self.labels[name], CATEGORICAL, "labels")
        if name in self.values:
            return self.values[name]
        raise ValueError(f"unknown colouring {name!r}; choose from {', '.join(self.colourings())}")

    def axis_names(self) -> List[str]:
        """Scatter axes offered: ``PC1`` … ``PCp``, ``UMAP1``/``UMAP2`` (only with :attr:`umap`),
        then the latent dimensions ``z0`` … ``z{zdim-1}``."""
        names = [f"PC{i}" for i in range(1, self.n_pcs + 1)]
        names += list(UMAP_AXES) if self.umap is not None else []
        return names + [f"z{i}" for i in range(self.latents.shape[1])]

    def _axis(self, axis: Axis) -> Tuple[str, int]:
        """(kind ``"PC"`` / ``"UMAP"`` / ``"z"``, 0-based column) of a PC number or axis name."""
        if isinstance(axis, (int, np.integer)):
            axis = f"PC{int(axis)}"
        match = _AXIS_NAME.fullmatch(str(axis))
        if match is None or str(axis) not in self.axis_names():
            why = " (run `cryoformer analyze` for this epoch first)" if str(axis) in UMAP_AXES else ""
            raise ValueError(f"unknown axis {axis!r}{why}; choose from {', '.join(self.axis_names())}")
        kind, number = match.group(1), int(match.group(2))
        return kind, number if kind == "z" else number - 1

    def axis_values(self, axis: Axis) -> np.ndarray:
        """``[N]`` float32 coordinate of every particle on ``axis`` (a PC number or an axis name)."""
        kind, col = self._axis(axis)
        table = {"PC": self.pca.projections, "UMAP": self.umap, "z": self.latents}[kind]
        return np.asarray(table[:, col], dtype=np.float32)

    def coords(self, axes: Tuple[Axis, Axis]) -> np.ndarray:
        """``[N, 2]`` float32 coordinates of every particle on two axes: PC numbers (1-based, as
        ``(1, 2)``) or names of :meth:`axis_names` (``("UMAP1", "UMAP2")``, ``("z0", "PC1")``)."""
        a, b = axes
        return np.stack([self.axis_values(a), self.axis_values(b)], axis=1)

    def position(self, z: np.ndarray, axes: Tuple[Axis, Axis], row: Optional[int] = None) -> Optional[np.ndarray]:
        """``[2]`` float64 position of latent ``z`` ``[zdim]`` on ``axes``, or None where it has none.

        PCs and latent dimensions place any latent. A UMAP axis places only a particle (``row``,
        a row of the run): the UMAP is read from ``cryoformer analyze``, not refitted, so a latent
        between particles (a PC traversal) has no UMAP position.
        """
        z = np.asarray(z, dtype=np.float64).reshape(-1)  # [zdim]
        out = []
        for axis in axes:
            kind, col = self._axis(axis)
            if kind == "PC":
                out.append(self.pc_coords(z)[col])
            elif kind == "z":
                out.append(z[col])
            elif row is None:
                return None
            else:
                out.append(float(self.umap[self._check_row(row), col]))
        return np.asarray(out, dtype=np.float64)

    def pc_coords(self, z: np.ndarray) -> np.ndarray:
        """``[p]`` float64 PC coordinates of a latent ``z`` ``[zdim]`` (inverse of :meth:`from_pcs`)."""
        return (np.asarray(z, dtype=np.float64) - self.pca.mean) @ self.pca.components.T

    def pc_range(self, pc: int, percentiles: Tuple[float, float] = PC_SLIDER_PERCENTILES) -> Tuple[float, float]:
        """Slider range of PC ``pc`` (1-based): percentiles of the particles' coordinates."""
        lo, hi = np.percentile(self.pca.projections[:, pc - 1], list(percentiles))
        return float(lo), float(hi)

    def drawn_rows(self, max_points: int = 20000) -> np.ndarray:
        """Rows drawn in a scatter: :func:`stratified_subsample` of the K-means labels."""
        return stratified_subsample(self.labels[KMEANS], max_points, seed=self.seed)

    def cluster_names(self) -> List[str]:
        """``"cluster 0 (n=12)"`` … for a combo box."""
        sizes = np.bincount(self.labels[KMEANS], minlength=self.n_clusters)
        return [f"cluster {i} (n={n})" for i, n in enumerate(sizes)]

    # ------------------------------------------------------------------ choosing a latent
    def from_pcs(self, coords: Sequence[float]) -> Tuple[np.ndarray, str]:
        """(latent ``[zdim]``, label) at PC coordinates ``coords`` (PC1, PC2, …; missing PCs are 0).

        Coordinates are in latent units along the unit principal axes (the scale of
        ``pca.projections``), around the mean latent.
        """
        c = np.asarray(coords, dtype=np.float64).reshape(1, -1)
        if c.shape[1] > self.n_pcs:
            raise ValueError(f"{c.shape[1]} PC coordinates given but the latents have only {self.n_pcs} PCs")
        return self.pca.to_latent(c)[0], pc_label(coords)

    def from_cluster(self, cluster: int) -> Tuple[np.ndarray, str]:
        """(latent, label) of cluster ``cluster``'s centre (a real particle's latent)."""
        if not 0 <= int(cluster) < self.n_clusters:
            raise ValueError(f"cluster {cluster} out of range 0…{self.n_clusters - 1}")
        row = int(self.center_rows[int(cluster)])
        return self.latents[row], f"cluster {int(cluster)} (particle {int(self.run.particle_indices[row])})"

    def from_particle(self, index: int, original: bool = False) -> Tuple[np.ndarray, str]:
        """(latent, ``"particle <stack index>"``) of a particle.

        ``index`` is a row of the run (``original=False``) or of the original stack (``True``).
        """
        if original:
            rows = np.nonzero(np.asarray(self.run.particle_indices) == int(index))[0]
            if rows.size == 0:
                raise ValueError(f"particle {index} of the stack was not part of this run (--ind subset)")
            return self.latents[rows[0]], f"particle {int(index)}"
        row = self._check_row(index)
        return self.latents[row], f"particle {int(self.run.particle_indices[row])}"

    def describe_row(self, row: int) -> str:
        """``"particle 12 (stack index 16, cluster 3)"``: a run row with where it comes from."""
        row = self._check_row(row)
        return (f"particle {row} (stack index {int(self.run.particle_indices[row])}, "
                f"cluster {int(self.labels[KMEANS][row])})")

    def _check_row(self, row: int) -> int:
        if not 0 <= int(row) < self.n_particles:
            raise ValueError(f"particle row {row} is outside 0…{self.n_particles - 1}")
        return int(row)

    def traversal_latents(self, pc: int, n_steps: int = 21,
                          percentiles: Tuple[float, float] = TRAVERSAL_PERCENTILES) -> np.ndarray:
        """``[n_steps, zdim]`` latents along PC ``pc`` (1-based), :func:`cryoformer.analysis.pc_traversal`."""
        return pc_traversal(self.pca, int(pc), int(n_steps), percentiles)

    def from_traversal(self, pc: int, step: int, n_steps: int = 21) -> Tuple[np.ndarray, str]:
        """(latent, ``"PC2 step 5/21"``) of step ``step`` (0-based, clamped) along PC ``pc``."""
        zs = self.traversal_latents(pc, n_steps)
        step = min(int(step), len(zs) - 1)
        return zs[step], f"PC{int(pc)} step {step + 1}/{len(zs)}"

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

    def select_polygon(self, polygon: Sequence[Sequence[float]], pcs: Tuple[Axis, Axis] = (1, 2),
                       mode: str = "replace") -> np.ndarray:
        """Select every particle (not only the drawn ones) inside ``polygon`` on the axes ``pcs``
        (PC numbers or axis names, as :meth:`coords`)."""
        return self._apply(points_in_polygon(self.coords(pcs), polygon), mode)

    def select_clusters(self, clusters: Sequence[int], label_set: str = KMEANS,
                        mode: str = "replace") -> np.ndarray:
        """Select the particles whose ``label_set`` label is in ``clusters``."""
        return self._apply(select_clusters(self.labels[label_set], clusters), mode)

    def clear_selection(self) -> None:
        self.selection = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ files
    def _claim(self, path: str, force: bool) -> str:
        """Absolute ``path``, checked by :mod:`cryoformer.io.guard` (an existing file is replaced
        only with ``force``, a file of the run never), its folder created."""
        path = os.path.abspath(os.fspath(path))
        claim_output_file(path, self.run.input_files(), force, option="path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save_selection(self, path: str, force: bool = False) -> str:
        """Write the selected rows as an int64 ``.npy`` (what ``cryoformer export --selection``
        and :func:`cryoformer.analysis.load_selection` read); atomic. Returns the path.

        An existing file is replaced only with ``force``; a file of the run never."""
        path = os.path.abspath(os.fspath(path))
        if not path.endswith(".npy"):
            raise ValueError(f"a selection is saved as .npy, got {path}")
        path = self._claim(path, force)
        with atomic_open(path, "wb") as fh:
            np.save(fh, self.selection.astype(np.int64), allow_pickle=False)
        return path

    def export_selection(self, path: str, fmt: str = "star", force: bool = False) -> dict:
        """Write the selection for RELION / cryoSPARC / cryoDRGN through
        :func:`cryoformer.analysis.export.export_run` (indices of the original stack).

        An existing file is replaced only with ``force``; a file of the run never."""
        if self.selection.size == 0:
            raise ValueError("nothing is selected")
        return export_run(self.run, self.selection, fmt, self._claim(path, force))

    def save_volume(self, path: str, volume: np.ndarray, force: bool = False) -> str:
        """Write ``volume`` ``[D, D, D]`` as ``.mrc`` with its voxel size in Å (1 without a pixel
        size); atomic. Returns the path.

        An existing file is replaced only with ``force``; a file of the run never."""
        path = self._claim(path, force)
        vol = np.asarray(volume, dtype=np.float32)
        voxel, unit = self.voxel_size(vol.shape[0])
        write_volume(path, vol, voxel if unit == "angstrom" else 1.0)
        return path

    # ------------------------------------------------------------------ volumes
    def voxel_size(self, D: Optional[int] = None) -> Tuple[float, str]:
        """(voxel edge, unit) of volumes decoded at ``D`` voxels (default :attr:`decode_box`).

        Å (``"angstrom"``) when the run records a pixel size, else training pixels
        (``"pixel"``), so physical proportions hold either way.
        """
        D = int(D or self.decode_box)
        apix = self.run.pixel_size_angstrom
        if apix:
            return float(decoded_voxel_size(self.run.box_size, apix, D)), "angstrom"
        return float(self.run.box_size) / D, "pixel"

    @property
    def voxel_size_angstrom(self) -> Optional[float]:
        """Voxel size (Å) of volumes decoded at :attr:`decode_box`; None without a pixel size."""
        voxel, unit = self.voxel_size()
        return voxel if unit == "angstrom" else None

    def _decode(self, z: np.ndarray, D: int) -> np.ndarray:
        """The worker's decoder: ``[D, D, D]`` float32 density at ``z`` ``[zdim]``."""
        with self._model_lock, torch.no_grad():
            return self.run.model.decode_volume(z, D).float().cpu().numpy()

    def request_volume(self, z: np.ndarray, tag: Any = None, D: Optional[int] = None):
        """Decode at ``z`` ``[zdim]`` in the background; a Future of :class:`DecodeResult`."""
        return self.worker.submit(z, D or self.decode_box, tag)

    def volume_at(self, z: np.ndarray, D: Optional[int] = None) -> np.ndarray:
        """Decode at ``z`` now (cached): ``[D, D, D]`` float32, read-only, voxel :meth:`voxel_size`."""
        return self.worker.decode_now(z, D or self.decode_box)

    def attention_at(self, z: np.ndarray, D: Optional[int] = None) -> np.ndarray:
        """``[C + K, D, D, D]`` float32 attention maps at ``z`` (:func:`cryoformer.analysis.attention_stack`)."""
        with self._model_lock:
            return attention_stack(self.run.model, np.asarray(z, dtype=np.float32).reshape(-1),
                                   int(D or self.decode_box))

    def close(self) -> None:
        """Stop the decoding thread."""
        self.worker.shutdown()


# The Jupyter explorer's name for the session (the same class, kept for scripts that use it).
ExplorerState = RunSession
