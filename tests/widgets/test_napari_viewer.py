"""The napari plugin in a real viewer (Qt, under the virtual display pytest-xvfb starts): the
dock widget found through the npe2 manifest, opening a run and decoding in worker threads,
channel toggles, and errors shown as notifications."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# Without a display Qt aborts the whole process; pytest-xvfb sets DISPLAY when Xvfb exists.
if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                             or os.environ.get("QT_QPA_PLATFORM") == "offscreen"):
    pytest.skip("no display: install Xvfb (pytest-xvfb then starts one)", allow_module_level=True)
pytest.importorskip("napari")
pytest.importorskip("qtpy")
pytest.importorskip("pytestqt")

from napari.utils.notifications import notification_manager  # noqa: E402

from cryoformer_widgets.napari_dock import NO_SURFACE, RunExplorerDock  # noqa: E402
from cryoformer_widgets.napari_layers import SURFACE_NAME, VOLUME_NAME, attention_layer_name  # noqa: E402
from cryoformer_widgets.session import DEFAULT_K  # noqa: E402

pytestmark = pytest.mark.napari

PLUGIN, WIDGET = "cryoformer-widgets", "Run explorer"
WAIT_MS = 30_000  # generous: the 2-core CI machine is shared


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The shared tiny run of tests/widgets/conftest.py (box 16 at 12 Å/px, zdim 3)."""
    return tiny_run


@pytest.fixture
def dock(run_dir, make_napari_viewer, qtbot):
    # run_dir first: training imports triton (through torch.optim), and loading triton's LLVM
    # after Mesa's software OpenGL (llvmpipe, what Xvfb gives napari) has loaded its own LLVM
    # crashes the process. The plugin itself never imports triton on CPU.
    viewer = make_napari_viewer()
    _dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, RunExplorerDock)
    yield viewer, widget
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)  # no worker outlives the viewer


