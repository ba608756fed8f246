"""The napari dock widget "Run explorer" (npe2 command ``cryoformer-widgets.run_explorer``).

Open a training run, choose a latent (a K-means cluster centre, a point on PC sliders, or a
particle), decode it, and look at the density with its attention channels overlaid and the
isosurface coloured by one channel (paper §4.4, Fig. 5). *Flexible regions* computes the run's
flexible-region map (the density-response score and its regions, which locate moving domains
better than the attention channels) and keeps it overlaid beside the attention channels. The
run, its clusters, the latent choices and the decoder are the
:class:`~cryoformer_widgets.session.RunSession` the Jupyter explorer uses too; layer
construction lives in :mod:`.napari_layers`. This module only wires magicgui controls to them.

Loading and decoding run in a worker thread (``napari.qt.threading.thread_worker``) so the
viewer stays responsive; while one runs the buttons are disabled and the status line says what
is happening. A failure (not a run directory, a missing file, a bad level) is shown as one
napari error notification, never as a traceback. A decode requested while another is running
is coalesced: the latest request runs when the current one finishes, and the result of the
one running then is dropped unseen (it is stale). The status line gives each decode's time.

Opening a run also docks the latent-space panel (:class:`~.napari_latent.LatentSpacePanel`):
a scatter of the latents whose clicks decode a particle here, whose lasso selects and exports
particles, and which decodes trajectories between clusters as one 4-D layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox,
                              Label, PushButton, RadioButtons, SpinBox)
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error

from cryoformer.analysis import attention_channel_names

from .napari_layers import (SURFACE_NAME, VOLUME_NAME, FlexibleRegionMap, IsoLevelError, add_or_update,
                            attention_layer, attention_layer_name, compute_flexible_regions,
                            decode_latent, flex_layers, isosurface, latent_layers, surface_layer)
from .napari_latent import LatentSpacePanel
from .session import DEFAULT_K, RunSession

__all__ = ["RunExplorerDock"]

log = logging.getLogger(__name__)

MAX_PC_SLIDERS = 3  # more sliders than this crowd the dock; PC4+ stay at the mean
DEFAULT_VISIBLE_CHANNELS = 3  # the paper's Fig. 5 shows three channels
NO_SURFACE = "(no surface)"
SOURCES = ("cluster", "PCs", "particle")


@dataclasses.dataclass
class _Failed:
    """What a worker returns instead of raising: one line for the notification."""

    message: str


@thread_worker(start_thread=False, ignore_errors=True)
def _guarded(fn: Callable, *args: Any) -> Any:
    """Run ``fn(*args)`` in a worker thread, turning any exception into :class:`_Failed`.

    Catching here (instead of letting the worker's ``errored`` signal fire) keeps napari from
    showing a traceback dialog for user errors; the traceback goes to the debug log.
    """
    try:
        return fn(*args)
    except Exception as exc:  # every failure becomes a notification, bugs included
        log.debug("cryoformer run explorer: worker failed", exc_info=True)
        text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return _Failed(text)


class RunExplorerDock(Container):
    """Dock widget: open a cryoformer run, choose a latent, show volume + attention maps.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari (``viewer.window.add_plugin_dock_widget("cryoformer-widgets",
        "Run explorer")``).

    Attributes
    ----------
    session : RunSession or None
        The open run, its PCA, K-means and decoder.
    decoded : DecodedLatent or None
        The last decoded latent (what the layers show).
    busy : bool
        A worker is running.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session: Optional[RunSession] = None
        self.decoded = None
        self.flex: Optional[FlexibleRegionMap] = None  # the run's flexible-region map, once computed
        self.busy = False
        self._pending_decode = False
        self._requested: Optional[str] = None  # label of the latent shown or being decoded
        self._explicit = None  # (latent, label) asked for by the latent-space panel, not the controls
        self.last_decode_s: Optional[float] = None  # wall-clock seconds of the last decode shown
        self.latent_panel: Optional[LatentSpacePanel] = None  # docked when a run is opened
        self._closed = False
        self._channel_boxes: Dict[str, CheckBox] = {}

        self.run_dir = FileEdit(mode="d", label="run directory")
        self.k = SpinBox(value=DEFAULT_K, min=1, max=200, label="K-means k")
        self.open_button = PushButton(text="Open run")
        self.info = Label(value="no run open")
        self.source = RadioButtons(choices=SOURCES, value="cluster", label="latent from",
                                   orientation="horizontal")
        # Choices are callables: napari calls reset_choices() on a magicgui dock whenever the
        # layer list changes, which would reset fixed lists to their initial (empty) value.
        self.cluster = ComboBox(choices=self._cluster_choices, label="cluster")
        self.pc_sliders = Container(labels=True, label="PC coordinates")
        self.particle = SpinBox(value=0, min=0, max=0, label="particle (run order)")
        self.box = SpinBox(value=16, min=8, max=512, step=2, label="decode box (voxels)")
        self.rendering = ComboBox(choices=["iso", "mip"], value="iso", label="volume rendering")
        self.auto_level = CheckBox(value=True, text="automatic isosurface level (Otsu)")
        self.level = FloatSpinBox(value=0.0, min=-1e9, max=1e9, step=0.001, label="iso level",
                                  enabled=False)
        self.surface_channel = ComboBox(choices=self._surface_choices, label="surface colour")
        self.channels = Container(labels=False, scrollable=True, label="attention channels")
        self.live = CheckBox(value=False, text="decode when the latent changes")
        self.decode_button = PushButton(text="Decode", enabled=False)
        self.flex_button = PushButton(text="Flexible regions", enabled=False)
        self.status = Label(value="")
        self.extend([self.run_dir, self.k, self.open_button, self.info, self.source, self.cluster,
                     self.pc_sliders, self.particle, self.box, self.rendering, self.auto_level,
                     self.level, self.surface_channel, self.channels, self.live,
                     self.decode_button, self.flex_button, self.status])

        self.open_button.changed.connect(self._on_open_clicked)
        self.decode_button.changed.connect(self.decode)
        self.flex_button.changed.connect(self.show_flexible_regions)
        self.source.changed.connect(self._show_source_widgets)
        for widget in (self.cluster, self.particle, self.source):
            widget.changed.connect(self._latent_changed)
        self.rendering.changed.connect(self._on_rendering)
        self.surface_channel.changed.connect(self._on_surface_channel)
        self.auto_level.changed.connect(lambda auto: setattr(self.level, "enabled", not auto))
        self.level.changed.connect(self._on_level)
        self._show_source_widgets()
        # A worker may finish after napari closed the dock: its result must then be dropped.
        self.native.destroyed.connect(self._on_destroyed)

    def _on_destroyed(self, *_) -> None:
        self._closed = True
        if self.session is not None:
            self.session.close()

    def _cluster_choices(self, *_) -> List[str]:
        return self.session.cluster_names() if self.session is not None else []

    def _surface_choices(self, *_) -> List[str]:
        return [NO_SURFACE] + list(self._channel_boxes)

    # ------------------------------------------------------------------ worker plumbing
    def _start(self, fn: Callable, args: tuple, on_done: Callable, message: str):
        self._set_busy(True, message)
        worker = _guarded(fn, *args)
        worker.returned.connect(lambda result: self._finish(result, on_done))
        worker.start()
        return worker

    def _finish(self, result: Any, on_done: Callable) -> None:
        if self._closed:
            return
        self._set_busy(False, "")
        if isinstance(result, _Failed):
            self.status.value = f"error: {result.message}"
            show_error(f"cryoformer: {result.message}")
        else:
            on_done(result)
        if self._pending_decode and self.session is not None:
            self._pending_decode = False
            self.decode()

    def _set_busy(self, busy: bool, message: str) -> None:
        self.busy = busy
        self.open_button.enabled = not busy
        self.decode_button.enabled = not busy and self.session is not None
        self.flex_button.enabled = not busy and self.session is not None
        if message:
            self.status.value = message

    # ------------------------------------------------------------------ opening a run
    def _on_open_clicked(self, *_):
        self.open(str(self.run_dir.value))

    def open(self, run_dir: str) -> None:
        """Load ``run_dir`` (its default epoch: lowest held-out loss, else the latest), its PCA and
        K-means (those of ``cryoformer analyze`` when it wrote them, else ``k`` clusters), in a
        worker thread."""
        if self.busy:
            self.status.value = "busy: wait for the current task"
            return
        self.run_dir.value = run_dir
        self._start(functools.partial(RunSession, k=int(self.k.value)), (run_dir,), self._on_opened,
                    f"opening {run_dir} …")

    def show_session(self, session: RunSession) -> None:
        """Show a session made in a script instead of opening a run directory, e.g. latents
        made elsewhere decoded by a run's model (napari's console)::

            dock.show_session(RunSession.from_latents("RUN/", latents, kmeans_labels=labels))

        The session's decoder is this dock's from now on (it is closed with the dock).
        """
        if self.busy:
            raise RuntimeError("the Run explorer is busy; wait for the current task")
        self.run_dir.value = session.run.run_dir
        self._on_opened(session)

    def _on_opened(self, session: RunSession) -> None:
        if self.session is not None:
            self.session.close()  # its decoding thread; nothing of it is shown any more
        self.session, self.decoded, self.flex = session, None, None
        run = session.run
        apix = f"{run.pixel_size_angstrom:.3g} Å/px" if run.pixel_size_angstrom else "no pixel size"
        self.info.value = (f"epoch {run.epoch}: {session.n_particles} particles, zdim "
                           f"{run.model_config.zdim}, box {run.box_size} px ({apix})\n"
                           f"K-means: {session.kmeans_source}")
        self.cluster.reset_choices()
        self.cluster.value = self.cluster.choices[0]
        self.particle.max = session.n_particles - 1
        self.box.value = run.box_size
        self.pc_sliders.clear()
        for pc in range(1, min(session.n_pcs, MAX_PC_SLIDERS) + 1):
            lo, hi = session.pc_range(pc)
            hi = hi if hi > lo else lo + 1e-6  # a constant PC still gets a usable slider
            slider = FloatSlider(value=min(max(0.0, lo), hi), min=lo, max=hi, step=(hi - lo) / 100,
                                 label=f"PC{pc}")
            slider.changed.connect(self._latent_changed)
            self.pc_sliders.append(slider)
        names = attention_channel_names(run.model)
        self.channels.clear()
        self._channel_boxes = {}
        for i, name in enumerate(names):
            box = CheckBox(value=i < DEFAULT_VISIBLE_CHANNELS, text=name)
            box.changed.connect(lambda value, name=name: self._on_channel_toggled(name, value))
            self._channel_boxes[name] = box
            self.channels.append(box)
        with self.surface_channel.changed.blocked():  # nothing decoded yet
            self.surface_channel.reset_choices()
        self.surface_channel.value = names[0]
        self.status.value = f"opened {run.run_dir}"
        self._set_busy(False, "")
        self._show_latent_panel(session)

    def _show_latent_panel(self, session: RunSession) -> None:
        """Dock the latent-space panel beside this one (once), showing ``session``."""
        if self.latent_panel is None:
            self.latent_panel = LatentSpacePanel(self)
            window = getattr(self.viewer, "window", None)  # a headless ViewerModel has none
            if window is not None:
                window.add_dock_widget(self.latent_panel, name="cryoformer latent space", area="right")
        self.latent_panel.set_session(session)

    def _show_source_widgets(self, *_):
        source = self.source.value
        self.cluster.visible = source == "cluster"
        self.pc_sliders.visible = source == "PCs"
        self.particle.visible = source == "particle"

    # ------------------------------------------------------------------ decoding
    def current_latent(self):
        """(latent ``[zdim]``, label) chosen by the controls; ValueError without a run."""
        if self.session is None:
            raise ValueError("open a run first")
        source = self.source.value
        if source == "cluster":
            return self.session.from_cluster(self.cluster.choices.index(self.cluster.value))
        if source == "PCs":
            return self.session.from_pcs([s.value for s in self.pc_sliders])
        return self.session.from_particle(int(self.particle.value))

    def _latent_changed(self, *_):
        # napari re-sets a dock's values when layers change (reset_choices): decode only when
        # the latent really differs from the one shown or in progress.
        self._explicit = None  # the controls are now the newest request
        if self.live.value and self.session is not None and self.current_latent()[1] != self._requested:
            self.decode()

    def show_latent(self, z: np.ndarray, label: str) -> None:
        """Decode the latent ``z`` ``[zdim]`` (from the latent-space panel) in a worker thread;
        it supersedes any request still waiting, and a decode running now is not shown."""
        self._explicit = (np.asarray(z, dtype=np.float32).reshape(-1), str(label))
        self.decode()

    def decode(self, *_) -> None:
        """Decode the chosen latent in a worker thread, then show its layers."""
        if self.session is None:
            show_error("cryoformer: open a run first")
            return
        if self.busy:
            self._pending_decode = True  # coalesce: decode the latest choice when free
            return
        z, label = self._explicit if self._explicit is not None else self.current_latent()
        self._explicit = None
        self._requested = label
        level = None if self.auto_level.value else float(self.level.value)
        session = self.session

        def decode_with_level(z, box, level, label):
            # A manual level set on one latent's volume may lie outside another's values;
            # then this volume gets its automatic level (the status line shows the one used).
            t0 = time.perf_counter()
            try:
                dec = decode_latent(session, z, box, level, label)
            except IsoLevelError:
                if level is None:
                    raise
                dec = decode_latent(session, z, box, None, label)
            return dec, time.perf_counter() - t0

        self._start(decode_with_level, (z, int(self.box.value), level, label), self._show_decoded,
                    f"decoding {label} …")

    def _show_decoded(self, result) -> None:
        """A worker's (DecodedLatent, seconds): shown unless a newer request waits (stale)."""
        if self._pending_decode:
            return
        dec, self.last_decode_s = result
        self._show(dec)
        if self.latent_panel is not None:  # the panel the user clicked in says it too
            self.latent_panel.show_decode_time(dec.label, self.last_decode_s)

    def show_flexible_regions(self, *_) -> None:
        """Compute the run's flexible-region map at the decode box (worker thread) and overlay it."""
        if self.session is None:
            show_error("cryoformer: open a run first")
            return
        if self.busy:
            self.status.value = "busy: wait for the current task"
            return
        self._start(compute_flexible_regions, (self.session, int(self.box.value)), self._show_flex,
                    "computing the flexible-region map …")

    def _show_flex(self, flex: FlexibleRegionMap) -> None:
        self.flex = flex
        add_or_update(self.viewer, flex_layers(flex))
        self.status.value = f"flexible-region map: {int(flex.labels.max())} region(s)"

    def _wanted_channels(self) -> List[str]:
        """Checked channels, plus unchecked ones that already have a layer (kept up to date)."""
        return [name for name, box in self._channel_boxes.items()
                if box.value or attention_layer_name(name) in self.viewer.layers]

    def _show(self, dec) -> None:
        self.decoded = dec
        surface = self.surface_channel.value
        layers = latent_layers(dec, channels=self._wanted_channels(),
                               visible=[n for n, b in self._channel_boxes.items() if b.value],
                               surface_channel=None if surface == NO_SURFACE else surface,
                               rendering=self.rendering.value, flex=self.flex)
        add_or_update(self.viewer, layers)
        for name, box in self._channel_boxes.items():  # the check boxes decide visibility
            layer_name = attention_layer_name(name)
            if layer_name in self.viewer.layers:
                self.viewer.layers[layer_name].visible = box.value
        with self.level.changed.blocked():  # reflect the level used, without re-meshing
            # magicgui derives the spin box's decimals from its step: a power of ten a thousandth
            # of the density range keeps ~4 significant digits, so the shown level (and one
            # typed or set from code) is not rounded out of the volume's range.
            span = max(abs(float(dec.volume.max() - dec.volume.min())), 1e-12)
            self.level.step = 10.0 ** np.floor(np.log10(span / 1000))
            self.level.value = dec.iso_level
        timing = f" (decoded in {self.last_decode_s:.2f} s)" if self.last_decode_s is not None else ""
        self.status.value = (f"showing {dec.label}: {dec.box}³ voxels of {dec.voxel_size:.3g} "
                             f"{'Å' if dec.unit == 'angstrom' else 'px'}, level {dec.iso_level:.3g}{timing}")

    # ------------------------------------------------------------------ display changes
    def _on_channel_toggled(self, name: str, value: bool) -> None:
        if self.decoded is None:
            return
        layer_name = attention_layer_name(name)
        if layer_name in self.viewer.layers:
            self.viewer.layers[layer_name].visible = bool(value)
        elif value:
            add_or_update(self.viewer, [attention_layer(self.decoded, name, visible=True)])

    def _on_surface_channel(self, channel: str) -> None:
        if self.decoded is None:
            return
        if channel == NO_SURFACE:
            if SURFACE_NAME in self.viewer.layers:
                self.viewer.layers.remove(SURFACE_NAME)
            if VOLUME_NAME in self.viewer.layers:  # hidden while the surface showed the same level
                self.viewer.layers[VOLUME_NAME].visible = True
            return
        add_or_update(self.viewer, [surface_layer(self.decoded, channel)])

    def _on_rendering(self, rendering: str) -> None:
        if VOLUME_NAME in self.viewer.layers:
            self.viewer.layers[VOLUME_NAME].rendering = rendering

    def _on_level(self, level: float) -> None:
        """A new iso level re-meshes the surface in a worker (no re-decoding)."""
        # While busy, nothing is lost: the next decode reads the level from the spin box.
        if self.decoded is None or self.auto_level.value or self.busy:
            return
        dec = self.decoded

        def remesh():
            verts, faces = isosurface(dec.volume, float(level))
            return dataclasses.replace(dec, iso_level=float(level), vertices=verts, faces=faces)

        self._start(remesh, (), self._show, f"isosurface at {level:.4g} …")
