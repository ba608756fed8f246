"""``LatentExplorer``: the latent space of a trained run, with volumes decoded on demand.

>>> from cryoformer_widgets import LatentExplorer
>>> ex = LatentExplorer("RUN/")      # in a notebook cell: ex is displayed
>>> ex.selected_index = 120          # or click a point / a cluster centre (large circle)
>>> ex.wait(); ex.volume.shape       # (D, D, D), decoded in the background
>>> ex.traversal_step = 5            # walk along ``traversal_pc`` (0 … traversal_steps − 1)
>>> ex.select_polygon([[-1, -1], [1, -1], [0, 1]]); ex.save_selection("chosen.npy")

The scatter's axes are any two of ``axis_names``: principal components (``PC1`` …), the UMAP of
``cryoformer analyze`` (``UMAP1``/``UMAP2``, offered when it wrote ``umap.npy`` for this epoch) or
latent dimensions (``z0`` …); ``ex.axis_x, ex.axis_y = "UMAP1", "UMAP2"``.

The front end (``static/latent_explorer.js``) rasterises every particle (up to ``max_drawn``,
500 000 by default; above that a stratified subsample is drawn, the data are never subsampled)
into one image per frame, showing density where points overlap; the wheel zooms about the
cursor, a drag in "pan" mode (or with the right or middle button) pans, "reset" returns to the
first view (the 0.5–99.5 percentile box, so outliers do not squeeze the bulk). Clicks, lasso
and box selections come back in data coordinates; everything else happens here, in Python, so
every feature can also be driven from code.

Colour by any of ``label_sets``: categories (K-means, held-out images, ``add_labels``) or
continuous values read from the run (``defocus_angstrom``, ``astigmatism_angstrom``,
``rot_deg``/``tilt_deg``/``psi_deg``, ``shift_px``, ``pose_change_deg`` after refinement,
``UMAP1``/``UMAP2``) or given with ``ex.add_values(name, array)``; continuous values get a
viridis colour bar between the 1st and 99th percentiles, unknown (NaN) values are grey.

The volume panel shows the decoded map as a WebGL mesh (marching cubes at ``threshold``; drag to
rotate, wheel to zoom) or as the ray-cast image (``volume_view = "3d" | "image"``), beside its
central slices. Trajectories are built in the panel too: two clusters (dropdowns) or two
particles ("path" mode: click the start, then the end), straight or along the data, decoded off
the kernel's thread by a :class:`~cryoformer_widgets.trajectory_view.TrajectoryBuilder` with
progress, then played in the 3D view and drawn on the scatter::

    ex.build_trajectory(clusters=(0, 2), n_frames=10, mode="data").wait_trajectory()
    ex.trajectory_frame = 4            # show the fifth map
    ex.export_trajectory()             # maps + ChimeraX script + movie, as `cryoformer traverse`
    tv = ex.trajectory_view()          # the same trajectory in its own player (same session)

Displayed in a notebook, the widget also carries a PNG of the scatter and the slices
(:meth:`LatentExplorer.snapshot_png`), so a saved notebook shows it without a kernel. Failures of what the front end triggers (an unwritable file, a decoding
error, a bad trait value) are shown in the widget's status line (trait ``error``) and never
raised into the notebook's event loop; methods called from code raise as usual.
"""

from __future__ import annotations

import base64
import io
import os
import pathlib
import re
import threading
from typing import Any, Optional, Sequence

import anywidget
import numpy as np
import traitlets as t
from matplotlib import colormaps
from matplotlib.colors import to_hex
from PIL import Image, ImageDraw

from cryoformer.analysis.traversal import DEFAULT_NEIGHBOURS
from cryoformer.clustering import nearest_on_data

from cryoformer.analysis.render import isosurface_png, palette, png_bytes, slices_png

from .decode_worker import DecodeResult
from .particle_values import CATEGORICAL, colour_levels, robust_limits, robust_view_box
from .session import DEFAULT_K, KMEANS, RunSession
from .trajectory_view import (MAX_MESH_GRID, TrajectoryBuilder, TrajectorySeries, TrajectoryView, check_frames,
                              check_mode, mesh_from_volume, mesh_view_esm)

__all__ = ["LatentExplorer"]

_STATIC = pathlib.Path(__file__).parent / "static"
MAX_DRAWN = 500_000  # points the front end rasterises per frame in well under a second
LEVELS = 255         # colour levels of a continuous value; index LEVELS is "unknown"
MISSING_COLOUR = "#b4b4b4"  # a particle without a value (NaN)