@pytest.fixture
def notifications():
    """Messages of the napari notifications dispatched during the test."""
    seen = []

    def record(event):
        seen.append(str(event.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def _open(qtbot, widget, path):
    widget.open(str(path))
    assert widget.busy  # the work happens in a thread, the call returns at once
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def test_dock_widget_is_contributed_by_the_manifest(dock):
    viewer, widget = dock
    assert widget.session is None and not widget.decode_button.enabled
    assert widget.k.value == DEFAULT_K  # the clusters of the Jupyter explorer and of cryoformer analyze
    assert any(w is widget for w in viewer.window.dock_widgets.values())  # docked in the window
    assert len(viewer.layers) == 0


def test_open_and_decode_adds_layers(dock, qtbot, run_dir):
    viewer, widget = dock
    widget.k.value = 3
    _open(qtbot, widget, run_dir)
    assert widget.session is not None, widget.status.value
    assert len(widget.cluster.choices) == 3
    assert [s.label for s in widget.pc_sliders] == ["PC1", "PC2", "PC3"]  # zdim 3
    assert widget.box.value == 16 and widget.decode_button.enabled

    widget.source.value = "cluster"
    widget.cluster.value = widget.cluster.choices[1]
    widget.decode()
    qtbot.waitUntil(lambda: VOLUME_NAME in viewer.layers, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    shown = [attention_layer_name(f"query_c{c}") for c in range(3)]
    assert [layer.name for layer in viewer.layers] == [VOLUME_NAME] + shown + [SURFACE_NAME]
    volume = viewer.layers[VOLUME_NAME]
    np.testing.assert_allclose(volume.scale, [12.0] * 3)  # 6 Å × 32/16
    z, _ = widget.session.from_cluster(1)
    np.testing.assert_allclose(volume.data, widget.session.run.model.decode_volume(z).numpy(), atol=1e-6)
    assert all(viewer.layers[n].blending == "additive" for n in shown)
    assert widget.status.value.startswith("showing cluster 1")
    # napari resets a magicgui dock's choices when layers change; the run's must survive.
    assert len(widget.cluster.choices) == 3 and "weight_k2" in widget.surface_channel.choices

    # Channel toggles: a new channel appears as a layer, unticking hides it.
    widget._channel_boxes["weight_k2"].value = True
    assert viewer.layers[attention_layer_name("weight_k2")].visible
    widget._channel_boxes["query_c0"].value = False
    assert not viewer.layers[attention_layer_name("query_c0")].visible
    # The surface follows the chosen channel without decoding again.
    widget.surface_channel.value = "weight_k2"
    surface = viewer.layers[SURFACE_NAME]
    assert surface.metadata["cryoformer"]["channel"] == "weight_k2"
    widget.rendering.value = "mip"
    assert volume.rendering == "mip"

    # Another latent (PC sliders) updates the same layers in place.
    widget.source.value = "PCs"
    for slider in widget.pc_sliders:
        slider.value = slider.max
    before = volume.data.copy()
    widget.decode()
    qtbot.waitUntil(lambda: not widget.busy and widget.decoded.label.startswith("PC1"), timeout=WAIT_MS)
    assert viewer.layers[VOLUME_NAME] is volume and not np.allclose(volume.data, before)
    assert not viewer.layers[attention_layer_name("query_c0")].visible  # the user's toggle holds
    widget.surface_channel.value = NO_SURFACE
    assert SURFACE_NAME not in viewer.layers


def test_a_bad_run_directory_is_a_notification(dock, qtbot, tmp_path, notifications):
    viewer, widget = dock
    _open(qtbot, widget, tmp_path)
    assert widget.session is None and len(viewer.layers) == 0
    assert widget.status.value.startswith("error:") and str(tmp_path) in widget.status.value
    assert any(str(tmp_path) in m and "not a cryoformer training run" in m for m in notifications)
    assert not any("Traceback" in m for m in notifications)


def test_level_live_decoding_and_3d_view(dock, qtbot, run_dir):
    viewer, widget = dock
    _open(qtbot, widget, run_dir)
    widget.decode()
    qtbot.waitUntil(lambda: widget.decoded is not None and not widget.busy, timeout=WAIT_MS)
    surface, volume = viewer.layers[SURFACE_NAME], viewer.layers[VOLUME_NAME]
    auto_level, n_vertices = widget.decoded.iso_level, len(surface.data[0])
    # the spin box shows the level used to its own precision (decimals follow its step)
    shown = 10.0 ** -widget.level.native.decimals()
    assert widget.level.value == pytest.approx(auto_level, rel=1e-3, abs=shown)

    # A manual level re-meshes the surface (no decoding) and moves the iso threshold with it.
    widget.auto_level.value = False
    higher = auto_level + 0.5 * (float(widget.decoded.volume.max()) - auto_level)
    widget.level.value = higher
    qtbot.waitUntil(lambda: not widget.busy and widget.decoded.iso_level != auto_level, timeout=WAIT_MS)
    assert widget.decoded.iso_level == pytest.approx(higher, rel=1e-3)
    assert volume.iso_threshold == pytest.approx(higher, rel=1e-3)
    assert len(surface.data[0]) < n_vertices  # a higher level encloses less

    # Live mode: moving a slider decodes; requests made while busy collapse into the last one.
    widget.source.value = "PCs"
    widget.live.value = True
    slider = widget.pc_sliders[0]
    slider.value = slider.min
    slider.value = slider.max
    qtbot.waitUntil(lambda: not widget.busy and widget.decoded.label.startswith(f"PC1={slider.max:.3g}"),
                    timeout=WAIT_MS)
    np.testing.assert_allclose(widget.decoded.latent, widget.session.from_pcs([slider.max, 0.0, 0.0])[0], rtol=1e-5)

    viewer.dims.ndisplay = 3  # the Fig. 5 view: isosurface + additive channels rendered by vispy
    qtbot.wait(50)
    assert viewer.dims.ndisplay == 3 and surface.visible
