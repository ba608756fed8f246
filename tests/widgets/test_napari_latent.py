"""The latent-space panel of the napari plugin in a real viewer (Qt under pytest-xvfb): clusters
numbered as ``cryoformer analyze`` numbers them, colouring by defocus, a click decoding that
particle off the UI thread (a newer click superseding a running decode), a lasso selecting and
exporting a ``.star`` without replacing a file, a trajectory between two clusters or along a
clicked path as one 4-D layer that exports as a series, and the panel at 500 000 particles."""

from __future__ import annotations

import os
import shutil
import sys
import time

import matplotlib
import numpy as np
import pytest
from scipy.stats import spearmanr

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                             or os.environ.get("QT_QPA_PLATFORM") == "offscreen"):
    pytest.skip("no display: install Xvfb (pytest-xvfb then starts one)", allow_module_level=True)
pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from cryoformer.cli import main  # noqa: E402
from cryoformer.io.star import read_star  # noqa: E402
from cryoformer_widgets import napari_dock  # noqa: E402
from cryoformer_widgets.napari_latent import (CONTINUOUS_CMAP, MAX_DRAWN, TRAJECTORY_NAME,  # noqa: E402
                                              LatentSpacePanel, free_path, nearest_particle)
from cryoformer_widgets.napari_layers import VOLUME_NAME  # noqa: E402
from cryoformer_widgets.session import RunSession  # noqa: E402

pytestmark = pytest.mark.napari
WAIT_MS = 30_000  # generous: the 2-core CI machine is shared


@pytest.fixture(scope="module")
def analysed_run(spread_run, tmp_path_factory):
    """``spread_run`` (three known latent groups) after ``cryoformer analyze --k 3``."""
    run = tmp_path_factory.mktemp("napari_latent") / "run"
    shutil.copytree(spread_run, run)
    assert main(["analyze", str(run), "--k", "3", "--skip-umap", "--n-traversal", "2", "--pcs", "1"]) == 0
    return str(run)


