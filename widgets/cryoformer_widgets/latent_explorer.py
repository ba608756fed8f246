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

The front end (``static/latent_explorer.js``) draws a canvas scatter of at most ``max_drawn``
particles (a stratified subsample; the data are never subsampled) and sends clicks, lasso and
box selections back; everything else happens here, in Python, so every feature can also be
driven from code. Failures of what the front end triggers (an unwritable file, a decoding
error, a bad trait value) are shown in the widget's status line (trait ``error``) and never
raised into the notebook's event loop; methods called from code raise as usual.
"""

from __future__ import annotations

import os
import pathlib
import re
import threading
from typing import Any, Optional, Sequence

import anywidget
import numpy as np
import traitlets as t

from .decode_worker import DecodeResult
from cryoformer.analysis.render import isosurface_png, palette, slices_png
from .session import DEFAULT_K, KMEANS, RunSession

__all__ = ["LatentExplorer"]

_STATIC = pathlib.Path(__file__).parent / "static"


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
        Most points drawn in the scatter.
    output_dir : str
        Where the buttons write (``volume_*.mrc``, ``selection_*.npy``, ``selection_*.star``).
    select : "center", int or None
        What is decoded first: the centre of cluster 0 (default), a particle row, or nothing.

    Notes
    -----
    Synchronised traits a script may set: ``axis_x``, ``axis_y`` (axes drawn, names in
    ``axis_names``: ``"PC1"``, ``"UMAP2"``, ``"z0"``), ``color_by`` (a name in ``label_sets``),
    ``selected_index`` (row of the run's particles, −1 = none), ``traversal_pc`` /
    ``traversal_step`` (−1 = off), ``threshold`` (σ above the mean), ``azimuth`` / ``elevation``
    (degrees), ``output_dir``. ``pc_x`` / ``pc_y`` (not synchronised) are the 1-based PC of each
    axis, 0 when it is not a PC; setting one draws that PC. Read-only results: ``slices_png`` and
    ``iso_png`` (PNG bytes), ``volume_label``, ``n_selected``, ``busy``, ``message``, ``error``.
    """

    _esm = _STATIC / "latent_explorer.js"
    _css = _STATIC / "latent_explorer.css"

    # scatter (drawn subsample; binary buffers)
    points = t.Bytes(b"").tag(sync=True)            # float32 [M, 2] coordinates on (axis_x, axis_y)
    point_rows = t.Bytes(b"").tag(sync=True)        # int32 [M] row of each drawn point
    point_colors = t.Bytes(b"").tag(sync=True)      # uint8 [M] index into `palette`
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
    label_sets = t.List(t.Unicode()).tag(sync=True)
    color_by = t.Unicode(KMEANS).tag(sync=True)
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
    # selection and output
    n_selected = t.Int(0).tag(sync=True)
    output_dir = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    message = t.Unicode("").tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, run: Any, epoch: Optional[int] = None, device: str = "auto", k: int = DEFAULT_K,
                 labels: Optional[dict] = None, decode_box: Optional[int] = None, max_drawn: int = 20000,
                 output_dir: Optional[str] = None, select: Any = "center", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.RLock()
        self._volume: Optional[np.ndarray] = None
        self._shown: Optional[DecodeResult] = None
        if isinstance(run, RunSession):
            self.state = run
            self.state.worker.on_result, self.state.worker.on_busy = self._on_result, self._on_busy
        else:
            self.state = RunSession(run, epoch=epoch, device=device, k=k, decode_box=decode_box,
                                       on_result=self._on_result, on_busy=self._on_busy)
        st = self.state
        for name, lab in (labels or {}).items():
            st.add_labels(name, lab)
        self._drawn = st.drawn_rows(max_drawn)
        with self.hold_sync():
            self.n_particles, self.n_drawn, self.n_pcs = st.n_particles, int(self._drawn.size), st.n_pcs
            self.pc_variance = [float(v) for v in st.pca.explained_variance_ratio]
            self.axis_names = st.axis_names()
            self.axis_x, self.axis_y = "PC1", f"PC{min(2, st.n_pcs)}"
            self.point_rows = self._drawn.astype(np.int32).tobytes()
            self.label_sets = list(st.labels)
            self.output_dir = os.path.abspath(output_dir or os.path.join(os.getcwd(), "cryoformer_explorer"))
            self._update_points()
            self._update_colors()
            self._update_selection()
        self.on_msg(self._on_message)
        kmeans_note = f"K-means: {st.kmeans_source}"
        umap_note = "UMAP axes offered" if st.umap is not None else "no UMAP (run `cryoformer analyze`)"
        self.message = f"{st.n_particles} particles, {self._drawn.size} drawn; {kmeans_note}; {umap_note}"
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
        self.label_sets = list(self.state.labels)

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

    def close(self) -> None:
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
            self.state.request_volume(z, (label, ("pc", self.traversal_pc)))
        except Exception as exc:
            self._report(exc, "walking along a PC")

    @t.observe("threshold", "azimuth", "elevation")
    def _view_changed(self, change) -> None:
        try:
            self._render()
        except Exception as exc:
            self._report(exc, "rendering")

    # ------------------------------------------------------------------ state → traits
    def _update_points(self) -> None:
        xy = self.state.coords((self.axis_x, self.axis_y))  # [N, 2]
        self.points = np.ascontiguousarray(xy[self._drawn], dtype=np.float32).tobytes()
        rows = self.state.center_rows
        cl = self.state.labels[KMEANS][rows]
        colors = palette(int(self.state.labels[KMEANS].max()) + 1)
        self.centers = [{"x": float(xy[r, 0]), "y": float(xy[r, 1]), "row": int(r), "cluster": int(c),
                         "color": colors[int(c)]} for r, c in zip(rows, cl)]

    def _update_colors(self) -> None:
        if self.color_by not in self.state.labels:
            raise ValueError(f"unknown colouring {self.color_by!r}; choose from {list(self.state.labels)}")
        lab = self.state.labels[self.color_by]
        n = int(lab.max()) + 1
        self.palette = palette(n)
        self.point_colors = np.asarray(lab[self._drawn] % 255, dtype=np.uint8).tobytes()
        counts = np.bincount(lab, minlength=n)
        self.legend = [{"name": str(i), "color": self.palette[i], "count": int(counts[i])} for i in range(n)]

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

    def _render(self) -> None:
        with self._lock:
            vol = self._volume
            if vol is None:
                return
            self.slices_png = slices_png(vol, self.threshold)
            self.iso_png = isosurface_png(vol, self.threshold, self.azimuth, self.elevation)

    # ------------------------------------------------------------------ front-end messages
    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        """Events from the front end: ``{"type": "polygon" | "clear" | "save_selection" |
        "export" | "save_volume", ...}``; failures go to the ``error`` trait."""
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
        except Exception as exc:
            self._report(exc, str(kind).replace("_", " "))
