"""napari layer data for a decoded latent: volume, attention channels, attention-coloured surface.

Everything here is plain numpy and returns napari *LayerData tuples*
``(data, kwargs, layer_type)``, so it runs without a display (against
``napari.components.ViewerModel``, in a notebook, in a worker thread) and the dock widget only
wires controls to it. Volumes and attention maps come from a
:class:`~cryoformer_widgets.session.RunSession` (its one decoder and cache, shared with the
Jupyter explorer). No Qt import; scikit-image and napari (the napari extra's dependencies) are
imported where they are used, so the module imports without them.

The three views (paper §4.4, Fig. 5):

* the decoded density as a 3-D image (``rendering="iso"`` at the surface level, or ``"mip"``);
* one image per chosen attention channel (:func:`cryoformer.analysis.attention_stack`:
  ``query_c*`` = the conditioned structure query each voxel reads, ``weight_k*`` = its spatial
  attention weights), each with its own colormap and ``blending="additive"`` so several
  channels overlay on the density. Each is shown only inside the molecule's support
  (:func:`support_mask`: the isosurface's inside grown by one voxel) and set to its lower
  contrast limit elsewhere, which the single-hue colormaps draw black, i.e. adds nothing: the
  attention of solvent voxels would otherwise fill the box with an additive haze that hides the
  molecule. Contrast limits are percentiles inside the support (:data:`OVERLAY_PERCENTILES`);
  each layer gets a colour bar;
* the paper's Fig. 5 view: the density's isosurface (marching cubes) as a Surface layer whose
  vertex values are one attention channel, sampled by trilinear interpolation at the vertices,
  with contrast limits at percentiles of those vertex values (:data:`SURFACE_PERCENTILES`) and
  a colormap with dark ends, so the surface shows the channel's variation over the molecule
  instead of one colour.

Beside the attention channels, the flexible-region map (:class:`FlexibleRegionMap`, from
:func:`cryoformer.analysis.flexible_regions.flexible_regions`: the density-response score,
which finds moving domains better than the attention channels do, and its regions as a
Labels layer) can be overlaid with :func:`flex_layers` or ``latent_layers(..., flex=...)``.

All layers share ``scale`` = the decoded voxel size in Å (``units="angstrom"``) and voxel
coordinates ``(z, y, x)``, so they overlay each other and maps opened from ``.mrc`` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.ndimage import binary_dilation, map_coordinates

from cryoformer.analysis import attention_channel_names
from cryoformer.analysis.flexible_regions import FlexRegionConfig, flexible_regions

from .session import RunSession

__all__ = ["DecodedLatent", "decode_latent", "default_iso_level", "isosurface",
           "sample_at_vertices", "volume_layer", "attention_layer", "attention_layers",
           "surface_layer", "latent_layers", "layers_for_latent", "add_or_update",
           "ATTENTION_COLORMAPS", "VOLUME_NAME", "SURFACE_NAME", "attention_layer_name",
           "FlexibleRegionMap", "compute_flexible_regions", "flex_layers", "FLEX_NAME", "REGIONS_NAME",
           "support_mask", "robust_limits", "show_colorbars", "SUPPORT_DILATION_PX", "OVERLAY_PERCENTILES",
           "SURFACE_PERCENTILES", "SURFACE_COLORMAP"]

LayerData = Tuple[object, dict, str]
Channel = Union[int, str]

VOLUME_NAME = "cryoformer volume"
SURFACE_NAME = "cryoformer surface"
FLEX_NAME = "cryoformer flexible-region score"
REGIONS_NAME = "cryoformer flexible regions"
# Distinct single-hue maps that add up visibly on a dark canvas; cycled beyond their number.
ATTENTION_COLORMAPS = ("magenta", "cyan", "yellow", "green", "bop orange", "bop blue", "red",
                       "bop purple", "I Forest", "I Bordeaux", "I Orange", "I Purple", "I Blue", "blue")
# The overlays' support: the isosurface's inside grown by this many voxels, so values on the
# surface itself (between an inside and an outside voxel) are still drawn.
SUPPORT_DILATION_PX = 1
# Contrast limits of an overlay: percentiles of the channel inside the support. Not min/max:
# a few extreme voxels would squeeze everything else into one colour.
OVERLAY_PERCENTILES = (1.0, 99.5)
# Contrast limits of the coloured surface: percentiles of its vertex values (the channel on
# the surface spans a narrower range than in the whole box).
SURFACE_PERCENTILES = (2.0, 98.0)
# Dark blue to dark red through many hues: distinct colours, and dark ends that stay visible
# on a white or black canvas.
SURFACE_COLORMAP = "turbo"
# Layer kinds (metadata "cryoformer" → "kind") that get a colour bar.
_COLORBAR_KINDS = ("attention", "surface", "flexible-region score", "sample overlay")


def attention_layer_name(channel_name: str) -> str:
    """Layer name of an attention channel (stable, so re-decoding updates the same layer)."""
    return f"attention {channel_name}"


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class DecodedLatent:
    """Everything the layers show for one latent, computed once (the expensive part).

    Attributes
    ----------
    latent : np.ndarray
        ``[zdim]`` float32.
    volume : np.ndarray
        ``[D, D, D]`` float32 density, axes ``[z, y, x]``.
    attention : np.ndarray
        ``[C + K, D, D, D]`` float32 attention channels (``[C, …]`` without RSCA).
    channel_names : tuple of str
        Name of each attention channel (``query_c0`` …, ``weight_k0`` …).
    voxel_size : float
        Voxel edge in ``unit`` (Å when the run records a pixel size, else training pixels).
    unit : str
        ``"angstrom"`` or ``"pixel"``.
    iso_level : float
        Density level of the isosurface (density units).
    vertices : np.ndarray
        ``[V, 3]`` float32 isosurface vertices in voxel coordinates ``(z, y, x)``.
    faces : np.ndarray
        ``[F, 3]`` int32 vertex indices of each triangle.
    label : str
        How the latent was chosen (``"cluster 3"``, ``"PC1=0.4, PC2=-1"``, ``"particle 12"``).
    """

    latent: np.ndarray
    volume: np.ndarray
    attention: np.ndarray
    channel_names: Tuple[str, ...]
    voxel_size: float
    unit: str
    iso_level: float
    vertices: np.ndarray
    faces: np.ndarray
    label: str = ""

    @property
    def box(self) -> int:
        return int(self.volume.shape[0])

    def channel_index(self, channel: Channel) -> int:
        """Index of ``channel`` (an index or a name) in :attr:`attention`; ValueError if absent."""
        if isinstance(channel, str):
            if channel not in self.channel_names:
                raise ValueError(f"no attention channel {channel!r}; channels: {', '.join(self.channel_names)}")
            return self.channel_names.index(channel)
        index = int(channel)
        if not 0 <= index < len(self.channel_names):
            raise ValueError(f"attention channel index {index} out of range 0…{len(self.channel_names) - 1}")
        return index

    def support(self) -> np.ndarray:
        """``[D, D, D]`` bool: :func:`support_mask` of the volume at :attr:`iso_level`."""
        return support_mask(self.volume, self.iso_level)

    def metadata(self, **extra) -> dict:
        """Layer metadata recording where the layer came from (kept by napari, saved nowhere)."""
        info = {"latent": [float(v) for v in self.latent], "label": self.label,
                "voxel_size": self.voxel_size, "unit": self.unit, "iso_level": self.iso_level}
        info.update(extra)
        return {"cryoformer": info}


def default_iso_level(volume: np.ndarray) -> float:
    """Otsu's threshold of the density: splits molecule from solvent without a user guess."""
    from skimage.filters import threshold_otsu  # scikit-image comes with the napari extra only

    vol = np.asarray(volume, dtype=np.float32)
    if not float(vol.max()) > float(vol.min()):
        raise ValueError("the decoded volume is constant: it has no isosurface")
    return float(threshold_otsu(vol))


