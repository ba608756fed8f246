"""``PoseRefinementView``: how pose refinement moved the poses, epoch by epoch (paper Fig. 6).

>>> from cryoformer_widgets import PoseRefinementView
>>> view = PoseRefinementView("RUN/")     # a run trained with --refine-poses [--gt-poses]
>>> view.epoch.value = 3                  # or drag the slider

One figure per epoch: the viewing directions of the input, refined and true poses on a
Mollweide map (refined coloured by their rotation error), the median rotation and shift errors
across the pose-only pre-training (epoch 0) and the joint epochs (from ``RUN/pose_errors.csv``),
and histograms of the per-particle errors at the chosen epoch next to those of the input poses.
Errors are measured with :mod:`cryoformer.metrics.pose_error` (see :mod:`.pose_data`).
"""

from __future__ import annotations

import html
import io
from typing import Any, Optional

import ipywidgets as w
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .pose_data import PoseHistory, direction_angles, viewing_directions

__all__ = ["PoseRefinementView", "pose_figure_png"]


def _sample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def pose_figure_png(history: PoseHistory, epoch: Optional[int], max_points: int = 3000,
                    n_arrows: int = 150, dpi: int = 80) -> bytes:
    """The figure for ``epoch`` (None: input poses only) as PNG bytes.

    Parameters
    ----------
    history : PoseHistory
    epoch : int or None
        Epoch of refined poses to show (in ``history.epochs``).
    max_points : int
        Particles drawn on the sphere (a fixed random subset; errors use all particles).
    n_arrows : int
        Particles whose move from input to refined direction is drawn as a line.
    dpi : int
        Resolution of the 11 × 6.6 inch figure.
    """
    fig = Figure(figsize=(11, 6.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 3)
    _draw_directions(fig, fig.add_subplot(gs[0, :2], projection="mollweide"), history, epoch,
                     _sample(history.n_particles, max_points), n_arrows)
    curves = history.curves()
    for row, (col, unit, name) in enumerate([("rotation_median_deg", "°", "rotation"),
                                             ("shift_median_px", "px", "shift")]):
        _draw_curve(fig.add_subplot(gs[row, 2]), curves, col, unit, name, epoch)
    for j, (attr, unit, scale, name) in enumerate([("rotation_rad", "°", 180 / np.pi, "rotation"),
                                                   ("shift_px", "px", 1.0, "shift")]):
        _draw_histogram(fig.add_subplot(gs[1, j]), history, epoch, attr, unit, scale, name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _draw_directions(fig: Figure, sphere, history: PoseHistory, epoch: Optional[int],
                     idx: np.ndarray, n_arrows: int) -> None:
    """Viewing directions of particles ``idx`` on a Mollweide map: input, truth, refined."""
    lon_in, lat_in = direction_angles(viewing_directions(history.initial.rotations[idx]))
    sphere.scatter(lon_in, lat_in, s=6, c="0.7", label="input", linewidths=0)
    if history.truth is not None:
        lon_t, lat_t = direction_angles(viewing_directions(history.truth.rotations[idx]))
        sphere.scatter(lon_t, lat_t, s=10, c="k", marker="+", linewidths=0.6, label="ground truth")
    if epoch is not None:
        poses = history.poses(epoch)
        err = np.degrees(history.errors(epoch).rotation_rad[idx])
        lon_r, lat_r = direction_angles(viewing_directions(poses.rotations[idx]))
        k = idx[: n_arrows].size
        for a, b, c, d in zip(lon_in[:k], lat_in[:k], lon_r[:k], lat_r[:k]):
            if abs(a - c) < np.pi:  # skip lines that would wrap around the map
                sphere.plot([a, c], [b, d], color="0.55", lw=0.4, alpha=0.6)
        sc = sphere.scatter(lon_r, lat_r, s=8, c=err, cmap="viridis", vmin=0, vmax=max(float(err.max()), 1e-3),
                            label=f"epoch {epoch}", linewidths=0)
        fig.colorbar(sc, ax=sphere, shrink=0.7, label=f"rotation error vs {history.reference} (°)")
    sphere.grid(True, lw=0.3)
    sphere.tick_params(labelsize=7)
    sphere.legend(loc="lower left", fontsize=7, markerscale=2, bbox_to_anchor=(-0.05, -0.12))
    sphere.set_title("viewing directions (beam direction in the map frame)", fontsize=10)


def _draw_curve(ax, curves, col: str, unit: str, name: str, epoch: Optional[int]) -> None:
    """Median error ``col`` per epoch (:meth:`PoseHistory.curves`), the input's as a dashed line."""
    refined = curves[curves.stage != "input"]
    if len(refined):
        ax.plot(refined.epoch, refined[col], "o-", color="C0", ms=4, label="refined")
        pre = refined[refined.stage == "pretrained"]
        if len(pre):
            ax.plot(pre.epoch, pre[col], "s", color="C1", ms=6, label="after pose-only pre-training")
    inp = curves[curves.stage == "input"]
    if len(inp) and np.isfinite(inp[col].iloc[0]):
        ax.axhline(float(inp[col].iloc[0]), color="0.4", ls="--", lw=1, label="input poses")
    if epoch is not None:
        ax.axvline(epoch, color="C3", lw=1, alpha=0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = after pose-only pre-training)", fontsize=8)
    ax.set_ylabel(f"median {name} error ({unit})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    top = np.nanmax(np.r_[curves[col].to_numpy(dtype=float), 0.0])
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)


def _draw_histogram(ax, history: PoseHistory, epoch: Optional[int], attr: str, unit: str,
                    scale: float, name: str) -> None:
    """Histograms of the per-particle error ``attr`` (× ``scale`` → ``unit``): input and ``epoch``."""
    sets = []
    if history.truth is not None:
        sets.append(("input", getattr(history.errors("input"), attr) * scale, "0.5"))
    if epoch is not None:
        sets.append((f"epoch {epoch}", getattr(history.errors(epoch), attr) * scale, "C0"))
    top = max([float(v.max()) for _, v, _ in sets] + [1e-6])
    bins = np.linspace(0, top * 1.001, 31)
    for label, values, color in sets:
        ax.hist(values, bins=bins, histtype="step", lw=1.5, color=color,
                label=f"{label}: median {np.median(values):.3g} {unit}")
    ax.set_xlabel(f"{name} error vs {history.reference} ({unit})", fontsize=8)
    ax.set_ylabel("particles", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


class PoseRefinementView(w.VBox):
    """Input vs refined (vs true) poses of a run, with an epoch slider.

    Parameters
    ----------
    run_dir : str
        Training run (best: ``--refine-poses --gt-poses``; works with either missing).
    gt_poses : str, optional
        Ground-truth poses when the run was trained without ``--gt-poses``.
    max_points : int
        Particles drawn on the sphere.

    Attributes
    ----------
    history : PoseHistory or None
        None when the run could not be read (the reason is in :attr:`message`).
    epoch : ipywidgets.IntSlider
    image : ipywidgets.Image
        The PNG figure of the chosen epoch.
    summary, message : ipywidgets.HTML
        Numbers of the chosen epoch; errors (red) or notes.
    """

    def __init__(self, run_dir: str, gt_poses: Optional[str] = None, max_points: int = 3000,
                 **kwargs: Any) -> None:
        self.max_points = int(max_points)
        self.epoch = w.IntSlider(description="epoch", min=0, max=0, value=0, continuous_update=False,
                                 layout=w.Layout(width="420px"))
        self.image = w.Image(format="png", layout=w.Layout(max_width="900px"))
        self.summary = w.HTML()
        self.message = w.HTML()
        super().__init__([self.summary, self.epoch, self.image, self.message], **kwargs)
        self.history: Optional[PoseHistory] = None
        try:
            self.history = PoseHistory(run_dir, gt_poses=gt_poses)
        except Exception as exc:
            self._error(f"cannot read the run: {type(exc).__name__}: {exc}")
            self.epoch.disabled = True
            return
        epochs = self.history.epochs
        if epochs:
            # max first: a search run's epochs start at 1, above the slider's initial max of 0
            self.epoch.max = max(epochs)
            self.epoch.min = min(epochs)
            self.epoch.value = max(epochs)
        else:
            self.epoch.disabled = True
            self._note("this run has no refined poses (trained without --refine-poses or --pose-search): "
                       "showing the input poses only")
        if self.history.truth is None:
            self._note("no ground-truth poses: errors are measured against the input poses "
                       "(how far refinement moved them)")
        self.epoch.observe(self._on_epoch, names="value")
        self._show(self.epoch.value if epochs else None)

    # ------------------------------------------------------------------ display
    def _error(self, text: str) -> None:
        self.message.value = f'<span style="color:#b00">{html.escape(text)}</span>'

    def _note(self, text: str) -> None:
        self.message.value += f'<div style="color:#555">{html.escape(text)}</div>'

    def _on_epoch(self, change) -> None:
        self._show(int(change["new"]))

    def _show(self, epoch: Optional[int]) -> None:
        h = self.history
        try:
            if epoch is not None and epoch not in h.epochs:
                raise ValueError(f"no poses for epoch {epoch}; available: {h.epochs}")
            self.image.value = pose_figure_png(h, epoch, self.max_points)
            self.summary.value = self._summary_html(epoch)
            self.shown_epoch = epoch
        except Exception as exc:  # shown in the widget, never raised into the slider callback
            self._error(f"epoch {epoch}: {type(exc).__name__}: {exc}")

    def _summary_html(self, epoch: Optional[int]) -> str:
        h = self.history
        rows = []
        stages = (["input"] if h.truth is not None else []) + ([epoch] if epoch is not None else [])
        for stage in stages:
            s = h.errors(stage).summary
            what = "input poses" if stage == "input" else f"epoch {stage} ({h.phase(stage)})"
            rows.append(f"<tr><td>{what}</td><td>{s['rotation_median_deg']:.3g}°</td>"
                        f"<td>{s['rotation_mean_square_rad2']:.3g} rad²</td>"
                        f"<td>{s.get('shift_median_px', float('nan')):.3g} px</td>"
                        f"<td>{s.get('shift_mean_square_px2', float('nan')):.3g} px²</td></tr>")
        head = ("<tr><th></th><th>rotation median</th><th>mean square</th><th>shift median</th>"
                "<th>mean square</th></tr>")
        return (f"<b>Pose refinement</b> — {h.n_particles} particles, errors vs {h.reference} "
                f"(shifts in px of the {h.box0}-px box)<table>{head}{''.join(rows)}</table>")
