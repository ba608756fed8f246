"""Volumes as meshes in the notebook: a trajectory player (``TrajectoryView``) and one map (``VolumeView``).

>>> from cryoformer_widgets.trajectory_view import TrajectoryView
>>> tv = TrajectoryView("RUN/", clusters=(0, 4), n_frames=12)   # in a cell: tv is displayed
>>> tv.wait().latents.shape                                     # (12, zdim), decoded in the background
>>> tv.mode = "data"; tv.set_clusters(0, 4)                     # along the data (k-NN graph) instead
>>> tv.export()                                                 # RUN maps + ChimeraX script + movie

A trajectory is a :class:`cryoformer.analysis.traversal.LatentPath` between two endpoints (two
K-means clusters, two particles or two latent vectors), built as ``cryoformer traverse`` builds
it: a straight line in latent space (:func:`~cryoformer.analysis.traversal.straight_path`) or
the shortest path through the k-nearest-neighbour graph of the particles
(:func:`~cryoformer.analysis.traversal.graph_path`, ``mode="data"``). Its maps are decoded in a
background thread through the session's one decoder, frame after frame, so the notebook stays
responsive and decoding time is shown; setting new endpoints cancels a build still running.
Every frame is turned into a triangle mesh (:func:`mesh_from_volume`: marching cubes at one
density level for the whole series, as the ``traverse`` movie and ChimeraX script use) and sent
once to the browser, where ``static/mesh_view.js`` draws it with WebGL (drag to rotate, wheel
to zoom) and plays the series; the three central slices of every frame are the fallback view
where WebGL is missing. :meth:`TrajectoryView.export` writes the series through
:func:`~cryoformer.analysis.traversal.write_series`, the files ``cryoformer traverse`` writes.

The work itself (path, maps, meshes, cancelling, export) is :class:`TrajectoryBuilder`, which has
no widget: :class:`TrajectoryView` and the trajectory player of
:class:`~cryoformer_widgets.latent_explorer.LatentExplorer` each drive one and show what it
reports (:class:`TrajectorySeries`).

Wire format of one mesh (:meth:`Mesh.to_bytes`, read by ``unpackMesh`` in ``mesh_view.js``),
little-endian: ``b"CFM1"``, uint32 ``V``, uint32 ``F``, uint32 flags (bit 0: colours), int32
frame, uint32 series; then float32 positions ``[V, 3]``, float32 normals ``[V, 3]``, uint32
triangle indices ``[F, 3]`` and, with bit 0, float32 RGB colours ``[V, 3]`` in ``[0, 1]``.
"""

from __future__ import annotations

import math
import os
import pathlib
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

import anywidget
import numpy as np
import traitlets as t
from matplotlib import colormaps
from scipy import ndimage

from cryoformer.analysis.render import iso_level, series_level, slices_png
from cryoformer.analysis.traversal import (DEFAULT_GRAPH_POINTS, DEFAULT_NEIGHBOURS, LatentPath, SeriesConfig,
                                           graph_path, straight_path, write_series)
from cryoformer.clustering import nearest_on_data
from cryoformer.io.atomic import staged_directory
from cryoformer.io.guard import claim_output_dir

from .decode_worker import KnownMapsDecoder, latent_key
from .session import DEFAULT_K, RunSession, pc_label

__all__ = ["Mesh", "mesh_from_volume", "mesh_view_esm", "TrajectoryView", "VolumeView", "TrajectoryBuilder",
           "TrajectorySeries", "Endpoints", "MESH_MAGIC", "MAX_MESH_GRID", "MODES"]

_STATIC = pathlib.Path(__file__).parent / "static"
MESH_MAGIC = b"CFM1"
_HEADER = struct.Struct("<4sIIIiI")  # magic, V, F, flags, frame, series
# Marching cubes runs on at most this many voxels per axis (a coarser step on larger maps): a
# 64³ grid gives meshes of ~10⁴–10⁵ vertices, a few MiB per frame to send to the browser.
MAX_MESH_GRID = 64
MODES = ("straight", "data")


def mesh_view_esm() -> str:
    """The ES-module source of ``static/mesh_view.js`` (``createMeshView``, ``unpackMesh``), to
    prepend to another widget's module: anywidget loads one module, so it cannot import a file."""
    return (_STATIC / "mesh_view.js").read_text(encoding="utf-8")


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class Mesh:
    """A triangle mesh of one isosurface, in the unit cube centred on the box centre.

    Attributes
    ----------
    positions : np.ndarray
        ``[V, 3]`` float32 vertex coordinates ``(x, y, z)``: voxel coordinates relative to the
        centre voxel ``D//2`` divided by the box edge ``D``, so every vertex lies in
        ``[-0.5, 0.5]³`` and maps of one box keep their relative size.
    normals : np.ndarray
        ``[V, 3]`` float32 unit normals pointing out of the density (down its gradient).
    faces : np.ndarray
        ``[F, 3]`` uint32 vertex indices, counter-clockwise seen from outside.
    colors : np.ndarray or None
        ``[V, 3]`` float32 RGB in ``[0, 1]`` per vertex, or None (the viewer's surface colour).
    level : float
        Density level of the surface (the map's units).
    """

    positions: np.ndarray
    normals: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray]
    level: float

    @property
    def n_vertices(self) -> int:
        return int(self.positions.shape[0])

    def to_bytes(self, frame: int = 0, series: int = 0) -> bytes:
        """The mesh in the wire format of the module docstring (what ``unpackMesh`` reads)."""
        flags = 1 if self.colors is not None else 0
        parts = [_HEADER.pack(MESH_MAGIC, self.n_vertices, int(self.faces.shape[0]), flags, int(frame), int(series)),
                 np.ascontiguousarray(self.positions, "<f4").tobytes(),
                 np.ascontiguousarray(self.normals, "<f4").tobytes(),
                 np.ascontiguousarray(self.faces, "<u4").tobytes()]
        if self.colors is not None:
            parts.append(np.ascontiguousarray(self.colors, "<f4").tobytes())
        return b"".join(parts)


