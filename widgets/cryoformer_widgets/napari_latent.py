"""The latent space inside napari: a scatter panel beside the Run explorer dock.

The panel (:class:`LatentSpacePanel`, docked by the Run explorer when a run is opened) draws
the particles' latents on two axes of the session (PCs, UMAP, latent dimensions) in a small
matplotlib canvas, so napari's main canvas keeps the 3-D volume. Points are coloured as in the
Jupyter explorer, by any of the session's :meth:`~cryoformer_widgets.session.RunSession.colourings`:
K-means clusters by default (numbered as ``cryoformer analyze`` numbers them, the numbers drawn
where their particles are), other label sets, or continuous per-particle values (defocus,
angles, …) on a perceptual colour map between robust limits, with a colour bar; a particle
without a value is drawn grey.

* **click** a point: the nearest particle (of all of them, not only the drawn ones) is decoded
  in the Run explorer's worker thread, and the volume and attention layers follow; a click
  made while a decode runs replaces any click still waiting, and a result that is already stale
  is not shown;
* **path**: each click adds the nearest particle to a path (drawn on the scatter); **Decode
  path** decodes maps evenly spaced along straight segments through those particles' latents,
  in the order clicked, into the same 4-D trajectory layer (**Clear path** starts again);
* **lasso**: every particle inside the outline is selected (the count is shown);
  **Export .star** writes the selection through
  :meth:`~cryoformer_widgets.session.RunSession.export_selection`, never over an existing file
  (a free name ``selection_1.star`` … is taken instead);
* **trajectory**: between two K-means clusters (their centre particles), straight through
  latent space or along the data (the shortest path in the k-nearest-neighbour graph,
  :func:`cryoformer.analysis.traversal.graph_path`); the maps are decoded in a worker and shown
  as one 4-D image layer (axis ``step``), which napari's dims slider plays, and
  **Export trajectory** writes them as a series (maps, ``z_path.txt``, a ChimeraX script, a
  GIF) into a new folder.

The matplotlib canvas draws at most :data:`MAX_DRAWN` points (a stratified subsample, as the
Jupyter scatter), so 500 000 particles stay interactive; selections and clicks use every
particle. Functions above the panel class are GUI-free and tested without a display.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, Label, PushButton, RadioButtons,
                              SpinBox)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg, NavigationToolbar2QT
from matplotlib.figure import Figure
from matplotlib.widgets import LassoSelector
from napari.utils.notifications import show_error, show_info

from cryoformer.analysis.traversal import (LatentPath, SeriesConfig, graph_path, resample_path, straight_path,
                                           write_series)
from cryoformer.io.atomic import staged_directory

from .decode_worker import KnownMapsDecoder, latent_key
from .napari_layers import LayerData, add_or_update, default_iso_level
from .particle_values import CATEGORICAL, robust_limits
from .session import KMEANS, RunSession

__all__ = ["LatentSpacePanel", "Trajectory", "trajectory_path", "decode_trajectory", "trajectory_layer",
           "export_trajectory", "free_path", "nearest_particle", "colour_choices", "drawn_path",
           "TRAJECTORY_NAME", "MAX_DRAWN", "CONTINUOUS_CMAP"]

TRAJECTORY_NAME = "cryoformer trajectory"
MAX_DRAWN = 50_000       # points the canvas draws (measured: ~0.3 s a redraw on 2 shared cores)
DEFAULT_STEPS = 10       # maps along a trajectory (as `cryoformer analyze --n-traversal`)
PICK_RADIUS = 0.05       # a click farther than this (fraction of the axes' span) picks nothing
_CLUSTER_COLOURS = "tab10"
CONTINUOUS_CMAP = "viridis"  # perceptual and colour-blind safe: defocus etc. read as lightness
UNKNOWN_COLOUR = "lightgrey"  # a particle without a value (NaN)


def free_path(path: str) -> str:
    """``path`` if nothing exists there, else the first free ``stem_1.ext``, ``stem_2.ext`` …"""
    stem, ext = os.path.splitext(os.path.abspath(os.fspath(path)))
    candidate, n = stem + ext, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{stem}_{n}{ext}"
    return candidate


def nearest_particle(xy: np.ndarray, point: Tuple[float, float], span: Tuple[float, float]) -> Optional[int]:
    """Row of ``xy`` ``[N, 2]`` nearest to ``point``, distances measured in fractions of
    ``span`` (the visible axis ranges); None when it is farther than :data:`PICK_RADIUS`."""
    scale = np.maximum(np.asarray(span, dtype=np.float64), 1e-12)
    d2 = np.sum(((np.asarray(xy, dtype=np.float64) - np.asarray(point, dtype=np.float64)) / scale) ** 2, axis=1)
    row = int(np.argmin(d2))
    return row if d2[row] <= PICK_RADIUS ** 2 else None


def colour_choices(session: RunSession) -> List[str]:
    """What points may be coloured by: :meth:`RunSession.colourings` with ``kmeans`` first
    (label sets, then continuous values such as ``defocus_angstrom`` where the run has them)."""
    return [KMEANS] + [name for name in session.colourings() if name != KMEANS]


def drawn_path(session: RunSession, rows: Sequence[int], n: int = DEFAULT_STEPS) -> LatentPath:
    """``n`` latents evenly spaced (by latent arc length) along straight segments through the
    latents of particles ``rows`` (run order), in that order: the path a user clicked.

    Raises
    ------
    ValueError
        Fewer than two rows, or a row outside the run.
    """
    rows = [int(r) for r in rows]
    if len(rows) < 2:
        raise ValueError(f"a path needs at least 2 particles, {len(rows)} clicked")
    if min(rows) < 0 or max(rows) >= session.n_particles:
        raise ValueError(f"particle rows must lie in 0…{session.n_particles - 1}, got {rows}")
    corners = session.latents[rows].astype(np.float64)                      # [m, zdim]
    length = float(np.sum(np.linalg.norm(np.diff(corners, axis=0), axis=1)))
    words = "path through particles " + ", ".join(str(r) for r in rows)
    return LatentPath(resample_path(corners, int(n)), f"{words} (straight segments in latent space)",
                      np.asarray(rows, dtype=np.int64), length)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class Trajectory:
    """Maps decoded along a path through latent space.

    Attributes
    ----------
    latents : np.ndarray
        ``[n, zdim]`` float32.
    volumes : np.ndarray
        ``[n, D, D, D]`` float32, axes ``[step, z, y, x]``.
    description : str
    voxel_size : float
        Voxel edge in ``unit`` (``"angstrom"`` or ``"pixel"``).
    unit : str
    seconds : float
        Wall-clock decoding time.
    """

    latents: np.ndarray
    volumes: np.ndarray
    description: str
    voxel_size: float
    unit: str
    seconds: float = 0.0


def trajectory_path(session: RunSession, start_cluster: int, end_cluster: int, n: int = DEFAULT_STEPS,
                    along_data: bool = False):
    """A :class:`cryoformer.analysis.traversal.LatentPath` of ``n`` latents between the centre
    particles of two K-means clusters: straight, or along the data (k-NN graph)."""
    a, b = (int(session.center_rows[session_cluster(session, c)]) for c in (start_cluster, end_cluster))
    words = f"cluster {int(start_cluster)} to cluster {int(end_cluster)}"
    if along_data:
        path = graph_path(session.latents, a, b, int(n), seed=session.seed)
        return dataclasses.replace(path, description=f"{words}, along the data ({path.description})")
    return straight_path(session.latents[a], session.latents[b], int(n), f"{words}, straight line in latent space")


def session_cluster(session: RunSession, cluster: int) -> int:
    """``cluster`` checked against the session's K-means clusters."""
    if not 0 <= int(cluster) < session.n_clusters:
        raise ValueError(f"cluster {cluster} out of range 0…{session.n_clusters - 1}")
    return int(cluster)


