"""The latent-space panel of the napari plugin in a real viewer (Qt under pytest-xvfb): clusters
numbered as ``cryoformer analyze`` numbers them, a click decoding that particle off the UI
thread, a lasso selecting and exporting a ``.star`` without replacing a file, and a trajectory
between two clusters as one 4-D layer that exports as a series."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                             or os.environ.get("QT_QPA_PLATFORM") == "offscreen"):
    pytest.skip("no display: install Xvfb (pytest-xvfb then starts one)", allow_module_level=True)
pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from cryoformer.cli import main  # noqa: E402
from cryoformer.io.star import read_star  # noqa: E402
from cryoformer_widgets.napari_latent import (TRAJECTORY_NAME, LatentSpacePanel, free_path,  # noqa: E402
                                              nearest_particle)
from cryoformer_widgets.napari_layers import VOLUME_NAME  # noqa: E402

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