def _empty_mesh(level: float, colored: bool) -> Mesh:
    zeros = np.zeros((0, 3), np.float32)
    return Mesh(zeros, zeros.copy(), np.zeros((0, 3), np.uint32), zeros.copy() if colored else None, level)


def _vertex_colors(color_volume: np.ndarray, verts_index: np.ndarray, color_range: Optional[Tuple[float, float]],
                   colormap: str) -> np.ndarray:
    """``[V, 3]`` float32 RGB of ``color_volume`` ``[D, D, D]`` sampled (trilinear) at vertex
    index coordinates ``verts_index`` ``[V, 3]`` (z, y, x) through ``colormap``."""
    values = ndimage.map_coordinates(np.asarray(color_volume, np.float32), verts_index.T, order=1, mode="nearest")
    lo, hi = color_range if color_range is not None else (float(np.min(color_volume)), float(np.max(color_volume)))
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    return colormaps[colormap](scaled)[:, :3].astype(np.float32)


def mesh_from_volume(volume: np.ndarray, level: Optional[float] = None, threshold_sigma: float = 1.5,
                     color_volume: Optional[np.ndarray] = None,
                     color_range: Optional[Tuple[float, float]] = None, colormap: str = "viridis",
                     max_grid: int = MAX_MESH_GRID) -> Mesh:
    """The isosurface of ``volume`` as a triangle mesh (marching cubes, scikit-image).

    Parameters
    ----------
    volume : np.ndarray
        ``[D, D, D]`` density, axes ``[z, y, x]``.
    level : float, optional
        Absolute density level; default ``mean + threshold_sigma·σ`` of ``volume``
        (:func:`cryoformer.analysis.render.iso_level`). A series uses one level for every map
        (:func:`cryoformer.analysis.render.series_level`).
    threshold_sigma : float
        Standard deviations above the mean, when ``level`` is not given.
    color_volume : np.ndarray, optional
        ``[D, D, D]`` scalar map (e.g. :func:`cryoformer.analysis.flex_score`) sampled at the
        vertices to colour them.
    color_range : (float, float), optional
        Values mapped to the ends of ``colormap`` (default the map's minimum and maximum).
    colormap : str
        A matplotlib colormap name.
    max_grid : int
        Marching cubes samples every ``ceil(D / max_grid)``-th voxel, so large maps give meshes
        of a size a browser draws smoothly.

    Returns
    -------
    Mesh
        Empty (no vertices) when ``level`` lies outside the map's range.
    """
    try:  # scikit-image comes with the napari extra only, not with the core or the Jupyter extra
        from skimage.measure import marching_cubes
    except ImportError as exc:
        raise ImportError("meshes of maps need scikit-image: pip install scikit-image") from exc

    v = np.array(volume, dtype=np.float32)  # a copy: marching cubes refuses the cache's read-only maps
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"expected a cubic [D, D, D] volume, got shape {v.shape}")
    if color_volume is not None and np.shape(color_volume) != v.shape:
        raise ValueError(f"color_volume has shape {np.shape(color_volume)}, the volume {v.shape}")
    D = v.shape[0]
    level = iso_level(v, threshold_sigma) if level is None else float(level)
    if not float(v.min()) < level < float(v.max()):
        return _empty_mesh(level, color_volume is not None)
    step = max(1, math.ceil(D / max(int(max_grid), 2)))
    verts, faces, normals, _ = marching_cubes(v, level, step_size=step, allow_degenerate=False)
    # (z, y, x) index order → (x, y, z): a reflection, which also turns marching cubes' clockwise
    # faces (seen from outside) counter-clockwise, as WebGL's front faces.
    positions = ((verts[:, ::-1] - D // 2) / D).astype(np.float32)
    n = normals[:, ::-1].astype(np.float64)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 0, n / np.maximum(length, 1e-12), [0.0, 0.0, 1.0]).astype(np.float32)
    colors = None if color_volume is None else _vertex_colors(color_volume, verts, color_range, colormap)
    return Mesh(positions, n, faces.astype(np.uint32), colors, level)


class _MeshWidget(anywidget.AnyWidget):
    """What :class:`VolumeView` and :class:`TrajectoryView` share: frames of meshes (and slice
    PNGs) sent once per series on the front end's request, the player traits, status lines."""

    _esm = mesh_view_esm() + "\n" + (_STATIC / "trajectory_view.js").read_text(encoding="utf-8")

    kind = t.Unicode("volume").tag(sync=True)           # "volume" or "trajectory": controls shown
    series_id = t.Int(0).tag(sync=True)                 # bumped when every frame's mesh changes
    n_frames = t.Int(1).tag(sync=True)                  # frames of the series
    frames_ready = t.Int(0).tag(sync=True)              # frames 0 … frames_ready − 1 can be sent
    frame = t.Int(0).tag(sync=True)                     # frame shown
    frame_labels = t.List(t.Unicode()).tag(sync=True)   # what each frame is ("PC1=…, PC2=…")
    playing = t.Bool(False).tag(sync=True)
    fps = t.Float(5.0).tag(sync=True)                   # playback frames per second
    threshold_sigma = t.Float(1.5).tag(sync=True)       # level: σ above the series' mean
    level = t.Float(0.0).tag(sync=True)                 # that level in the maps' units
    view = t.Unicode("mesh").tag(sync=True)             # "mesh" or "slices"
    webgl = t.Unicode("").tag(sync=True)                # set by the front end: webgl2, webgl or none
    title = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    progress = t.Float(0.0).tag(sync=True)              # 0 … 1 of the current build
    status = t.Unicode("").tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._frames_lock = threading.RLock()
        self._meshes: List[Optional[Mesh]] = []
        self._pngs: List[bytes] = []
        self.on_msg(self._on_message)

    def mesh(self, frame: int = 0) -> Mesh:
        """The mesh of ``frame`` (0-based) of the current series."""
        with self._frames_lock:
            if not 0 <= int(frame) < len(self._meshes) or self._meshes[int(frame)] is None:
                raise ValueError(f"frame {frame} is not ready (frames ready: {self.frames_ready})")
            return self._meshes[int(frame)]

    def play(self) -> None:
        """Start playing in the browser (loops over the frames ready)."""
        self.playing = True

    def pause(self) -> None:
        self.playing = False

    def _send_frame(self, frame: int, series: int) -> None:
        """Send one frame's mesh and slice PNG: ``{"type": "frame", …}`` with two buffers."""
        with self._frames_lock:
            if series != self.series_id or not 0 <= frame < self.frames_ready:
                return  # a request of a series replaced meanwhile: the front end drops it too
            mesh, png = self._meshes[frame], self._pngs[frame]
        label = self.frame_labels[frame] if frame < len(self.frame_labels) else ""
        self.send({"type": "frame", "frame": frame, "series": series, "label": label,
                   "vertices": mesh.n_vertices}, [mesh.to_bytes(frame, series), png])

    def _on_message(self, _widget: Any, content: dict, _buffers: Any) -> None:
        """Front-end requests (kernel thread): never raise into the notebook's event loop."""
        try:
            self._handle(content)
        except Exception as exc:  # shown in the widget, not raised
            self.error = f"{content.get('type', 'message')}: {type(exc).__name__}: {exc}"

    def _handle(self, content: dict) -> None:
        if content.get("type") == "frame":
            self._send_frame(int(content["frame"]), int(content["series"]))

    def _publish(self, meshes: List[Mesh], pngs: List[bytes], labels: List[str], level: float) -> None:
        """Make a complete set of frames current (a new series id: the front end drops its cache)."""
        with self._frames_lock:
            self._meshes, self._pngs = list(meshes), list(pngs)
            with self.hold_sync():
                self.series_id += 1
                self.n_frames = len(meshes)
                self.frame_labels = list(labels)
                self.level = float(level)
                self.frame = min(self.frame, len(meshes) - 1)
                self.frames_ready = len(meshes)


class VolumeView(_MeshWidget):
    """One map as a shaded mesh (WebGL; slices where WebGL is missing).

    Parameters
    ----------
    volume : np.ndarray, optional
        ``[D, D, D]`` map to show first.
    threshold_sigma : float
        Surface level in standard deviations above the map's mean (trait; changing it re-meshes).
    label : str
        Title shown above the view.
    color_volume : np.ndarray, optional
        ``[D, D, D]`` scalar map sampled at the vertices to colour them (e.g. a flexible-region
        score; :func:`mesh_from_volume`).
    mesh_grid : int
        Marching cubes runs on at most this many voxels per axis (:func:`mesh_from_volume`).
    """

    def __init__(self, volume: Optional[np.ndarray] = None, threshold_sigma: float = 1.5, label: str = "",
                 color_volume: Optional[np.ndarray] = None, mesh_grid: int = MAX_MESH_GRID, **kwargs: Any) -> None:
        super().__init__(kind="volume", threshold_sigma=float(threshold_sigma), **kwargs)
        self.mesh_grid = int(mesh_grid)
        self._volume: Optional[np.ndarray] = None
        self._color_volume = color_volume
        self.observe(self._on_threshold, names="threshold_sigma")
        if volume is not None:
            self.set_volume(volume, label)

    @property
    def volume(self) -> Optional[np.ndarray]:
        """The map shown, ``[D, D, D]`` float32."""
        return self._volume

    def set_volume(self, volume: np.ndarray, label: str = "", color_volume: Optional[np.ndarray] = None) -> Mesh:
        """Show ``volume`` ``[D, D, D]`` (meshed in the calling thread: ~0.1 s for a 64³ grid)."""
        vol = np.asarray(volume, dtype=np.float32)
        if color_volume is not None:
            self._color_volume = color_volume
        mesh = mesh_from_volume(vol, threshold_sigma=self.threshold_sigma, color_volume=self._color_volume,
                                max_grid=self.mesh_grid)
        self._volume = vol
        self.title = str(label)
        self._publish([mesh], [slices_png(vol, self.threshold_sigma)], [str(label)], mesh.level)
        self.status = f"{mesh.n_vertices} vertices at {self.threshold_sigma:g} σ (level {mesh.level:.4g})"
        return mesh

    def _on_threshold(self, _change: dict) -> None:
        if self._volume is not None:
            try:
                self.set_volume(self._volume, self.title)
                self.error = ""
            except Exception as exc:  # a trait change from the front end: shown, not raised
                self.error = f"threshold: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Endpoints:
    """What a trajectory runs between: ``kind`` "cluster", "particle" or "latent"; ``a``, ``b``
    (cluster numbers, particle rows of the run, or ``[zdim]`` latents)."""

    kind: str
    a: Any
    b: Any

    def slug(self) -> str:
        """``"clusters_0_2"``, ``"particles_5_9"`` or ``"latents"``: a folder name's middle."""
        return f"{self.kind}s_{self.a}_{self.b}" if self.kind != "latent" else "latents"


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class TrajectorySeries:
    """One built trajectory: its path, maps and meshes (all frames, one level).

    Attributes
    ----------
    endpoints : Endpoints
    mode : str
        ``"straight"`` or ``"data"``.
    path : LatentPath
        ``[n, zdim]`` latents of the frames.
    volumes : list of np.ndarray
        ``n`` maps ``[D, D, D]`` float32.
    meshes : list of Mesh
        Isosurface of every map at :attr:`level`.
    pngs : list of bytes
        The three central slices of every map (PNG).
    labels : list of str
        ``"3/10: PC1=…, PC2=…"`` per frame.
    level : float
        Surface level (the maps' units): ``threshold_sigma`` above the pooled mean.
    threshold_sigma : float
    decode_seconds : float
        Mean decoding time per map (s).
    """

    endpoints: Endpoints
    mode: str
    path: LatentPath
    volumes: List[np.ndarray]
    meshes: List[Mesh]
    pngs: List[bytes]
    labels: List[str]
    level: float
    threshold_sigma: float
    decode_seconds: float


def _ignore(*_args: Any) -> None:
    """A callback that does nothing (a builder driven from a script)."""


class TrajectoryBuilder:
    """Trajectories of one session built off the caller's thread, without any widget: the path
    (as ``cryoformer traverse``), its maps through the session's decoder with progress, their
    meshes at one level, and the export. :class:`TrajectoryView` and the explorer's trajectory
    player both drive one.

    Parameters
    ----------
    session : RunSession
        Its decoder and cache serve the maps (shared with any front end on the session).
    decode_box : int
        Edge ``D`` of the maps in voxels (even).
    on_progress : callable(fraction, status), optional
        Called (builder thread) after each map: fraction 0 … 1 of the build and a status line.
    on_series : callable(TrajectorySeries, status), optional
        Called (builder thread) when a build or a re-meshing is complete and still current.
    on_error : callable(message), optional
        Called (builder thread) when the current build fails.
    color_volume : np.ndarray, optional
        ``[D, D, D]`` scalar map sampled at every frame's vertices.
    n_neighbours, max_graph_points : int
        The graph of ``mode="data"`` (:func:`~cryoformer.analysis.traversal.graph_path`).
    mesh_grid : int
        Marching cubes runs on at most this many voxels per axis (:func:`mesh_from_volume`).

    Notes
    -----
    One worker thread runs builds, re-meshings and exports in turn. Every :meth:`start` bumps a
    generation number; an older build stops before its next map and never reports.
    """

    def __init__(self, session: RunSession, decode_box: int,
                 on_progress: Callable[[float, str], None] = _ignore,
                 on_series: Callable[[TrajectorySeries, str], None] = _ignore,
                 on_error: Callable[[str], None] = _ignore, color_volume: Optional[np.ndarray] = None,
                 n_neighbours: int = DEFAULT_NEIGHBOURS, max_graph_points: int = DEFAULT_GRAPH_POINTS,
                 mesh_grid: int = MAX_MESH_GRID) -> None:
        if int(decode_box) < 2 or int(decode_box) % 2:
            raise ValueError(f"decode_box must be even and >= 2, got {decode_box}")
        self.session, self.decode_box = session, int(decode_box)
        self._on_progress, self._on_series, self._on_error = on_progress, on_series, on_error
        self.color_volume, self.mesh_grid = color_volume, int(mesh_grid)
        self._graph = (int(n_neighbours), int(max_graph_points))
        self._gen = 0                       # bumped by every new build; older builds stop
        self._lock = threading.Lock()
        self._series: Optional[TrajectorySeries] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryoformer-trajectory")
        self._future: Optional[Future] = None

    # ------------------------------------------------------------------ endpoints (validated)
    def clusters(self, a: int, b: int) -> Endpoints:
        """Endpoints at the centres of K-means clusters ``a`` and ``b`` (the session's numbering)."""
        for c in (a, b):
            if not 0 <= int(c) < self.session.n_clusters:
                raise ValueError(f"cluster {c} out of range 0…{self.session.n_clusters - 1}")
        return Endpoints("cluster", int(a), int(b))

    def particles(self, i: int, j: int) -> Endpoints:
        """Endpoints at the latents of particle rows ``i`` and ``j`` of the run."""
        for row in (i, j):
            self.session.from_particle(int(row))  # raises for a row out of range
        return Endpoints("particle", int(i), int(j))

    def latents(self, z_start: np.ndarray, z_end: np.ndarray) -> Endpoints:
        """Endpoints at two latent vectors ``[zdim]``."""
        zdim = self.session.latents.shape[1]
        za, zb = (np.asarray(z, np.float32).reshape(-1) for z in (z_start, z_end))
        if za.size != zdim or zb.size != zdim or not (np.all(np.isfinite(za)) and np.all(np.isfinite(zb))):
            raise ValueError(f"endpoints must be two finite latents of {zdim} numbers, got {za.size} and {zb.size}")
        return Endpoints("latent", za, zb)

    # ------------------------------------------------------------------ results
    @property
    def series(self) -> Optional[TrajectorySeries]:
        """The newest complete series (None before the first build finished)."""
        return self._series

    def wait(self, timeout: Optional[float] = 120.0) -> "TrajectoryBuilder":
        """Block until the newest task (build, re-meshing, export) has finished; re-raises its error."""
        future = self._future
        if future is not None:
            future.result(timeout=timeout)
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the builder's thread, after any build (an export button)."""
        self._future = self._executor.submit(fn, *args)
        return self._future

    def cancel(self) -> None:
        """Stop a running build before its next map; it never reports."""
        self._gen += 1

    def close(self) -> None:
        self.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ building
    def start(self, ends: Endpoints, mode: str, n_frames: int, threshold_sigma: float) -> Future:
        """Build the series between ``ends`` in the background; a build still running stops."""
        mode, n = check_mode(mode), check_frames(n_frames)
        self._gen += 1
        return self.submit(self._build, self._gen, ends, mode, n, float(threshold_sigma))

    def _stale(self, gen: int) -> bool:
        return gen != self._gen

    def _build(self, gen: int, ends: Endpoints, mode: str, n: int, sigma: float) -> None:
        """Path, maps, meshes (builder thread). Errors are reported and re-raised for :meth:`wait`."""
        try:
            if mode == "data":
                self._on_progress(0.0, "finding the path through the k-nearest-neighbour graph…")
            path = self._make_path(ends, mode, n)
            if self._stale(gen):
                return
            t0 = time.perf_counter()
            vols = self._decode_series(gen, path)
            if vols is None:
                return
            per_map = (time.perf_counter() - t0) / len(vols)
            t1 = time.perf_counter()
            meshes, pngs, level = self._mesh_series(vols, sigma)
            series = TrajectorySeries(ends, mode, path, vols, meshes, pngs, self._labels(path), level, sigma, per_map)
            with self._lock:
                if self._stale(gen):
                    return
                self._series = series
            self._on_series(series, f"{len(vols)} maps of {self.decode_box}³ decoded in {per_map * len(vols):.1f} s "
                                    f"({per_map:.2f} s/map), meshed in {time.perf_counter() - t1:.1f} s; "
                                    f"level {level:.4g} ({sigma:g} σ)")
        except Exception as exc:
            if not self._stale(gen):
                self._on_error(f"building the trajectory: {type(exc).__name__}: {exc}")
            raise

    def _make_path(self, ends: Endpoints, mode: str, n: int) -> LatentPath:
        """The :class:`LatentPath` of ``n`` latents between ``ends`` (as ``cryoformer traverse``)."""
        s = self.session
        rows: Optional[Tuple[int, int]] = None
        if ends.kind == "cluster":
            rows, what = (int(s.center_rows[ends.a]), int(s.center_rows[ends.b])), f"clusters {ends.a} and {ends.b}"
        elif ends.kind == "particle":
            rows, what = (ends.a, ends.b), f"particles {ends.a} and {ends.b}"
        else:
            what = "two latents"
        if mode == "data":
            if rows is None:  # the graph joins particles: start and end at the nearest ones
                rows = tuple(int(r) for r in nearest_on_data(np.stack([ends.a, ends.b]), s.latents))
                what = f"the particles nearest to two latents ({rows[0]}, {rows[1]})"
            path = graph_path(s.latents, rows[0], rows[1], n, *self._graph, seed=s.seed)
            return LatentPath(path.latents, f"along the data between {what}: {path.description}",
                              path.particles, path.length)
        za, zb = (s.latents[rows[0]], s.latents[rows[1]]) if rows is not None else (ends.a, ends.b)
        return straight_path(za, zb, n, f"straight line between {what}")

    def _decode_series(self, gen: int, path: LatentPath) -> Optional[List[np.ndarray]]:
        """Every map of ``path`` through the session's decoder, one at a time, with progress;
        None when a newer build took over (checked between maps)."""
        n, vols, t0 = len(path.latents), [], time.perf_counter()
        for i, z in enumerate(path.latents):
            if self._stale(gen):
                return None
            vols.append(self.session.volume_at(z, self.decode_box))
            per_map = (time.perf_counter() - t0) / (i + 1)
            if not self._stale(gen):
                self._on_progress(0.9 * (i + 1) / n, f"decoded {i + 1}/{n} maps ({per_map:.2f} s/map)")  # last tenth: meshes
        return vols

    def _mesh_series(self, vols: List[np.ndarray], sigma: float) -> Tuple[List[Mesh], List[bytes], float]:
        """(meshes, slice PNGs, level): every map at one level, ``sigma`` above the pooled mean,
        so a density change shows as a change of the surface."""
        level = series_level(vols, sigma)
        meshes = [mesh_from_volume(v, level=level, color_volume=self.color_volume, max_grid=self.mesh_grid)
                  for v in vols]
        return meshes, [slices_png(v, sigma) for v in vols], level

    def _labels(self, path: LatentPath) -> List[str]:
        """``"3/10: PC1=0.5, PC2=-1.2"`` for every frame."""
        n = len(path.latents)
        return [f"{i + 1}/{n}: {pc_label(self.session.pc_coords(z)[:2])}" for i, z in enumerate(path.latents)]

    def remesh(self, threshold_sigma: float) -> Future:
        """Mesh the current series again at ``threshold_sigma`` (builder thread, after any build)."""
        return self.submit(self._remesh, self._gen, float(threshold_sigma))

    def _remesh(self, gen: int, sigma: float) -> None:
        series = self._series
        if self._stale(gen) or series is None:
            return
        try:
            meshes, pngs, level = self._mesh_series(series.volumes, sigma)
        except Exception as exc:  # a trait change from a front end: reported
            self._on_error(f"threshold: {type(exc).__name__}: {exc}")
            raise
        new = replace(series, meshes=meshes, pngs=pngs, level=level, threshold_sigma=sigma)
        with self._lock:
            if self._stale(gen):
                return
            self._series = new
        self._on_series(new, f"level {level:.4g} ({sigma:g} σ)")

    # ------------------------------------------------------------------ export
    def free_dir(self, output_dir: str) -> str:
        """A directory name in ``output_dir`` not taken yet (``…-2``, ``…-3``) for the current
        series: a click never writes into an earlier export."""
        series = self._series
        what = series.endpoints.slug() if series is not None else "latents"
        mode = series.mode if series is not None else "straight"
        stem = os.path.join(output_dir, f"trajectory_{what}_{mode}")
        candidate, k = stem, 1
        while os.path.lexists(candidate):
            k += 1
            candidate = f"{stem}-{k}"
        return candidate

    def export(self, out_dir: Optional[str], output_dir: str, force: bool = False, movie: bool = True,
               fps: float = 5.0) -> dict:
        """Write the current series as ``cryoformer traverse`` does, through
        :func:`~cryoformer.analysis.traversal.write_series` (see :meth:`TrajectoryView.export`).

        Parameters
        ----------
        out_dir : str or None
            Output directory; None: a new one in ``output_dir`` (:meth:`free_dir`). An existing
            non-empty directory is written into only with ``force``; one holding a file of the
            run never.
        output_dir : str
        force, movie : bool
        fps : float
            Movie frames per second.

        Returns
        -------
        dict
            ``out_dir``, ``maps`` (file names), ``level``, ``files`` (every file written).
        """
        series = self._series
        if series is None:
            raise ValueError("no trajectory built yet (wait for the first one)")
        out = os.path.abspath(out_dir) if out_dir else self.free_dir(output_dir)
        claim_output_dir(out, self.session.run.input_files(), force, option="out_dir")
        D = self.decode_box
        known = {latent_key(z, D): v for z, v in zip(series.path.latents, series.volumes)}
        voxel, _unit = self.session.voxel_size(D)  # training pixels without a pixel size, as traverse
        config = SeriesConfig(box_size=D, iso_sigma=series.threshold_sigma, fps=fps, movie=movie, progress=False)
        with staged_directory(out) as stage:
            result = write_series(KnownMapsDecoder(known, self.session.volume_at), series.path, stage, voxel,
                                  config)
        result["out_dir"] = out
        return result


class TrajectoryView(_MeshWidget):
    """A series of maps along a latent trajectory between two endpoints, played as meshes.

    Parameters
    ----------
    run : str or TrainedRun or RunSession
        Run directory, a loaded run, or an open session (shared with the explorer: its decoder
        and cache serve both; a session given here is not closed by :meth:`close`).
    clusters : (int, int), optional
        K-means clusters whose centres are the endpoints (the session's numbering, that of
        ``cryoformer analyze``). Default, when no endpoints are given: the first and last
        cluster, the two ends of PC1 (clusters are numbered along it).
    particles : (int, int), optional
        Particle rows of the run as endpoints.
    latents : (array, array), optional
        Two latent vectors ``[zdim]`` as endpoints (``mode="data"`` starts and ends at the
        particles nearest to them).
    n_frames : int
        Maps along the trajectory (≥ 2).
    mode : {"straight", "data"}
        Straight line in latent space, or along the data: the shortest path through the
        ``n_neighbours``-nearest-neighbour graph of the latents (``cryoformer traverse --graph``).
    decode_box : int, optional
        Edge ``D`` of the decoded maps in voxels (default the session's).
    threshold_sigma : float
        Surface level: standard deviations above the mean of all the series' voxels (one level
        for every frame, as the ``traverse`` movie).
    fps : float
        Playback frames per second.
    output_dir : str, optional
        Where the export button writes (default ``./cryoformer_trajectories``).
    color_volume : np.ndarray, optional
        ``[D, D, D]`` scalar map sampled at every frame's vertices (e.g. a flexible-region score).
    n_neighbours, max_graph_points : int
        The graph of ``mode="data"`` (:func:`~cryoformer.analysis.traversal.graph_path`).
    mesh_grid : int
        Marching cubes runs on at most this many voxels per axis (:func:`mesh_from_volume`):
        the default 64 sends ~1 MiB per frame to the browser.
    epoch, device, k
        Passed to :class:`RunSession` when ``run`` is not a session.

    Notes
    -----
    Synchronised traits: ``frame`` (0-based), ``playing``, ``fps``, ``threshold_sigma``,
    ``mode``, ``n_frames``, ``start_cluster`` / ``end_cluster`` (the front end's choice; −1 when
    the endpoints are not clusters), ``view`` (``"mesh"`` / ``"slices"``), ``output_dir``.
    Read-only: ``frames_ready``, ``progress``, ``decode_seconds`` (per frame, mean of the last
    build), ``busy``, ``status``, ``error``, ``title``, ``frame_labels``, ``last_export``.
    The work is done by a :class:`TrajectoryBuilder` (``tv.builder``).
    """

    mode = t.Unicode("straight").tag(sync=True)
    start_cluster = t.Int(-1).tag(sync=True)
    end_cluster = t.Int(-1).tag(sync=True)
    cluster_names = t.List(t.Unicode()).tag(sync=True)
    decode_seconds = t.Float(0.0).tag(sync=True)
    output_dir = t.Unicode("").tag(sync=True)
    last_export = t.Unicode("").tag(sync=True)

    def __init__(self, run: Any, clusters: Optional[Sequence[int]] = None, particles: Optional[Sequence[int]] = None,
                 latents: Optional[Sequence[np.ndarray]] = None, n_frames: int = 10, mode: str = "straight",
                 decode_box: Optional[int] = None, threshold_sigma: float = 1.5, fps: float = 5.0,
                 output_dir: Optional[str] = None, color_volume: Optional[np.ndarray] = None,
                 n_neighbours: int = DEFAULT_NEIGHBOURS, max_graph_points: int = DEFAULT_GRAPH_POINTS,
                 mesh_grid: int = MAX_MESH_GRID, epoch: Optional[int] = None, device: str = "auto",
                 k: int = DEFAULT_K, **kwargs: Any) -> None:
        super().__init__(kind="trajectory", threshold_sigma=float(threshold_sigma), fps=float(fps), **kwargs)
        self._own_session = not isinstance(run, RunSession)
        self.session = RunSession(run, epoch=epoch, device=device, k=k) if self._own_session else run
        self.decode_box = int(decode_box or self.session.decode_box)
        self.builder = TrajectoryBuilder(self.session, self.decode_box, on_progress=self._on_progress,
                                         on_series=self._on_series, on_error=self._on_error,
                                         color_volume=color_volume, n_neighbours=n_neighbours,
                                         max_graph_points=max_graph_points, mesh_grid=mesh_grid)
        self.mesh_grid = int(mesh_grid)
        self._endpoints: Optional[Endpoints] = None
        with self.hold_sync():
            self.mode, self.n_frames = check_mode(mode), check_frames(n_frames)
            self.cluster_names = self.session.cluster_names()
            self.output_dir = os.path.abspath(output_dir or os.path.join(os.getcwd(), "cryoformer_trajectories"))
        self.observe(self._on_threshold, names="threshold_sigma")
        if particles is not None:
            self.set_particles(*particles)
        elif latents is not None:
            self.set_latents(*latents)
        else:
            a, b = clusters if clusters is not None else (0, self.session.n_clusters - 1)
            self.set_clusters(a, b)

    # ------------------------------------------------------------------ endpoints
    def set_clusters(self, a: int, b: int) -> "TrajectoryView":
        """Trajectory between the centres of clusters ``a`` and ``b``; the build starts at once."""
        return self._start(self.builder.clusters(a, b))

    def set_particles(self, i: int, j: int) -> "TrajectoryView":
        """Trajectory between the latents of particle rows ``i`` and ``j`` of the run."""
        return self._start(self.builder.particles(i, j))

    def set_latents(self, z_start: np.ndarray, z_end: np.ndarray) -> "TrajectoryView":
        """Trajectory between two latent vectors ``[zdim]``."""
        return self._start(self.builder.latents(z_start, z_end))

    def rebuild(self) -> "TrajectoryView":
        """Build again with the current ``mode`` and ``n_frames`` (same endpoints)."""
        if self._endpoints is None:
            raise ValueError("no endpoints set yet")
        return self._start(self._endpoints)

    # ------------------------------------------------------------------ results
    @property
    def path(self) -> Optional[LatentPath]:
        """The trajectory of the current series (None before the first path is built)."""
        series = self.builder.series
        return None if series is None else series.path

    @property
    def latents(self) -> np.ndarray:
        """``[n_frames, zdim]`` float32 latents of the current series."""
        if self.path is None:
            raise ValueError("no trajectory built yet")
        return self.path.latents

    @property
    def volumes(self) -> List[np.ndarray]:
        """The maps of the current series, ``[D, D, D]`` float32 each."""
        series = self.builder.series
        return [] if series is None else list(series.volumes)

    def wait(self, timeout: Optional[float] = 120.0) -> "TrajectoryView":
        """Block until the newest build has finished (scripts and tests); re-raises its error."""
        self.builder.wait(timeout)
        return self

    def close(self) -> None:
        self.builder.close()  # a build still running stops after its current frame
        if self._own_session:
            self.session.close()
        super().close()

    # ------------------------------------------------------------------ the builder's reports
    def _start(self, ends: Endpoints) -> "TrajectoryView":
        """Begin building the series between ``ends`` in the background; an older build stops."""
        mode, n = check_mode(self.mode), check_frames(self.n_frames)
        self._endpoints = ends
        with self.hold_sync():
            self.start_cluster, self.end_cluster = (ends.a, ends.b) if ends.kind == "cluster" else (-1, -1)
            self.busy, self.progress, self.error, self.status = True, 0.0, "", "decoding…"
        self.builder.start(ends, mode, n, self.threshold_sigma)
        return self

    def _on_progress(self, fraction: float, status: str) -> None:
        with self.hold_sync():
            self.progress, self.status = float(fraction), status

    def _on_series(self, series: TrajectorySeries, status: str) -> None:
        """A complete series (builder thread): publish its frames."""
        with self._frames_lock:
            self.title = f"{series.path.description} ({len(series.volumes)} maps)"
            self._publish(series.meshes, series.pngs, series.labels, series.level)
        with self.hold_sync():
            self.decode_seconds, self.progress, self.busy = series.decode_seconds, 1.0, False
            self.status, self.error = status, ""

    def _on_error(self, message: str) -> None:
        with self.hold_sync():
            self.busy, self.status, self.error = False, "", message

    def _on_threshold(self, _change: dict) -> None:
        """A new level: re-mesh the maps of the series (builder thread, after any build)."""
        self.builder.remesh(self.threshold_sigma)

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Optional[str] = None, force: bool = False, movie: bool = True) -> dict:
        """Write the current series as ``cryoformer traverse`` does (maps ``vol_000.mrc`` …,
        ``z_path.txt``, ``open_series.cxc``, ``movie.gif``/``.mp4``, ``path_particles.txt`` for a
        path along the data), through :func:`~cryoformer.analysis.traversal.write_series`.

        Parameters
        ----------
        out_dir : str, optional
            Output directory; default a new one in ``output_dir``. An existing non-empty
            directory is written into only with ``force``; one holding a file of the run never.
        force : bool
        movie : bool
            Also render the movie (one isosurface view per map; seconds per map at D = 128).

        Returns
        -------
        dict
            ``out_dir``, ``maps`` (file names), ``level``, ``files`` (every file written).
        """
        result = self.builder.export(out_dir, self.output_dir, force=force, movie=movie, fps=self.fps)
        self.last_export = result["out_dir"]
        return result

    def _export_clicked(self) -> None:
        """The export button (builder thread, after any build): a new directory, status shown."""
        try:
            self.busy, self.status = True, "exporting the series…"
            result = self.export()
            self.status = f"exported {len(result['maps'])} maps, open_series.cxc and the movie to {result['out_dir']}"
            self.error = ""
        except Exception as exc:  # shown, not raised into the event loop
            self.error = f"export: {type(exc).__name__}: {exc}"
        finally:
            self.busy = False

    def _handle(self, content: dict) -> None:
        kind = content.get("type")
        if kind == "build":
            self.mode, self.n_frames = check_mode(str(content["mode"])), check_frames(int(content["n_frames"]))
            self.set_clusters(int(content["start"]), int(content["end"]))
        elif kind == "export":
            self.builder.submit(self._export_clicked)
        else:
            super()._handle(content)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_frames(n: int) -> int:
    """``n`` as an int if a trajectory can have that many frames (≥ 2), else ValueError."""
    if int(n) < 2:
        raise ValueError(f"a trajectory needs at least 2 frames, got {n}")
    return int(n)