class IsoLevelError(ValueError):
    """An isosurface level outside the open range of a volume's values."""


def isosurface(volume: np.ndarray, level: float) -> Tuple[np.ndarray, np.ndarray]:
    """Marching-cubes isosurface of ``volume`` ``[D, D, D]`` at ``level``.

    Returns
    -------
    vertices : np.ndarray
        ``[V, 3]`` float32 in voxel coordinates ``(z, y, x)`` (voxel ``i`` at ``i``, as napari).
    faces : np.ndarray
        ``[F, 3]`` int32.

    Raises
    ------
    IsoLevelError (a ValueError)
        ``level`` outside the open range of the volume's values.
    """
    from skimage.measure import marching_cubes  # scikit-image comes with the napari extra only

    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = float(vol.min()), float(vol.max())
    if not lo < level < hi:
        raise IsoLevelError(f"isosurface level {level:.4g} is outside the density range ({lo:.4g}, {hi:.4g})")
    if not vol.flags.writeable:  # cached volumes are read-only; scikit-image's Cython wants a writable buffer
        vol = vol.copy()
    verts, faces, _normals, _values = marching_cubes(vol, level=level)
    return verts.astype(np.float32), faces.astype(np.int32)


def sample_at_vertices(channel: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a ``[D, D, D]`` map at ``[V, 3]`` voxel coordinates → ``[V]``.

    Marching-cubes vertices lie on voxel edges, so this is exact linear interpolation between
    the edge's two voxels; coordinates outside the box take the nearest edge value.
    """
    verts = np.asarray(vertices, dtype=np.float64)
    if verts.size == 0:
        return np.zeros(0, dtype=np.float32)
    return map_coordinates(np.asarray(channel, np.float32), verts.T, order=1, mode="nearest").astype(np.float32)


def decode_latent(session: RunSession, z, D: Optional[int] = None, iso_level: Optional[float] = None,
                  label: str = "") -> DecodedLatent:
    """Decode the density and attention maps at one latent and extract the isosurface.

    Parameters
    ----------
    session : RunSession
        The open run: its decoder (and volume cache), attention maps and voxel size.
    z : array-like
        ``[zdim]`` latent.
    D : int, optional
        Decoding box in voxels (default the session's, the training box); the voxel size
        scales by ``box / D``.
    iso_level : float, optional
        Isosurface level (density units); default :func:`default_iso_level`.
    label : str
        Recorded in the layers' metadata and names nothing else.

    Returns
    -------
    DecodedLatent
    """
    D = int(D or session.decode_box)
    latent = np.asarray(z, dtype=np.float32).reshape(-1)
    volume = session.volume_at(latent, D)      # [D, D, D], through the session's cache
    stack = session.attention_at(latent, D)    # [C + K, D, D, D]
    voxel, unit = session.voxel_size(D)
    level = default_iso_level(volume) if iso_level is None else float(iso_level)
    verts, faces = isosurface(volume, level)
    return DecodedLatent(latent, volume, stack, tuple(attention_channel_names(session.run.model)),
                         voxel, unit, level, verts, faces, label)


def _spatial(dec: DecodedLatent) -> dict:
    return {"scale": (dec.voxel_size,) * 3, "units": (dec.unit,) * 3, "axis_labels": ("z", "y", "x")}


def _limits(values: np.ndarray) -> Tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)  # napari refuses equal limits


def robust_limits(values: np.ndarray, percentiles: Tuple[float, float]) -> Tuple[float, float]:
    """Contrast limits at two percentiles of ``values`` (any shape, non-empty); min/max when
    those coincide (a channel constant over most voxels), never two equal numbers."""
    lo, hi = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), list(percentiles)))
    return (lo, hi) if hi > lo else _limits(values)


def support_mask(volume: np.ndarray, iso_level: float, dilation_px: int = SUPPORT_DILATION_PX) -> np.ndarray:
    """Where the molecule is: voxels at or above ``iso_level``, grown by ``dilation_px`` voxels.

    Parameters
    ----------
    volume : np.ndarray
        ``[D, D, D]`` density.
    iso_level : float
        Isosurface level (density units).
    dilation_px : int
        Growth in voxels (6-connected steps), ≥ 0.

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` bool.
    """
    inside = np.asarray(volume) >= iso_level
    if dilation_px > 0 and inside.any():
        inside = binary_dilation(inside, iterations=int(dilation_px))
    return inside


def _overlay(values: np.ndarray, support: np.ndarray) -> Tuple[np.ndarray, Tuple[float, float]]:
    """(``values`` inside ``support`` and its lower contrast limit outside, limits): drawn with a
    colormap starting at black and additive blending, the outside then adds nothing."""
    limits = robust_limits(values[support], OVERLAY_PERCENTILES) if support.any() else _limits(values)
    return np.where(support, values, np.float32(limits[0])).astype(np.float32), limits


def volume_layer(dec: DecodedLatent, rendering: str = "iso", name: str = VOLUME_NAME,
                 visible: bool = True) -> LayerData:
    """The decoded density as an image layer (``rendering`` ``"iso"`` at the surface level, or ``"mip"``)."""
    if rendering not in ("iso", "mip", "attenuated_mip", "translucent", "average"):
        raise ValueError(f"unknown rendering {rendering!r}")
    kwargs = dict(_spatial(dec), name=name, colormap="gray", rendering=rendering, visible=bool(visible),
                  iso_threshold=dec.iso_level, contrast_limits=_limits(dec.volume),
                  metadata=dec.metadata(kind="volume"))
    return dec.volume, kwargs, "image"


def attention_layer(dec: DecodedLatent, channel: Channel, visible: bool = True,
                    colormap: Optional[str] = None, support: Optional[np.ndarray] = None) -> LayerData:
    """One attention channel as an additive overlay inside the molecule (its own colormap, MIP).

    Parameters
    ----------
    dec : DecodedLatent
    channel : int or str
    visible : bool
    colormap : str, optional
        Default: one of :data:`ATTENTION_COLORMAPS` by channel index (all start at black).
    support : np.ndarray, optional
        ``[D, D, D]`` bool where the channel is shown; default :meth:`DecodedLatent.support`.

    Returns
    -------
    LayerData
        The channel ``[D, D, D]`` inside ``support``, its lower contrast limit elsewhere;
        contrast limits at :data:`OVERLAY_PERCENTILES` of the channel inside the support.
    """
    index = dec.channel_index(channel)
    data, limits = _overlay(dec.attention[index], dec.support() if support is None else support)
    kwargs = dict(_spatial(dec), name=attention_layer_name(dec.channel_names[index]),
                  colormap=colormap or ATTENTION_COLORMAPS[index % len(ATTENTION_COLORMAPS)],
                  blending="additive", rendering="mip", visible=bool(visible), opacity=0.7,
                  contrast_limits=limits,
                  metadata=dec.metadata(kind="attention", channel=dec.channel_names[index],
                                        shown_inside=f"isosurface grown by {SUPPORT_DILATION_PX} voxel"))
    return data, kwargs, "image"


def attention_layers(dec: DecodedLatent, channels: Optional[Sequence[Channel]] = None,
                     visible: Optional[Sequence[Channel]] = None) -> List[LayerData]:
    """Attention overlays for ``channels`` (default all); only ``visible`` ones shown (default all)."""
    chosen = [dec.channel_index(c) for c in (range(len(dec.channel_names)) if channels is None else channels)]
    shown = set(chosen) if visible is None else {dec.channel_index(c) for c in visible}
    support = dec.support()  # once for every channel
    return [attention_layer(dec, i, visible=i in shown, support=support) for i in chosen]


def surface_layer(dec: DecodedLatent, channel: Channel, colormap: str = SURFACE_COLORMAP,
                  name: str = SURFACE_NAME) -> LayerData:
    """The isosurface coloured by one attention channel sampled at its vertices (paper Fig. 5).

    The contrast limits are :data:`SURFACE_PERCENTILES` of the vertex values: the surface's
    own range, so its colours spread over the colormap (the metadata records them).
    """
    index = dec.channel_index(channel)
    values = sample_at_vertices(dec.attention[index], dec.vertices)
    limits = robust_limits(values, SURFACE_PERCENTILES) if values.size else _limits(dec.attention[index])
    kwargs = dict(_spatial(dec), name=name, colormap=colormap, shading="smooth", contrast_limits=limits,
                  metadata=dec.metadata(kind="surface", channel=dec.channel_names[index]))
    return (dec.vertices, dec.faces, values), kwargs, "surface"


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class FlexibleRegionMap:
    """The run's flexible-region map on one grid (computed once per run and box).

    Attributes
    ----------
    score : np.ndarray
        ``[D, D, D]`` float32 in ``[0, 1]``, the density-response score (docs/conventions.md).
    labels : np.ndarray
        ``[D, D, D]`` int32 regions, 0 = not flexible.
    voxel_size : float
        Voxel edge (``unit``).
    unit : str
    """

    score: np.ndarray
    labels: np.ndarray
    voxel_size: float
    unit: str


def compute_flexible_regions(session: RunSession, D: Optional[int] = None,
                             config: FlexRegionConfig = FlexRegionConfig()) -> FlexibleRegionMap:
    """The flexible-region score and regions of the session's run from its latents."""
    D = int(D or session.decode_box)
    labels, score = flexible_regions(session.run.model, session.latents, D, config)
    voxel, unit = session.voxel_size(D)
    return FlexibleRegionMap(score, labels, voxel, unit)


def flex_layers(flex: FlexibleRegionMap, visible: bool = True) -> List[LayerData]:
    """The flexible-region score (additive ``inferno`` image, MIP) and its regions (Labels)."""
    spatial = {"scale": (flex.voxel_size,) * 3, "units": (flex.unit,) * 3, "axis_labels": ("z", "y", "x")}
    score = dict(spatial, name=FLEX_NAME, colormap="inferno", blending="additive", rendering="mip",
                 visible=bool(visible), opacity=0.8, contrast_limits=(0.0, 1.0),
                 metadata={"cryoformer": {"kind": "flexible-region score", "method": "density"}})
    regions = dict(spatial, name=REGIONS_NAME, visible=False, opacity=0.5,
                   metadata={"cryoformer": {"kind": "flexible regions",
                                            "n_regions": int(flex.labels.max())}})
    return [(flex.score, score, "image"), (flex.labels, regions, "labels")]


def latent_layers(dec: DecodedLatent, channels: Optional[Sequence[Channel]] = None,
                  visible: Optional[Sequence[Channel]] = None, surface_channel: Optional[Channel] = 0,
                  rendering: str = "iso", flex: Optional[FlexibleRegionMap] = None) -> List[LayerData]:
    """Volume, the flexible-region map (when ``flex`` is given), attention overlays and (unless
    ``surface_channel`` is None) the coloured surface.

    With a surface the volume layer starts hidden: in 3-D its gray isosurface (the same level)
    is drawn first and its depth hides the coloured one; ticking it back shows the density."""
    layers = [volume_layer(dec, rendering, visible=surface_channel is None)]
    layers += flex_layers(flex) if flex is not None else []
    layers += attention_layers(dec, channels, visible)
    if surface_channel is not None:
        layers.append(surface_layer(dec, surface_channel))
    return layers


def layers_for_latent(session: RunSession, z, D: Optional[int] = None, channels: Optional[Sequence[Channel]] = None,
                      visible: Optional[Sequence[Channel]] = None, surface_channel: Optional[Channel] = 0,
                      rendering: str = "iso", iso_level: Optional[float] = None,
                      label: str = "") -> List[LayerData]:
    """:func:`decode_latent` then :func:`latent_layers`: a session and a latent → napari layer data."""
    dec = decode_latent(session, z, D, iso_level, label)
    return latent_layers(dec, channels, visible, surface_channel, rendering)


# Properties refreshed on an existing layer; the others (visibility, colormap, opacity,
# blending, rendering) are the user's choices in napari and are kept across re-decoding.
_REFRESH = {"image": ("scale", "units", "contrast_limits", "iso_threshold", "metadata"),
            "surface": ("scale", "units", "contrast_limits", "metadata"),
            "labels": ("scale", "units", "metadata")}


def add_or_update(viewer, layer_data: Sequence[LayerData]) -> list:
    """Put layer data into a viewer, updating layers of the same name and type in place.

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
    layer_data : sequence of (data, kwargs, layer_type)

    Returns
    -------
    list of napari layers, in the order of ``layer_data``.
    """
    # napari is the napari extra's; this module imports without it
    from napari.layers import Image, Labels, Layer, Surface

    classes = {"image": Image, "surface": Surface, "labels": Labels}
    out = []
    for data, kwargs, layer_type in layer_data:
        name = kwargs["name"]
        existing = viewer.layers[name] if name in viewer.layers else None
        # isinstance, not type(): a dock widget gets the viewer through napari's proxy.
        if existing is not None and isinstance(existing, classes.get(layer_type, ())):
            existing.data = data
            for key in _REFRESH.get(layer_type, ()):
                if key in kwargs:
                    setattr(existing, key, kwargs[key])
            out.append(existing)
            continue
        if existing is not None:  # same name, another type (a user's layer): replace it
            viewer.layers.remove(existing)
        layer = Layer.create(data, dict(kwargs), layer_type)
        show_colorbars([layer])  # on a new layer only: hiding one later is the user's choice
        viewer.add_layer(layer)
        out.append(layer)
    return out


def show_colorbars(layers: Sequence) -> None:
    """Turn on napari's colour bar of the overlays and surfaces among ``layers`` (what their
    colours mean, in the layer's contrast limits); layers without one are left alone."""
    for layer in layers:
        kind = layer.metadata.get("cryoformer", {}).get("kind")
        colorbar = getattr(layer, "colorbar", None)  # napari ≥ 0.5 draws one per layer
        if kind in _COLORBAR_KINDS and colorbar is not None:
            colorbar.visible = True