class LatentExplorer(anywidget.AnyWidget):
    """Scatter of a run's latents (PCs, UMAP or latent dimensions), cluster centres, selections and
    decoded volumes.

    Parameters
    ----------
    run : str or TrainedRun or RunSession
        Run directory (``cryoformer train -o``), a loaded run, or an open session (shared, e.g.
        with a script; the explorer takes over its decoding callbacks).
    epoch : int, optional
        Epoch to load (default: lowest held-out loss, else the latest; see ``load_run``).
    device : str
        Where volumes are decoded (``"cpu"``, ``"cuda"``, ``"auto"``).
    k : int
        K-means clusters when the run has no ``analysis/kmeans_labels.npy`` (default that of
        ``cryoformer analyze``, :data:`~cryoformer_widgets.session.DEFAULT_K`).
    labels : dict[str, array], optional
        More colourings, e.g. ``{"true state": np.load("data/gt/state.npy")}`` (one label per
        run particle or per particle of the original stack).
    decode_box : int, optional
        Edge of decoded volumes in voxels (default the training box).
    max_drawn : int
        Most points drawn in the scatter (all of them up to this; a stratified subsample above).
    output_dir : str
        Where the buttons write (``volume_*.mrc``, ``selection_*.npy``, ``selection_*.star``).
    select : "center", int or None
        What is decoded first: the centre of cluster 0 (default), a particle row, or nothing.
    mesh_grid : int
        Marching cubes of the 3D view runs on at most this many voxels per axis
        (:func:`~cryoformer_widgets.trajectory_view.mesh_from_volume`).
    n_neighbours : int
        Neighbours per particle in the graph of trajectories "along the data"
        (:func:`~cryoformer.analysis.traversal.graph_path`, ``cryoformer traverse --neighbours``).

    Notes
    -----
    Synchronised traits a script may set: ``axis_x``, ``axis_y`` (axes drawn, names in
    ``axis_names``: ``"PC1"``, ``"UMAP2"``, ``"z0"``), ``color_by`` (a name in ``label_sets``),
    ``selected_index`` (row of the run's particles, −1 = none), ``view`` (``[x0, x1, y0, y1]``
    shown, data units; the front end writes it back after a zoom or pan), ``traversal_pc`` /
    ``traversal_step`` (−1 = off), ``threshold`` (σ above the mean), ``azimuth`` / ``elevation``
    (degrees), ``output_dir``. ``pc_x`` / ``pc_y`` (not synchronised) are the 1-based PC of each
    axis, 0 when it is not a PC; setting one draws that PC. Read-only results: ``slices_png`` and
    ``iso_png`` (PNG bytes), ``volume_label``, ``n_selected``, ``busy``, ``message``, ``error``,
    ``home_view`` (the first view), ``colorbar`` (limits of a continuous colouring, else empty).

    The 3D view: ``volume_view`` (``"3d"`` or ``"image"``), ``display`` (``"volume"``: the map
    shown; ``"trajectory"``: the trajectory's frame), read-only ``volume_mesh`` (the mesh's
    bytes, :meth:`~cryoformer_widgets.trajectory_view.Mesh.to_bytes`) and ``webgl`` (set by the
    front end). Trajectories: ``trajectory_mode``, ``trajectory_n_frames``, ``trajectory_frame``
    (0-based), ``trajectory_playing``, ``trajectory_fps``; read-only ``trajectory_path``
    (``[n, 2]`` positions of the frames on the axes drawn), ``trajectory_labels``,
    ``trajectory_ready``, ``trajectory_busy``, ``trajectory_progress``, ``trajectory_status``,
    ``trajectory_export`` (the last export's folder).
    """

    # one module: anywidget cannot import a sibling file, so the mesh viewer is prepended
    _esm = mesh_view_esm() + "\n" + (_STATIC / "latent_explorer.js").read_text(encoding="utf-8")
    _css = _STATIC / "latent_explorer.css"

    # scatter (drawn subsample; binary buffers)
    points = t.Bytes(b"").tag(sync=True)            # float32 [M, 2] coordinates on (axis_x, axis_y)
    point_rows = t.Bytes(b"").tag(sync=True)        # int32 [M] row of each drawn point
    point_colors = t.Bytes(b"").tag(sync=True)      # uint8 [M] index into `palette` (continuous: level)
    point_selected = t.Bytes(b"").tag(sync=True)    # uint8 [M] 1 = selected
    palette = t.List(t.Unicode()).tag(sync=True)
    legend = t.List(t.Dict()).tag(sync=True)        # [{name, color, count}]
    centers = t.List(t.Dict()).tag(sync=True)       # [{x, y, row, cluster, color}]
    n_particles = t.Int(0).tag(sync=True)
    n_drawn = t.Int(0).tag(sync=True)
    n_pcs = t.Int(1).tag(sync=True)
    pc_variance = t.List(t.Float()).tag(sync=True)  # explained variance ratio per PC
    axis_names = t.List(t.Unicode()).tag(sync=True)  # "PC1" …, "UMAP1", "UMAP2" (if any), "z0" …
    axis_x = t.Unicode("PC1").tag(sync=True)
    axis_y = t.Unicode("PC2").tag(sync=True)
    pc_x = t.Int(1)                                  # PC of axis_x (0: not a PC), for scripts
    pc_y = t.Int(2)
    label_sets = t.List(t.Unicode()).tag(sync=True)  # every colouring: categories, then values
    color_by = t.Unicode(KMEANS).tag(sync=True)
    colorbar = t.Dict().tag(sync=True)              # {name, vmin, vmax, stops, n_missing}; {} = categories
    home_view = t.List(t.Float()).tag(sync=True)    # [x0, x1, y0, y1] first view (robust box)
    view = t.List(t.Float()).tag(sync=True)         # [x0, x1, y0, y1] shown (front end writes it back)
    # what is shown
    selected_index = t.Int(-1).tag(sync=True)
    marker = t.List(t.Float()).tag(sync=True)       # [x, y] of the shown latent, [] = none
    traversal_pc = t.Int(1).tag(sync=True)
    traversal_step = t.Int(-1).tag(sync=True)
    traversal_steps = t.Int(21).tag(sync=True)
    threshold = t.Float(1.5).tag(sync=True)         # σ above the mean
    azimuth = t.Float(30.0).tag(sync=True)
    elevation = t.Float(20.0).tag(sync=True)
    slices_png = t.Bytes(b"").tag(sync=True)
    iso_png = t.Bytes(b"").tag(sync=True)
    volume_label = t.Unicode("").tag(sync=True)
    volume_info = t.Unicode("").tag(sync=True)
    volume_mesh = t.Bytes(b"").tag(sync=True)      # Mesh.to_bytes() of the volume shown at `threshold`
    volume_view = t.Unicode("3d").tag(sync=True)   # "3d" (WebGL mesh) or "image" (ray-cast PNG)
    webgl = t.Unicode("").tag(sync=True)           # set by the front end: webgl2, webgl or none
    display = t.Unicode("volume").tag(sync=True)   # the 3D view shows the "volume" or the "trajectory"
    # trajectory
    cluster_names = t.List(t.Unicode()).tag(sync=True)
    trajectory_mode = t.Unicode("straight").tag(sync=True)
    trajectory_n_frames = t.Int(10).tag(sync=True)
    trajectory_ends = t.Dict().tag(sync=True)       # {kind, a, b} of the series shown
    trajectory_series = t.Int(0).tag(sync=True)     # bumped when every frame's mesh changes
    trajectory_ready = t.Int(0).tag(sync=True)      # frames of the series (0: none yet)
    trajectory_frame = t.Int(0).tag(sync=True)
    trajectory_playing = t.Bool(False).tag(sync=True)
    trajectory_fps = t.Float(5.0).tag(sync=True)
    trajectory_labels = t.List(t.Unicode()).tag(sync=True)
    trajectory_path = t.List(t.List(t.Float())).tag(sync=True)  # [[x, y]] per frame, axes drawn
    trajectory_busy = t.Bool(False).tag(sync=True)
    trajectory_progress = t.Float(0.0).tag(sync=True)
    trajectory_status = t.Unicode("").tag(sync=True)
    trajectory_export = t.Unicode("").tag(sync=True)
    # selection and output
    n_selected = t.Int(0).tag(sync=True)
    output_dir = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    message = t.Unicode("").tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, run: Any, epoch: Optional[int] = None, device: str = "auto", k: int = DEFAULT_K,
                 labels: Optional[dict] = None, decode_box: Optional[int] = None, max_drawn: int = MAX_DRAWN,
                 output_dir: Optional[str] = None, select: Any = "center", mesh_grid: int = MAX_MESH_GRID,
                 n_neighbours: int = DEFAULT_NEIGHBOURS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.RLock()
        self.mesh_grid = int(mesh_grid)
        self._mesh_missing = ""  # why the 3D view is off (scikit-image missing), else ""
        self._traj_sent: Optional[TrajectorySeries] = None  # the series trajectory_series numbers
        self._traj_rows: Optional[tuple] = None  # (series path, [n] nearest particle rows)
        self._volume: Optional[np.ndarray] = None
        self._shown: Optional[DecodeResult] = None
        if isinstance(run, RunSession):
            self.state = run
            self.state.worker.on_result, self.state.worker.on_busy = self._on_result, self._on_busy
        else:
            self.state = RunSession(run, epoch=epoch, device=device, k=k, decode_box=decode_box,
                                       on_result=self._on_result, on_busy=self._on_busy)
        st = self.state
        self._builder = TrajectoryBuilder(st, st.decode_box, on_progress=self._trajectory_progress,
                                          on_series=self._trajectory_done, on_error=self._trajectory_failed,
                                          mesh_grid=self.mesh_grid, n_neighbours=n_neighbours)
        for name, lab in (labels or {}).items():
            st.add_labels(name, lab)
        self._drawn = st.drawn_rows(max_drawn)
        with self.hold_sync():
            self.n_particles, self.n_drawn, self.n_pcs = st.n_particles, int(self._drawn.size), st.n_pcs
            self.pc_variance = [float(v) for v in st.pca.explained_variance_ratio]
            self.axis_names = st.axis_names()
            self.axis_x, self.axis_y = "PC1", f"PC{min(2, st.n_pcs)}"
            self.point_rows = self._drawn.astype(np.int32).tobytes()
            self.label_sets = st.colourings()
            self.cluster_names = st.cluster_names()
            self.output_dir = os.path.abspath(output_dir or os.path.join(os.getcwd(), "cryoformer_explorer"))
            self._update_points()
            self._update_colors()
            self._update_selection()
        self.on_msg(self._on_message)
        kmeans_note = f"K-means: {st.kmeans_source}"
        umap_note = "UMAP axes offered" if st.umap is not None else "no UMAP (run `cryoformer analyze`)"
        self.message = f"{st.n_particles} particles, {self._drawn.size} drawn; {kmeans_note}; {umap_note}"
        if st.value_notes:
            self.message += "; " + "; ".join(st.value_notes)
        if isinstance(select, str) and select == "center" and st.center_rows.size:
            self.selected_index = int(st.center_rows[0])
        elif select is not None and not isinstance(select, str):
            self.selected_index = int(select)

    # ------------------------------------------------------------------ public API
    @property
    def volume(self) -> Optional[np.ndarray]:
        """The volume shown, ``[D, D, D]`` float32 (voxel ``state.voxel_size_angstrom`` Å)."""
        return self._volume

    @property
    def shown_latent(self) -> Optional[np.ndarray]:
        """``[zdim]`` latent of the volume shown."""
        return None if self._shown is None else self._shown.latent

    def wait(self, timeout: float = 60.0) -> "LatentExplorer":
        """Block until the newest decode has been shown (for scripts and tests)."""
        self.state.worker.wait(timeout)
        return self

    def add_labels(self, name: str, labels: np.ndarray) -> None:
        """Offer another colouring (``[N]`` run particles or ``[N₀]`` original stack)."""
        self.state.add_labels(name, labels)
        self.label_sets = self.state.colourings()

    def add_values(self, name: str, values: np.ndarray) -> None:
        """Offer another colouring: float ``[N]`` (or ``[N₀]``) → continuous with a colour bar
        (NaN = unknown, grey), integer → categories. See :meth:`RunSession.add_values`."""
        self.state.add_values(name, values)
        self.label_sets = self.state.colourings()
        if name == self.color_by:
            self._update_colors()

    def select_polygon(self, polygon: Sequence[Sequence[float]], mode: str = "replace") -> np.ndarray:
        """Select all particles inside ``polygon`` (coordinates on the axes drawn)."""
        rows = self.state.select_polygon(polygon, (self.axis_x, self.axis_y), mode)
        self._update_selection()
        return rows

    def select_box(self, x0: float, y0: float, x1: float, y1: float, mode: str = "replace") -> np.ndarray:
        """Select all particles in the rectangle ``[x0, x1] × [y0, y1]`` (coordinates on the axes drawn)."""
        return self.select_polygon([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], mode)

    def select_clusters(self, clusters: Sequence[int], mode: str = "replace") -> np.ndarray:
        """Select the particles of these clusters of the current colouring."""
        rows = self.state.select_clusters(clusters, self.color_by, mode)
        self._update_selection()
        return rows

    def clear_selection(self) -> None:
        self.state.clear_selection()
        self._update_selection()

    @property
    def selection(self) -> np.ndarray:
        """``[M]`` rows (run particle order) of the selected particles, all of them."""
        return self.state.selection

    def _out(self, path: Optional[str], default: str) -> str:
        """``path``, else a name in ``output_dir`` that is not taken yet (``name-2.ext``, …):
        a click never replaces an earlier file."""
        if path:
            return os.path.abspath(path)
        stem, ext = os.path.splitext(os.path.join(self.output_dir, default))
        candidate, k = stem + ext, 1
        while os.path.lexists(candidate):
            k += 1
            candidate = f"{stem}-{k}{ext}"
        return candidate

    def save_selection(self, path: Optional[str] = None) -> str:
        """Write the selected rows as ``.npy`` (default ``output_dir/selection_<M>.npy``)."""
        out = self.state.save_selection(self._out(path, f"selection_{self.state.selection.size}.npy"))
        self.message, self.error = f"saved {self.state.selection.size} rows to {out}", ""
        return out

    def export_selection(self, path: Optional[str] = None, fmt: str = "star") -> dict:
        """Export the selection (``star``, ``cs-index`` or ``pkl``) for RELION / cryoSPARC / cryoDRGN."""
        ext = {"star": ".star", "cs-index": ".npy", "pkl": ".pkl"}.get(fmt, "")
        info = self.state.export_selection(self._out(path, f"selection_{self.state.selection.size}{ext}"), fmt)
        self.message, self.error = f"exported {info['n_particles']} particles: {', '.join(info['files'])}", ""
        return info

    def save_volume(self, path: Optional[str] = None) -> str:
        """Write the volume shown as ``.mrc`` with its voxel size (Å)."""
        if self._volume is None:
            raise ValueError("no volume is shown yet")
        name = "volume_" + "".join(c if c.isalnum() else "_" for c in self.volume_label).strip("_") + ".mrc"
        out = self.state.save_volume(self._out(path, name), self._volume)
        self.message, self.error = f"wrote {out} ({self.state.voxel_size_angstrom or 1.0:.3f} Å/voxel)", ""
        return out

    # ------------------------------------------------------------------ trajectories
    def build_trajectory(self, clusters: Optional[Sequence[int]] = None, rows: Optional[Sequence[int]] = None,
                         n_frames: int = 10, mode: str = "straight") -> "LatentExplorer":
        """Build a trajectory in the background (a build still running stops); it then plays
        in the 3D view and is drawn on the scatter. :meth:`wait_trajectory` blocks until done.

        Parameters
        ----------
        clusters : (int, int), optional
            K-means clusters whose centres are the endpoints (the numbering of the legend and of
            ``cryoformer analyze``).
        rows : (int, int), optional
            Particle rows of the run as endpoints (instead of ``clusters``).
        n_frames : int
            Maps along the trajectory (≥ 2).
        mode : {"straight", "data"}
            A straight line in latent space, or the shortest path through the particles'
            nearest-neighbour graph (``cryoformer traverse --graph``).
        """
        if (clusters is None) == (rows is None):
            raise ValueError("give the endpoints as clusters=(a, b) or rows=(i, j)")
        mode, n = check_mode(mode), check_frames(n_frames)
        ends = self._builder.clusters(*clusters) if clusters is not None else self._builder.particles(*rows)
        with self.hold_sync():
            self.trajectory_mode, self.trajectory_n_frames = mode, n
            self.trajectory_busy, self.trajectory_progress, self.error = True, 0.0, ""
            self.trajectory_status = "decoding…"
        self._builder.start(ends, mode, n, self.threshold)
        return self

    def wait_trajectory(self, timeout: Optional[float] = 120.0) -> "LatentExplorer":
        """Block until the newest trajectory build (or export) has finished; re-raises its error."""
        self._builder.wait(timeout)
        return self

    @property
    def trajectory(self) -> Optional[TrajectorySeries]:
        """The trajectory shown (path, maps, meshes), None before the first build finished."""
        return self._builder.series

    def export_trajectory(self, out_dir: Optional[str] = None, force: bool = False, movie: bool = True) -> dict:
        """Write the trajectory as ``cryoformer traverse`` does (``vol_000.mrc`` …, ``z_path.txt``,
        ``open_series.cxc``, the movie; see :meth:`TrajectoryView.export`).

        Parameters
        ----------
        out_dir : str, optional
            Default: a new folder ``trajectory_<ends>_<mode>`` in ``output_dir``. An existing
            non-empty folder is written into only with ``force``; one holding a run file never.
        force, movie : bool

        Returns
        -------
        dict
            ``out_dir``, ``maps``, ``level``, ``files``.
        """
        result = self._builder.export(out_dir, self.output_dir, force=force, movie=movie, fps=self.trajectory_fps)
        with self.hold_sync():
            self.trajectory_export = result["out_dir"]
            self.trajectory_status = f"exported {len(result['maps'])} maps, open_series.cxc and the movie to " \
                                     f"{result['out_dir']}"
        return result

    def trajectory_view(self, **kwargs: Any) -> TrajectoryView:
        """A standalone :class:`TrajectoryView` on this explorer's session (decoder and cache
        shared), between the endpoints of the trajectory shown (else the first and last cluster);
        ``kwargs`` go to :class:`TrajectoryView`."""
        options: dict = dict(n_frames=self.trajectory_n_frames, mode=self.trajectory_mode, fps=self.trajectory_fps,
                             threshold_sigma=self.threshold, output_dir=self.output_dir,
                             decode_box=self._builder.decode_box, mesh_grid=self.mesh_grid)
        series = self._builder.series
        if series is not None:
            ends = series.endpoints
            key = {"cluster": "clusters", "particle": "particles", "latent": "latents"}[ends.kind]
            options.update({key: (ends.a, ends.b), "n_frames": len(series.path.latents), "mode": series.mode})
        options.update(kwargs)
        return TrajectoryView(self.state, **options)

    def close(self) -> None:
        builder = getattr(self, "_builder", None)
        if builder is not None:
            builder.close()
        state = getattr(self, "state", None)
        if state is not None:
            state.close()
        super().close()

    # ------------------------------------------------------------------ trait → state
    def _report(self, exc: BaseException, doing: str) -> None:
        self.error = f"{doing}: {type(exc).__name__}: {exc}"
        self.message = ""

    @t.observe("pc_x", "pc_y")
    def _pcs_changed(self, change) -> None:
        if change["new"] >= 1:  # 0: the axis is not a PC (set from axis_x / axis_y)
            setattr(self, "axis_x" if change["name"] == "pc_x" else "axis_y", f"PC{change['new']}")

    @t.observe("axis_x", "axis_y")
    def _axes_changed(self, change) -> None:
        match = re.fullmatch(r"PC(\d+)", change["new"])
        setattr(self, "pc_x" if change["name"] == "axis_x" else "pc_y", int(match.group(1)) if match else 0)
        try:
            self._update_points()
            self._update_marker()
            series = self._builder.series
            self.trajectory_path = [] if series is None else self._trajectory_polyline(series)
        except Exception as exc:
            self._report(exc, "changing axes")

    @t.observe("color_by")
    def _color_changed(self, change) -> None:
        try:
            self._update_colors()
        except Exception as exc:
            self._report(exc, "colouring")

    @t.observe("selected_index")
    def _index_changed(self, change) -> None:
        row = int(change["new"])
        if row < 0:
            return
        try:
            label = self.state.describe_row(row)
            z, _ = self.state.from_particle(row)
            self.traversal_step = -1
            self.display, self.trajectory_playing = "volume", False
            self.state.request_volume(z, (label, ("row", row)))
        except Exception as exc:
            self._report(exc, "selecting a particle")

    @t.observe("traversal_step", "traversal_pc", "traversal_steps")
    def _traversal_changed(self, change) -> None:
        step = int(self.traversal_step)
        if step < 0:
            return
        try:
            z, label = self.state.from_traversal(self.traversal_pc, step, self.traversal_steps)
            self.selected_index = -1
            self.display, self.trajectory_playing = "volume", False
            self.state.request_volume(z, (label, ("pc", self.traversal_pc)))
        except Exception as exc:
            self._report(exc, "walking along a PC")

    @t.observe("threshold", "azimuth", "elevation")
    def _view_changed(self, change) -> None:
        try:
            self._render(mesh=change["name"] == "threshold")
            if change["name"] == "threshold" and self._builder.series is not None:
                self._builder.remesh(self.threshold)  # the trajectory's surfaces at the new level too
        except Exception as exc:
            self._report(exc, "rendering")

    @t.validate("trajectory_frame")
    def _valid_frame(self, proposal) -> int:
        k = int(proposal["value"])
        if self.trajectory_ready and not 0 <= k < self.trajectory_ready:
            raise t.TraitError(f"trajectory_frame {k} out of range 0…{self.trajectory_ready - 1}")
        return k

    @t.observe("trajectory_frame")
    def _frame_changed(self, change) -> None:
        if self.trajectory_ready:
            self.display = "trajectory"  # a frame asked for (slider, player, script) is shown

    # ------------------------------------------------------------------ trajectory builder → traits
    def _trajectory_progress(self, fraction: float, status: str) -> None:
        """Builder thread: one more map decoded."""
        with self.hold_sync():
            self.trajectory_progress, self.trajectory_status, self.trajectory_busy = float(fraction), status, True

    def _trajectory_done(self, series: TrajectorySeries, status: str) -> None:
        """Builder thread: a new series (or the same maps re-meshed): announce its frames, which
        the front end then asks for one by one (:meth:`_send_trajectory_frame`)."""
        new_path = self._traj_sent is None or self._traj_sent.path is not series.path
        polyline = self._trajectory_polyline(series)
        with self._lock:
            self._traj_sent = series
            ends = series.endpoints
            with self.hold_sync():
                self.trajectory_labels = list(series.labels)
                self.trajectory_path = polyline
                self.trajectory_ends = {"kind": ends.kind, "a": ends.a, "b": ends.b} if ends.kind != "latent" else {}
                if new_path:
                    self.trajectory_frame = 0
                self.trajectory_series += 1
                self.trajectory_ready = len(series.meshes)
                self.trajectory_busy, self.trajectory_progress = False, 1.0
                self.trajectory_status = f"{series.path.description}: {status}"
                if new_path:
                    self.display = "trajectory"

    def _trajectory_failed(self, message: str) -> None:
        with self.hold_sync():
            self.trajectory_busy, self.trajectory_status, self.error = False, "", message

    def _trajectory_polyline(self, series: TrajectorySeries) -> list:
        """``[[x, y]]`` of every frame's latent on the axes drawn. PCs and latent dimensions place
        any latent; on a UMAP axis (read from ``analyze``, not refitted) a frame is placed at the
        particle nearest to it in latent space."""
        axes, pts = (self.axis_x, self.axis_y), []
        for k, z in enumerate(series.path.latents):
            xy = self.state.position(z, axes)
            if xy is None:
                xy = self.state.position(z, axes, int(self._nearest_rows(series)[k]))
            pts.append([float(xy[0]), float(xy[1])])
        return pts

    def _nearest_rows(self, series: TrajectorySeries) -> np.ndarray:
        """``[n]`` particle row nearest to each frame's latent (cached per series)."""
        if self._traj_rows is None or self._traj_rows[0] is not series.path:
            self._traj_rows = (series.path, nearest_on_data(series.path.latents, self.state.latents))
        return self._traj_rows[1]

    def _send_trajectory_frame(self, frame: int, series_id: int) -> None:
        """One frame for the front end: ``{"type": "trajectory_frame", frame, series, label}`` with
        two buffers, the mesh (``unpackMesh``'s format) and the PNG of its central slices."""
        with self._lock:
            series = self._traj_sent
            if series is None or series_id != self.trajectory_series or not 0 <= frame < len(series.meshes):
                return  # asked for a series replaced meanwhile: the front end drops it too
            mesh, png, label = series.meshes[frame], series.pngs[frame], series.labels[frame]
        self.send({"type": "trajectory_frame", "frame": frame, "series": series_id, "label": label,
                   "vertices": mesh.n_vertices}, [mesh.to_bytes(frame, series_id), png])

    def _export_trajectory_clicked(self) -> None:
        """The export button (builder thread, after any build): a new folder, status shown."""
        try:
            self.trajectory_busy, self.trajectory_status = True, "exporting the trajectory…"
            self.export_trajectory()
            self.error = ""
        except Exception as exc:  # shown, not raised into the event loop
            self._report(exc, "exporting the trajectory")
            self.trajectory_status = ""
        finally:
            self.trajectory_busy = False

    # ------------------------------------------------------------------ state → traits
    def _update_points(self) -> None:
        xy = self.state.coords((self.axis_x, self.axis_y))  # [N, 2]
        self.points = np.ascontiguousarray(xy[self._drawn], dtype=np.float32).tobytes()
        self.home_view = robust_view_box(xy)  # from every particle, not only the drawn ones
        self.view = list(self.home_view)
        rows = self.state.center_rows
        cl = self.state.labels[KMEANS][rows]
        colors = palette(int(self.state.labels[KMEANS].max()) + 1)
        self.centers = [{"x": float(xy[r, 0]), "y": float(xy[r, 1]), "row": int(r), "cluster": int(c),
                         "color": colors[int(c)]} for r, c in zip(rows, cl)]

    def _update_colors(self) -> None:
        value = self.state.colouring(self.color_by)
        if value.kind == CATEGORICAL:
            lab = value.values
            n = int(lab.max()) + 1
            with self.hold_sync():
                self.palette = palette(n)
                self.point_colors = np.asarray(lab[self._drawn] % 255, dtype=np.uint8).tobytes()
                counts = np.bincount(lab, minlength=n)
                self.legend = [{"name": str(i), "color": self.palette[i], "count": int(counts[i])} for i in range(n)]
                self.colorbar = {}
            return
        lo, hi = robust_limits(value.values)
        colours = continuous_palette()
        with self.hold_sync():
            self.palette = colours
            self.point_colors = colour_levels(value.values[self._drawn], lo, hi, LEVELS).tobytes()
            self.legend = []
            self.colorbar = {"name": value.name, "vmin": lo, "vmax": hi, "stops": colours[:LEVELS:16] + [colours[LEVELS - 1]],
                             "n_missing": int(np.count_nonzero(np.isnan(value.values))), "missing": MISSING_COLOUR}

    def _update_selection(self) -> None:
        mask = np.zeros(self.state.n_particles, dtype=np.uint8)
        mask[self.state.selection] = 1
        self.point_selected = mask[self._drawn].tobytes()
        self.n_selected = int(self.state.selection.size)

    def _update_marker(self) -> None:
        z = self.shown_latent
        tag = self._shown.tag if self._shown is not None else None
        # A particle's own row places it on a UMAP axis; a traversal latent has no UMAP position.
        where = tag[1] if isinstance(tag, tuple) and len(tag) > 1 else None
        row = where[1] if isinstance(where, tuple) and where[0] == "row" else None
        xy = None if z is None else self.state.position(z, (self.axis_x, self.axis_y), row)
        self.marker = [] if xy is None else [float(xy[0]), float(xy[1])]

    # ------------------------------------------------------------------ static picture
    def snapshot_png(self, size_px: int = 420) -> bytes:
        """A PNG of the scatter as drawn (colours, current ``view``, density where points
        overlap) beside the central slices of the volume shown: what a notebook saved with
        this widget's output shows without a kernel.

        Parameters
        ----------
        size_px : int
            Edge of the scatter panel in pixels.

        Returns
        -------
        bytes
            PNG, RGB.
        """
        xy = np.frombuffer(self.points, np.float32).reshape(-1, 2)
        colours = np.asarray([_rgb(c) for c in self.palette] or [(85, 85, 85)], dtype=np.float64)
        index = np.frombuffer(self.point_colors, np.uint8)
        rgb = colours[np.minimum(index, len(colours) - 1)] if index.size == xy.shape[0] else \
            np.full((xy.shape[0], 3), 85.0)
        box = self.view if len(self.view) == 4 else robust_view_box(xy)
        panel = _scatter_panel(xy, rgb, box, size_px, self.axis_x, self.axis_y,
                               f"{self.n_particles} particles, colour: {self.color_by}")
        if self.slices_png:
            slices = Image.open(io.BytesIO(self.slices_png)).convert("RGB")
            width = size_px
            slices = slices.resize((width, max(1, round(slices.height * width / slices.width))))
            out = Image.new("RGB", (panel.width + width + 12, max(panel.height, slices.height + 20)), "white")
            out.paste(panel, (0, 0))
            out.paste(slices, (panel.width + 12, 20))
            ImageDraw.Draw(out).text((panel.width + 12, 4), self.volume_label, fill=(20, 20, 20))
            panel = out
        return png_bytes(np.asarray(panel))

    def _repr_mimebundle_(self, **kwargs: Any):
        """The widget's view, plus ``image/png`` (:meth:`snapshot_png`) for a reader without a kernel."""
        bundle = super()._repr_mimebundle_(**kwargs)
        # ipywidgets returns the data; anywidget (data, metadata)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            try:
                data["image/png"] = base64.b64encode(self.snapshot_png()).decode("ascii")
            except (ValueError, OSError) as exc:  # a picture is a courtesy: the live widget still shows
                self._report(exc, "static picture")
        return bundle

    def _on_busy(self, busy: bool, message: str) -> None:
        """Worker: decoding started / stopped (decoding errors arrive through ``_on_result``)."""
        self.busy = bool(busy)
        if message.startswith(("decoded", "decoding")):
            self.message = message
        elif message.startswith("error"):
            self.error = message

    def _on_result(self, result: DecodeResult) -> None:
        """Worker thread: show a decoded volume (or its error)."""
        if result.request_id < getattr(self._shown, "request_id", -1):
            return  # an older answer arriving late
        if not result.ok:
            self.error = f"decoding failed: {result.error}"
            return
        with self._lock:
            self._volume, self._shown = result.volume, result
            label = result.tag[0] if isinstance(result.tag, tuple) else str(result.tag or "")
            with self.hold_sync():
                self.volume_label = label
                D, apix = result.box, self.state.voxel_size_angstrom
                how = "cached" if result.cached else f"decoded in {result.seconds:.2f} s"
                self.volume_info = (f"{D}³ voxels" + (f" of {apix:.2f} Å" if apix else "") + f", {how}")
                self._update_marker()
                self._render()
                self.error = ""

    def _render(self, mesh: bool = True) -> None:
        with self._lock:
            vol = self._volume
            if vol is None:
                return
            self.slices_png = slices_png(vol, self.threshold)
            self.iso_png = isosurface_png(vol, self.threshold, self.azimuth, self.elevation)
            if mesh:
                self._update_mesh(vol)

    def _update_mesh(self, vol: np.ndarray) -> None:
        """The 3D view's mesh of ``vol`` ``[D, D, D]`` at ``threshold`` (~0.1 s for a 64³ grid)."""
        if self._mesh_missing:
            return
        try:
            self.volume_mesh = mesh_from_volume(vol, threshold_sigma=self.threshold, max_grid=self.mesh_grid).to_bytes()
        except ImportError as exc:  # scikit-image is optional: the ray-cast image stays
            self._mesh_missing = str(exc)
            self.volume_view, self.message = "image", f"3D view off: {exc}"

    # ------------------------------------------------------------------ front-end messages
    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        """Events from the front end: ``{"type": "polygon" | "clusters" | "clear" | "save_selection"
        | "export" | "save_volume" | "trajectory_frame" | "build_trajectory" | "export_trajectory",
        ...}``; failures go to the ``error`` trait."""
        kind = content.get("type") if isinstance(content, dict) else None
        try:
            if kind == "polygon":
                self.select_polygon(content["points"], content.get("mode", "replace"))
                self.message, self.error = f"{self.n_selected} particles selected", ""
            elif kind == "clusters":
                self.select_clusters([int(c) for c in content["clusters"]], content.get("mode", "replace"))
                self.message, self.error = f"{self.n_selected} particles selected", ""
            elif kind == "clear":
                self.clear_selection()
                self.message = "selection cleared"
            elif kind == "save_selection":
                self.save_selection()
            elif kind == "export":
                self.export_selection(fmt=content.get("format", "star"))
            elif kind == "save_volume":
                self.save_volume()
            elif kind == "trajectory_frame":
                self._send_trajectory_frame(int(content["frame"]), int(content["series"]))
            elif kind == "build_trajectory":
                ends = {"clusters": content["clusters"]} if "clusters" in content else {"rows": content["rows"]}
                self.build_trajectory(**ends, n_frames=int(content["n_frames"]), mode=str(content["mode"]))
            elif kind == "export_trajectory":
                self._builder.submit(self._export_trajectory_clicked)
        except Exception as exc:
            self._report(exc, str(kind).replace("_", " "))