@pytest.fixture
def opened(analysed_run, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("cryoformer-widgets", "Run explorer")
    dock.open(analysed_run)
    qtbot.waitUntil(lambda: not dock.busy, timeout=WAIT_MS)
    assert dock.session is not None, dock.status.value
    yield viewer, dock, dock.latent_panel
    qtbot.waitUntil(lambda: not dock.busy, timeout=WAIT_MS)


def test_free_path_and_nearest_particle(tmp_path):
    path = tmp_path / "selection.star"
    assert free_path(str(path)) == str(path)
    path.write_text("x")
    (tmp_path / "selection_1.star").write_text("x")
    assert free_path(str(path)) == str(tmp_path / "selection_2.star")
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    assert nearest_particle(xy, (0.02, 0.98), (1.0, 1.0)) == 2
    assert nearest_particle(xy, (3.0, 0.98), (100.0, 1.0)) == 2   # x measured in its span: 3 % away
    assert nearest_particle(xy, (3.0, 0.98), (10.0, 1.0)) is None
    assert nearest_particle(xy, (5.0, 0.5), (10.0, 1.0)) is None  # nothing within 5 % of the view


def test_clusters_agree_with_analyze_and_a_click_decodes_that_particle(opened, qtbot, analysed_run):
    viewer, dock, panel = opened
    assert isinstance(panel, LatentSpacePanel) and any(w is panel for w in viewer.window.dock_widgets.values())
    written = np.load(os.path.join(analysed_run, "analysis", "kmeans_labels.npy"))
    np.testing.assert_array_equal(dock.session.labels["kmeans"], written)
    assert panel.colour.value == "kmeans" and panel.axes == ("PC1", "PC2") and len(panel.drawn) == 36
    xy = dock.session.coords(("PC1", "PC2"))
    for row in (0, 17, 35):
        assert panel.pick(*xy[row]) == row
        assert f"cluster {written[row]})" in panel.status.value
    # The last click wins: earlier ones still waiting are dropped, a running one is not shown.
    qtbot.waitUntil(lambda: not dock.busy and dock.decoded is not None
                    and dock.decoded.label.startswith("particle 35 "), timeout=WAIT_MS)
    np.testing.assert_allclose(viewer.layers[VOLUME_NAME].data, dock.session.volume_at(dock.session.latents[35]))
    assert "decoded in" in dock.status.value and dock.last_decode_s > 0


def test_lasso_selects_and_exports_a_star_without_replacing(opened, qtbot, analysed_run):
    _, dock, panel = opened
    xy = dock.session.coords(("PC1", "PC2"))
    lo, hi = np.percentile(xy[:, 0], [0, 50])
    outline = [(lo - 1, xy[:, 1].min() - 1), (hi, xy[:, 1].min() - 1), (hi, xy[:, 1].max() + 1),
               (lo - 1, xy[:, 1].max() + 1)]
    expected = np.nonzero(xy[:, 0] < hi)[0]
    assert panel.select_outline(outline) == expected.size
    assert panel.count.value == f"selected: {expected.size} particles"
    target = os.path.join(analysed_run, "selection.star")
    first = panel.export_selection(target)
    second = panel.export_selection(target)  # the first is kept: a free name is taken
    assert first == target and second == os.path.join(analysed_run, "selection_1.star")
    star = read_star(first)
    assert len(star.particles) == expected.size
    assert open(first).read() == open(second).read()


def test_trajectory_between_two_clusters_plays_and_exports(opened, qtbot, analysed_run):
    viewer, dock, panel = opened
    panel.start_cluster.value = panel.start_cluster.choices[0]
    panel.end_cluster.value = panel.end_cluster.choices[2]
    panel.steps.value = 4
    panel.decode_trajectory()
    qtbot.waitUntil(lambda: not dock.busy and TRAJECTORY_NAME in viewer.layers, timeout=WAIT_MS)
    layer = viewer.layers[TRAJECTORY_NAME]
    session = dock.session
    a, b = (session.latents[session.center_rows[c]] for c in (0, 2))
    assert layer.data.shape == (4, 16, 16, 16) and layer.axis_labels[0] == "step"
    for step, t in enumerate(np.linspace(0, 1, 4)):  # straight line between the two centres
        np.testing.assert_allclose(layer.data[step], session.volume_at(a + t * (b - a)), atol=1e-6)
    viewer.dims.set_current_step(0, 3)  # what the dims slider's ▶ steps through
    assert viewer.dims.current_step[0] == 3 and viewer.dims.nsteps[0] == 4

    panel._on_export_trajectory_clicked()
    qtbot.waitUntil(lambda: not dock.busy and "wrote" in panel.status.value, timeout=WAIT_MS)
    folder = os.path.join(analysed_run, "trajectory")
    assert sorted(os.listdir(folder)) == ["movie.gif", "open_series.cxc", "vol_000.mrc", "vol_001.mrc",
                                          "vol_002.mrc", "vol_003.mrc", "z_path.txt"]
    np.testing.assert_allclose(np.loadtxt(os.path.join(folder, "z_path.txt")), layer.metadata["cryoformer"]["latents"],
                               rtol=1e-6)
    panel._on_export_trajectory_clicked()  # again: a new folder, the first untouched
    qtbot.waitUntil(lambda: not dock.busy and "trajectory_1" in panel.status.value, timeout=WAIT_MS)


def _colormap_positions(rgba: np.ndarray, cmap_name: str) -> np.ndarray:
    """``[M]`` position in [0, 1] on ``cmap_name`` of each drawn colour ``[M, 4]`` (nearest of
    1024 samples): what a reader of the colour bar sees."""
    samples = matplotlib.colormaps[cmap_name](np.linspace(0, 1, 1024))[:, :3]             # [1024, 3]
    d2 = np.sum((np.asarray(rgba)[:, None, :3] - samples[None]) ** 2, axis=-1)           # [M, 1024]
    return np.argmin(d2, axis=1) / 1023.0


def test_colour_by_defocus_draws_a_colour_map_with_its_bar(opened):
    _, dock, panel = opened
    defocus = dock.session.colouring("defocus_angstrom").values             # read from the run's .star
    assert "defocus_angstrom" in panel.colour.choices and np.ptp(defocus) > 1000
    panel.colour.value = "defocus_angstrom"  # redraws
    panel.canvas.draw()                      # colours are mapped when matplotlib draws
    positions = _colormap_positions(panel.points.get_facecolors(), CONTINUOUS_CMAP)
    rho = spearmanr(defocus[panel.drawn], positions).statistic
    assert rho > 0.9, rho
    lo, hi = panel.colour_limits
    assert lo < np.median(defocus) < hi and positions.max() - positions.min() > 0.8
    assert panel._colorbar is not None and panel._colorbar.ax.get_ylabel() == "defocus_angstrom"
    panel.colour.value = "kmeans"            # back to clusters: the colour bar goes
    assert panel._colorbar is None and panel.colour_limits is None


def test_a_click_during_a_decode_supersedes_it(opened, qtbot, monkeypatch):
    """Clicks while a decode runs: the running one finishes unseen, the ones in between are
    dropped, the last is decoded and shown, with its decode time on both status lines."""
    viewer, dock, panel = opened
    decoded, shown = [], []
    real_decode, real_show = napari_dock.decode_latent, napari_dock.RunExplorerDock._show
    monkeypatch.setattr(napari_dock, "decode_latent", lambda session, z, box, level, label:
                        decoded.append(label) or real_decode(session, z, box, level, label))
    # on the class: a magicgui Container treats deleting an instance attribute as removing a widget
    monkeypatch.setattr(napari_dock.RunExplorerDock, "_show",
                        lambda self, dec: shown.append(dec.label) or real_show(self, dec))
    xy = dock.session.coords(panel.axes)
    # One event-loop turn: the first decode is still running (its result cannot arrive before
    # control returns to Qt) when the next two clicks come.
    for row in (3, 20, 33):
        assert panel.pick(*xy[row]) == row
    assert dock.busy
    qtbot.waitUntil(lambda: not dock.busy and len(shown) == 1, timeout=WAIT_MS)
    qtbot.wait(200)  # nothing else arrives later
    assert [d.split(" ")[:2] for d in decoded] == [["particle", "3"], ["particle", "33"]]
    assert len(shown) == 1 and shown[0].startswith("particle 33 ")
    np.testing.assert_allclose(viewer.layers[VOLUME_NAME].data, dock.session.volume_at(dock.session.latents[33]))
    assert "decoded in" in dock.status.value and "decoded in" in panel.status.value
    assert panel.status.value.startswith("showing particle 33 ")


def _arc_length_points(corners: np.ndarray, n: int) -> np.ndarray:
    """``[n, zdim]`` points evenly spaced by arc length along straight segments through ``corners``."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(corners, axis=0), axis=1))])
    t = np.linspace(0, arc[-1], n)
    return np.stack([np.interp(t, arc, corners[:, d]) for d in range(corners.shape[1])], axis=1)


def test_a_clicked_path_decodes_into_the_trajectory_layer(opened, qtbot):
    viewer, dock, panel = opened
    session = dock.session
    panel.mode.value = "path"
    xy = session.coords(panel.axes)
    rows = [int(session.center_rows[c]) for c in (0, 2, 1)]  # a bent path through three clusters
    assert panel.add_path_point(*xy[rows[0]]) == rows[0] and not panel.path_button.enabled
    assert panel.add_path_point(*xy[rows[0]]) == rows[0] and panel.path_rows == rows[:1]  # no zero segment
    for row in rows[1:]:
        assert panel.add_path_point(*xy[row]) == row
    assert panel.path_rows == rows and panel.path_button.enabled
    panel.steps.value = 6
    panel.decode_drawn_path()
    qtbot.waitUntil(lambda: not dock.busy and TRAJECTORY_NAME in viewer.layers, timeout=WAIT_MS)
    layer = viewer.layers[TRAJECTORY_NAME]
    expected = _arc_length_points(session.latents[rows].astype(np.float64), 6)
    np.testing.assert_allclose(layer.metadata["cryoformer"]["latents"], expected, atol=1e-5)
    assert layer.data.shape == (6, 16, 16, 16) and "path through particles" in layer.metadata["cryoformer"]["description"]
    np.testing.assert_allclose(layer.data[0], session.volume_at(session.latents[rows[0]]), atol=1e-6)
    np.testing.assert_allclose(layer.data[-1], session.volume_at(session.latents[rows[-1]]), atol=1e-6)
    panel.clear_path()
    assert panel.path_rows == [] and not panel.path_button.enabled


N_LARGE = 500_000


@pytest.fixture
def large_dock(analysed_run, make_napari_viewer, qtbot):
    """A Run explorer showing 500 000 synthetic latents (five Gaussian groups in the run's latent
    space, labelled by group: what ``cryoformer analyze`` would have written) decoded by the run."""
    rng = np.random.default_rng(11)
    zdim = 3  # the tiny run's --zdim
    centres = rng.normal(scale=2.0, size=(5, zdim))
    groups = rng.integers(0, 5, N_LARGE)
    latents = (centres[groups] + 0.4 * rng.normal(size=(N_LARGE, zdim))).astype(np.float32)
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("cryoformer-widgets", "Run explorer")
    t0 = time.perf_counter()
    session = RunSession.from_latents(analysed_run, latents, kmeans_labels=groups, device="cpu")
    dock.show_session(session)
    dock.latent_panel.canvas.draw()  # the draw itself, not only its request
    seconds = time.perf_counter() - t0
    yield dock, groups, seconds
    qtbot.waitUntil(lambda: not dock.busy, timeout=WAIT_MS)


def test_half_a_million_particles_open_draw_lasso_and_colour(large_dock, qtbot):
    dock, groups, open_s = large_dock
    panel, session = dock.latent_panel, dock.session
    assert session.n_particles == N_LARGE and len(panel.drawn) <= MAX_DRAWN
    assert set(groups[panel.drawn]) == set(range(5))  # every group drawn (stratified subsample)
    xy = session.coords(panel.axes)
    outline = np.array([[np.percentile(xy[:, 0], 20), np.percentile(xy[:, 1], 10)],
                        [np.percentile(xy[:, 0], 90), np.percentile(xy[:, 1], 30)],
                        [np.percentile(xy[:, 0], 60), np.percentile(xy[:, 1], 95)]])
    t0 = time.perf_counter()
    count = panel.select_outline(outline)   # the count, then a redraw with the selection outlined
    panel.canvas.draw()
    lasso_s = time.perf_counter() - t0
    # an independent points-in-triangle count on every particle: same side of all three edges
    a, b, c = outline
    def side(p, q):  # noqa: E306 - sign of the cross product of q − p with each point − p
        return (q[0] - p[0]) * (xy[:, 1] - p[1]) - (q[1] - p[1]) * (xy[:, 0] - p[0])
    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    inside = ((s1 > 0) & (s2 > 0) & (s3 > 0)) | ((s1 < 0) & (s2 < 0) & (s3 < 0))
    assert count == int(inside.sum()) > 10_000 and panel.count.value == f"selected: {count} particles"
    np.testing.assert_array_equal(session.selection, np.nonzero(inside)[0])
    session.add_values("defocus_angstrom", (10_000 + 1_000 * xy[:, 0]).astype(np.float32))  # known gradient
    panel.colour.reset_choices()
    t0 = time.perf_counter()
    panel.colour.value = "defocus_angstrom"
    panel.canvas.draw()
    colour_s = time.perf_counter() - t0
    positions = _colormap_positions(panel.points.get_facecolors()[:5000], CONTINUOUS_CMAP)
    assert spearmanr(xy[panel.drawn[:5000], 0], positions).statistic > 0.9
    print(f"\n500k particles (2-core AMD EPYC, shared): open {open_s:.2f} s, lasso + draw {lasso_s:.2f} s, "
          f"redraw coloured by defocus {colour_s:.2f} s")
    assert open_s < 15 and lasso_s < 5 and colour_s < 5