def decode_trajectory(session: RunSession, path, D: Optional[int] = None) -> Trajectory:
    """Decode every latent of ``path`` through the session's decoder and cache (call it in a
    worker thread: ``n`` decodes)."""
    D = int(D or session.decode_box)
    t0 = time.perf_counter()
    volumes = np.stack([session.volume_at(z, D) for z in path.latents])        # [n, D, D, D]
    voxel, unit = session.voxel_size(D)
    return Trajectory(np.asarray(path.latents, np.float32), volumes, path.description, voxel, unit,
                      time.perf_counter() - t0)


def trajectory_layer(traj: Trajectory) -> LayerData:
    """The maps as ONE 4-D image layer ``[step, z, y, x]`` (isosurface at Otsu's level of the
    middle map, the same for every step so that changes in size are real)."""
    level = default_iso_level(traj.volumes[len(traj.volumes) // 2])
    v = traj.voxel_size
    kwargs = dict(name=TRAJECTORY_NAME, scale=(1.0, v, v, v), units=("pixel", traj.unit, traj.unit, traj.unit),
                  axis_labels=("step", "z", "y", "x"), colormap="gray", rendering="iso", iso_threshold=level,
                  contrast_limits=(float(traj.volumes.min()), float(max(traj.volumes.max(), level + 1e-6))),
                  metadata={"cryoformer": {"kind": "trajectory", "description": traj.description,
                                           "latents": traj.latents.tolist(), "iso_level": level}})
    return traj.volumes, kwargs, "image"


def export_trajectory(traj: Trajectory, out_dir: str, movie: bool = True) -> dict:
    """Write the maps of ``traj`` as a series into the new folder ``out_dir`` (staged: all or
    nothing): ``vol_000.mrc`` …, ``z_path.txt``, ``open_series.cxc`` (ChimeraX), ``movie.gif``.

    Raises
    ------
    FileExistsError
        ``out_dir`` exists (pick another name, e.g. with :func:`free_path`).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        raise FileExistsError(f"{out_dir} exists; a trajectory is written into a new folder")
    voxel = traj.voxel_size if traj.unit == "angstrom" else 1.0  # MRC has no unit-free voxel size
    D = int(traj.volumes.shape[-1])
    # the core's series writer, fed the maps already shown instead of decoding them again
    maps = KnownMapsDecoder({latent_key(z, D): v for z, v in zip(traj.latents, traj.volumes)})
    path = LatentPath(np.asarray(traj.latents, dtype=np.float32), traj.description)
    with staged_directory(out_dir) as stage:
        result = write_series(maps, path, stage, voxel, SeriesConfig(box_size=D, movie=movie, progress=False))
    return {"folder": out_dir, "files": result["files"], "level": result["level"]}


class LatentSpacePanel(Container):
    """Scatter of the latents that drives the Run explorer (module docstring).

    Parameters
    ----------
    dock : RunExplorerDock
        The Run explorer: its session, its worker plumbing (``_start``, ``busy``) and
        :meth:`~cryoformer_widgets.napari_dock.RunExplorerDock.show_latent`.

    Attributes
    ----------
    drawn : np.ndarray
        ``[M]`` rows of the particles drawn (all rows are selectable).
    points : matplotlib.collections.PathCollection or None
        The drawn scatter (row ``i`` of its colours is particle ``drawn[i]``).
    colour_limits : tuple of float or None
        ``(lo, hi)`` of the colour map when a continuous value colours the points.
    path_rows : list of int
        Particles clicked in "path" mode, in order.
    trajectory : Trajectory or None
        The last decoded trajectory.
    """

    def __init__(self, dock) -> None:
        super().__init__(labels=True)
        self.dock = dock
        self.drawn = np.zeros(0, dtype=np.int64)
        self.points = None
        self.colour_limits: Optional[Tuple[float, float]] = None
        self.path_rows: List[int] = []
        self.trajectory: Optional[Trajectory] = None
        self._xy: Optional[np.ndarray] = None  # [N, 2] every particle on the chosen axes
        self._colorbar = None  # of continuous values; removed before each redraw
        self.x_axis = ComboBox(choices=self._axis_choices, label="x axis")
        self.y_axis = ComboBox(choices=self._axis_choices, label="y axis")
        self.colour = ComboBox(choices=self._colour_choices, label="colour by")
        self.mode = RadioButtons(choices=("click", "path", "lasso"), value="click", label="mouse",
                                 orientation="horizontal")
        self.count = Label(value="selected: 0 particles")
        self.star_path = FileEdit(mode="w", filter="*.star", label="selection file")
        self.export_button = PushButton(text="Export .star")
        self.start_cluster = ComboBox(choices=self._cluster_choices, label="trajectory from")
        self.end_cluster = ComboBox(choices=self._cluster_choices, label="to")
        self.steps = SpinBox(value=DEFAULT_STEPS, min=2, max=100, label="maps")
        self.along_data = CheckBox(value=False, text="along the data (k-NN graph)")
        self.play_button = PushButton(text="Decode trajectory")
        self.path_button = PushButton(text="Decode path", enabled=False)
        self.clear_path_button = PushButton(text="Clear path")
        self.export_traj_button = PushButton(text="Export trajectory", enabled=False)
        self.status = Label(value="open a run in the Run explorer")
        self.figure = Figure(figsize=(4, 4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.toolbar = NavigationToolbar2QT(self.canvas, None)  # zoom and pan of the scatter
        self.native.layout().addWidget(self.toolbar)
        self.native.layout().addWidget(self.canvas)
        self.extend([self.x_axis, self.y_axis, self.colour, self.mode, self.count, self.star_path,
                     self.export_button, self.start_cluster, self.end_cluster, self.steps, self.along_data,
                     self.play_button, self.path_button, self.clear_path_button, self.export_traj_button,
                     self.status])
        self.lasso = LassoSelector(self.ax, onselect=self.select_outline)
        self.lasso.set_active(False)
        self.mode.changed.connect(lambda mode: self.lasso.set_active(mode == "lasso"))
        for widget in (self.x_axis, self.y_axis, self.colour):
            widget.changed.connect(self.redraw)
        self.canvas.mpl_connect("button_press_event", self._on_press)
        self.export_button.changed.connect(self._on_export_clicked)
        self.play_button.changed.connect(self.decode_trajectory)
        self.path_button.changed.connect(self.decode_drawn_path)
        self.clear_path_button.changed.connect(self.clear_path)
        self.export_traj_button.changed.connect(self._on_export_trajectory_clicked)

    @property
    def session(self) -> Optional[RunSession]:
        return self.dock.session

    def _axis_choices(self, *_) -> List[str]:
        return self.session.axis_names() if self.session is not None else []

    def _colour_choices(self, *_) -> List[str]:
        return colour_choices(self.session) if self.session is not None else []

    def _cluster_choices(self, *_) -> List[str]:
        return self.session.cluster_names() if self.session is not None else []

    def set_session(self, session: RunSession) -> None:
        """A new run: axes PC1/PC2, K-means colours, the trajectory between the outer clusters."""
        self.trajectory = None
        self.path_rows = []
        self.path_button.enabled = False
        self.export_traj_button.enabled = False
        self.star_path.value = os.path.join(session.run.run_dir, "selection.star")
        with self.x_axis.changed.blocked(), self.y_axis.changed.blocked(), self.colour.changed.blocked():
            for widget in (self.x_axis, self.y_axis, self.colour, self.start_cluster, self.end_cluster):
                widget.reset_choices()
            names = self.x_axis.choices
            self.x_axis.value, self.y_axis.value = names[0], names[1 if len(names) > 1 else 0]
            self.colour.value = KMEANS
        self.start_cluster.value = self.start_cluster.choices[0]
        self.end_cluster.value = self.end_cluster.choices[-1]  # clusters run along PC1: the far end
        self.status.value = f"{session.n_particles} particles (K-means: {session.kmeans_source})"
        self.redraw()

    # ------------------------------------------------------------------ drawing
    @property
    def axes(self) -> Tuple[str, str]:
        return str(self.x_axis.value), str(self.y_axis.value)

    def redraw(self, *_) -> float:
        """Draw the scatter (a stratified subsample of at most :data:`MAX_DRAWN` points) in the
        chosen colouring, the selection outlined and the clicked path on top; the seconds it took."""
        session = self.session
        if session is None or self.x_axis.value is None or self.colour.value is None:
            return 0.0
        t0 = time.perf_counter()
        self._xy = session.coords(self.axes)                                     # [N, 2]
        self.drawn = session.drawn_rows(MAX_DRAWN)
        colouring = session.colouring(str(self.colour.value))
        if self._colorbar is not None:
            self._colorbar.remove()
            self._colorbar = None
        self.ax.clear()
        if colouring.kind == CATEGORICAL:
            self._draw_categories(colouring.values)
        else:
            self._draw_continuous(colouring.name, colouring.values)
        self._draw_selection()
        if self.path_rows:
            self._plot_clicked_path()
        self.ax.set_xlabel(self.axes[0])
        self.ax.set_ylabel(self.axes[1])
        self.canvas.draw_idle()
        return time.perf_counter() - t0

    def _draw_categories(self, labels: np.ndarray) -> None:
        """Points in one of ten colours by ``labels`` ``[N]``, each label's number at its median."""
        xy = self._xy[self.drawn]
        self.colour_limits = None
        self.points = self.ax.scatter(xy[:, 0], xy[:, 1], c=labels[self.drawn] % 10, cmap=_CLUSTER_COLOURS,
                                      vmin=0, vmax=9, s=4, linewidths=0, rasterized=True)
        # Medians over the drawn points: the same place as over all of them, at a tenth of the cost.
        drawn_labels = labels[self.drawn]
        for label in np.unique(drawn_labels):
            cx, cy = np.median(xy[drawn_labels == label], axis=0)
            self.ax.annotate(str(int(label)), (cx, cy), fontsize=9, weight="bold", ha="center")

    def _draw_continuous(self, name: str, values: np.ndarray) -> None:
        """Points on :data:`CONTINUOUS_CMAP` between robust limits of ``values`` ``[N]`` (all
        particles, not only the drawn ones), NaN grey, with a colour bar named ``name``."""
        lo, hi = robust_limits(values)
        self.colour_limits = (lo, hi)
        cmap = matplotlib.colormaps[CONTINUOUS_CMAP].with_extremes(bad=UNKNOWN_COLOUR)
        xy = self._xy[self.drawn]
        self.points = self.ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(values[self.drawn], np.float64), cmap=cmap,
                                      vmin=lo, vmax=hi, s=4, linewidths=0, rasterized=True, plotnonfinite=True)
        self._colorbar = self.figure.colorbar(self.points, ax=self.ax, label=name)

    def _draw_selection(self) -> None:
        sel = np.intersect1d(self.session.selection, self.drawn, assume_unique=True)
        if sel.size:
            self.ax.scatter(self._xy[sel, 0], self._xy[sel, 1], s=10, facecolors="none", edgecolors="black",
                            linewidths=0.5, rasterized=True)
        self.count.value = f"selected: {self.session.selection.size} particles"

    # ------------------------------------------------------------------ click and lasso
    def _on_press(self, event) -> None:
        if (self.mode.value == "lasso" or event.inaxes is not self.ax or event.xdata is None
                or self.toolbar.mode):  # the toolbar's zoom or pan has the mouse
            return
        if self.mode.value == "path":
            self.add_path_point(event.xdata, event.ydata)
        else:
            self.pick(event.xdata, event.ydata)

    def _nearest(self, x: float, y: float) -> Optional[int]:
        """Row of the particle (of all of them) nearest to ``(x, y)`` in the current view, or None."""
        if self.session is None or self._xy is None:
            return None
        (x0, x1), (y0, y1) = self.ax.get_xlim(), self.ax.get_ylim()
        row = nearest_particle(self._xy, (x, y), (abs(x1 - x0), abs(y1 - y0)))
        if row is None:
            self.status.value = "no particle near the click"
        return row

    def pick(self, x: float, y: float) -> Optional[int]:
        """Decode the particle nearest to ``(x, y)`` (axis units) in the Run explorer's worker;
        returns its row, or None when no particle is near."""
        row = self._nearest(x, y)
        if row is None:
            return None
        z, _label = self.session.from_particle(row)
        self.status.value = self.session.describe_row(row)
        self.dock.show_latent(z, self.session.describe_row(row))
        return row

    def select_outline(self, vertices) -> int:
        """Select every particle inside ``vertices`` ``[M, 2]`` (axis units); the count."""
        if self.session is None or len(vertices) < 3:
            return 0
        self.session.select_polygon(np.asarray(vertices, dtype=np.float64), pcs=self.axes)
        self.redraw()
        return int(self.session.selection.size)

    # ------------------------------------------------------------------ export
    def _on_export_clicked(self, *_) -> None:
        try:
            path = self.export_selection(str(self.star_path.value))
        except Exception as exc:  # shown as one notification, never a traceback dialog
            show_error(f"cryoformer: {exc}")
            return
        show_info(f"cryoformer: wrote {path}")

    def export_selection(self, path: str) -> str:
        """Write the selection as a RELION ``.star`` at ``path``, or at the first free name
        beside it when a file exists there (nothing is replaced); the path written."""
        if self.session is None:
            raise ValueError("open a run first")
        path = free_path(path if path.endswith(".star") else path + ".star")
        self.session.export_selection(path, "star")
        self.status.value = f"wrote {self.session.selection.size} particles to {path}"
        return path

    # ------------------------------------------------------------------ path drawn by clicks
    def add_path_point(self, x: float, y: float) -> Optional[int]:
        """Append the particle nearest to ``(x, y)`` (axis units) to the clicked path and draw
        it; its row, or None when no particle is near (nothing is added)."""
        row = self._nearest(x, y)
        if row is None:
            return None
        if self.path_rows and self.path_rows[-1] == row:
            return row  # a double click on one particle adds no zero-length segment
        self.path_rows.append(row)
        self.path_button.enabled = len(self.path_rows) >= 2
        self._plot_clicked_path()
        self.canvas.draw_idle()
        self.status.value = (f"path: {len(self.path_rows)} particle(s); "
                             + ("press Decode path" if len(self.path_rows) >= 2 else "click the next one"))
        return row

    def _plot_clicked_path(self) -> None:
        # through the particles' own positions: exact on PC and z axes (linear in the latent),
        # and the only placement a UMAP axis has
        xy = self._xy[self.path_rows]
        self.ax.plot(xy[:, 0], xy[:, 1], "-s", color="crimson", markersize=4, linewidth=1.2)

    def clear_path(self, *_) -> None:
        """Forget the clicked path and redraw without it."""
        self.path_rows = []
        self.path_button.enabled = False
        self.redraw()

    def decode_drawn_path(self, *_) -> None:
        """Decode ``maps`` latents along the clicked path (:func:`drawn_path`) in the Run
        explorer's worker, into the 4-D trajectory layer."""
        if self.session is None or len(self.path_rows) < 2:
            self.status.value = "click at least 2 particles in path mode first"
            return
        self._decode_path(drawn_path(self.session, self.path_rows, int(self.steps.value)),
                          f"along the path through {len(self.path_rows)} particles")

    # ------------------------------------------------------------------ trajectory
    def decode_trajectory(self, *_) -> None:
        """Decode the maps between the two chosen clusters in the Run explorer's worker, then
        show them as one 4-D layer (the dims slider plays it)."""
        if self.session is None:
            self.status.value = "open a run first"
            return
        start = self.start_cluster.choices.index(self.start_cluster.value)
        end = self.end_cluster.choices.index(self.end_cluster.value)
        path = trajectory_path(self.session, start, end, int(self.steps.value), bool(self.along_data.value))
        self._decode_path(path, f"from cluster {start} to {end}")

    def _decode_path(self, path: LatentPath, words: str) -> None:
        """Draw ``path`` on the scatter and decode its latents in the Run explorer's worker."""
        if self.dock.busy:
            self.status.value = "busy: wait for the current task"
            return
        self._draw_path(path.latents)
        self.dock._start(decode_trajectory, (self.session, path, int(self.dock.box.value)), self._show_trajectory,
                         f"decoding {len(path.latents)} maps {words} …")

    def show_decode_time(self, label: str, seconds: float) -> None:
        """Say on this panel's status line which latent the volume shows and how long it took."""
        self.status.value = f"showing {label} (decoded in {seconds:.2f} s)"

    def _draw_path(self, latents: np.ndarray) -> None:
        points = [self.session.position(z, self.axes) for z in latents]
        if all(p is not None for p in points):  # a UMAP axis places no latent between particles
            xy = np.stack(points)
            self.ax.plot(xy[:, 0], xy[:, 1], "-o", color="black", markersize=3, linewidth=1)
            self.canvas.draw_idle()

    def _show_trajectory(self, traj: Trajectory) -> None:
        self.trajectory = traj
        add_or_update(self.dock.viewer, [trajectory_layer(traj)])
        self.dock.viewer.dims.set_current_step(0, 0)
        self.export_traj_button.enabled = True
        self.status.value = (f"trajectory: {len(traj.volumes)} maps in {traj.seconds:.2f} s; "
                             "press ▶ on the 'step' slider to play")

    def _on_export_trajectory_clicked(self, *_) -> None:
        if self.trajectory is None or self.session is None:
            return
        folder = free_path(os.path.join(self.session.run.run_dir, "trajectory"))
        self.dock._start(export_trajectory, (self.trajectory, folder), self._exported,
                         f"writing the trajectory to {folder} …")

    def _exported(self, written: dict) -> None:
        self.status.value = f"wrote {len(written['files'])} files to {written['folder']}"
        show_info(f"cryoformer: trajectory written to {written['folder']}")