# ---------------------------------------------------------------------- drawing from Python
def continuous_palette() -> list:
    """:data:`LEVELS` viridis colours (low → high) then :data:`MISSING_COLOUR`, as ``"#rrggbb"``."""
    cmap = colormaps["viridis"]
    return [to_hex(cmap(i / (LEVELS - 1))) for i in range(LEVELS)] + [MISSING_COLOUR]


def _rgb(colour: str) -> tuple:
    """``"#rrggbb"`` → ``(r, g, b)`` 0…255."""
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def density_raster(xy: np.ndarray, rgb: np.ndarray, box: Sequence[float], width: int, height: int,
                   point_px: int = 1) -> np.ndarray:
    """Points drawn as the front end draws them: ``[height, width, 3]`` uint8 on white.

    Parameters
    ----------
    xy : np.ndarray
        ``[M, 2]`` data coordinates.
    rgb : np.ndarray
        ``[M, 3]`` colour of each point, 0…255.
    box : sequence of float
        ``[x0, x1, y0, y1]`` data range shown (y up).
    width, height : int
        Pixels.
    point_px : int
        Edge of each point's square (pixels).

    Returns
    -------
    np.ndarray
        Each pixel has the mean colour of its points, opaque in proportion to log(1 + count)
        (a lone point still shows at 45 %), so dense regions read as dense.
    """
    x0, x1, y0, y1 = (float(v) for v in box)
    px = np.floor((xy[:, 0] - x0) / (x1 - x0) * width).astype(np.int64)
    py = np.floor((y1 - xy[:, 1]) / (y1 - y0) * height).astype(np.int64)
    count = np.zeros(width * height)
    sums = np.zeros((3, width * height))
    for dx in range(point_px):
        for dy in range(point_px):
            qx, qy = px + dx - point_px // 2, py + dy - point_px // 2
            inside = (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
            flat = (qy * width + qx)[inside]
            count += np.bincount(flat, minlength=width * height)
            for c in range(3):
                sums[c] += np.bincount(flat, weights=rgb[inside, c], minlength=width * height)
    alpha = np.where(count > 0, 0.45 + 0.55 * np.log1p(count) / np.log1p(max(count.max(), 1.0)), 0.0)
    mean = sums / np.maximum(count, 1.0)
    out = 255.0 * (1.0 - alpha) + mean * alpha
    return np.clip(out.T.reshape(height, width, 3), 0, 255).astype(np.uint8)


def _scatter_panel(xy: np.ndarray, rgb: np.ndarray, box: Sequence[float], size_px: int,
                   xlabel: str, ylabel: str, title: str) -> Image.Image:
    """The scatter of :func:`density_raster` framed, with axis ranges and labels (PIL)."""
    pad = 36
    inner = size_px - pad - 8
    point_px = 1 if xy.shape[0] > 20000 else 2 if xy.shape[0] > 2000 else 4
    image = Image.new("RGB", (size_px, size_px), "white")
    image.paste(Image.fromarray(density_raster(xy, rgb, box, inner, inner, point_px)), (pad, 8))
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad - 1, 7, pad + inner, 8 + inner], outline=(150, 150, 150))
    x0, x1, y0, y1 = box
    grey = (90, 90, 90)
    draw.text((pad, size_px - pad + 6), f"{x0:.3g}", fill=grey)
    draw.text((size_px - 60, size_px - pad + 6), f"{x1:.3g}", fill=grey)
    draw.text((2, size_px - pad - 12), f"{y0:.3g}", fill=grey)
    draw.text((2, 10), f"{y1:.3g}", fill=grey)
    draw.text((pad + inner // 2 - 20, size_px - 14), xlabel, fill=(20, 20, 20))
    draw.text((2, size_px // 2), ylabel, fill=(20, 20, 20))
    draw.text((pad + 4, 10), title, fill=(60, 60, 60))
    return image
