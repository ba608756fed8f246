"""Volumes to PNG images: three orthogonal slices and a shaded isosurface (no GUI, numpy only).

The isosurface is ray-cast: after rotating the volume to the viewing direction, each image
pixel shows the first point along its ray where the density crosses the threshold (found to
sub-voxel precision by linear interpolation), lit by a headlight from the surface normal (the
negative density gradient). It needs only numpy and scipy, renders a 128³ map in well under a
second, and changes with the threshold exactly as a marching-cubes mesh would.

Thresholds are given in standard deviations above the volume's mean (``level = mean + t·σ``),
so one slider setting means the same on every decoded volume, whatever its scale. A series of
maps (a trajectory through latent space) is rendered at one absolute level and one view
(:func:`series_level`, :func:`isosurface_rgb_at_level`), so its frames compare, and written as
a GIF (Pillow) and, where an ffmpeg binary is found, an MP4 (:func:`write_movie`).

The Jupyter explorer and the command line use this module alike; it imports no GUI toolkit.
"""

from __future__ import annotations

import io
import os
import logging
import shutil
import subprocess
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from cryoformer.io.atomic import atomic_path

__all__ = ["png_bytes", "iso_level", "slice_panels", "slices_png", "isosurface_rgb", "isosurface_png",
           "isosurface_rgb_at_level", "series_level", "movie_frame", "write_gif", "write_mp4",
           "ffmpeg_executable", "palette", "SURFACE_RGB"]

log = logging.getLogger(__name__)

SURFACE_RGB = (0.55, 0.72, 0.95)   # light blue, as ChimeraX's default map colour
CONTOUR_RGB = (255, 150, 30)       # threshold outline drawn on the slices
BACKGROUND = 32                    # grey level behind the surface


def png_bytes(image: np.ndarray) -> bytes:
    """Encode ``[H, W]`` or ``[H, W, 3]`` uint8 as PNG bytes (Pillow, a matplotlib dependency)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _resize(image: np.ndarray, size: int, smooth: bool) -> np.ndarray:
    """Resize ``[h, w(, 3)]`` uint8 so the longer side is ``size`` px."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    method = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(image).resize(new, method))


def iso_level(volume: np.ndarray, threshold_sigma: float) -> float:
    """Density level ``mean + threshold_sigma · std`` of ``volume`` (same units as the map)."""
    v = np.asarray(volume, dtype=np.float64)
    return float(v.mean() + threshold_sigma * v.std())


def slice_panels(volume: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central slices of ``volume`` ``[D, D, D]`` (axes z, y, x).

    Returns
    -------
    xy, xz, yz : np.ndarray
        ``[D, D]`` each: ``volume[D//2]`` (rows y, columns x), ``volume[:, D//2]`` (rows z,
        columns x) and ``volume[:, :, D//2]`` (rows z, columns y).
    """
    v = np.asarray(volume)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"expected a cubic [D, D, D] volume, got shape {v.shape}")
    c = v.shape[0] // 2
    return v[c], v[:, c, :], v[:, :, c]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    pad = np.pad(mask, 1, constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def slices_png(volume: np.ndarray, threshold_sigma: Optional[float] = None, panel_px: int = 160,
               gap_px: int = 4) -> bytes:
    """Three central slices side by side (XY | XZ | YZ) as one PNG.

    Parameters
    ----------
    volume : np.ndarray
        ``[D, D, D]`` float density.
    threshold_sigma : float, optional
        Draw the outline of ``density > mean + threshold_sigma·σ`` in orange.
    panel_px : int
        Edge of each panel in pixels.
    gap_px : int
        Dark gap between panels (px).

    Returns
    -------
    bytes
        PNG of ``panel_px × (3·panel_px + 2·gap_px)`` RGB pixels; grey levels span the
        0.5–99.5 percentiles of the whole volume, so the three panels share one scale.
    """
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    level = None if threshold_sigma is None else iso_level(v, threshold_sigma)
    panels = []
    for plane in slice_panels(v):
        grey = _resize(np.clip((plane - lo) * scale, 0, 255).astype(np.uint8), panel_px, smooth=False)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        if level is not None:  # a one-pixel outline at display resolution
            mask = _resize((plane > level).astype(np.uint8), panel_px, smooth=False) > 0
            rgb[_outline(mask)] = CONTOUR_RGB
        panels.append(rgb)
    h = panels[0].shape[0]
    gap = np.full((h, gap_px, 3), 12, np.uint8)
    return png_bytes(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))


def _view_rotation(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """``[3, 3]`` rotation of index space (z, y, x): turn by azimuth about y, then tilt about x."""
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    ry = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    rx = np.array([[np.cos(e), -np.sin(e), 0], [np.sin(e), np.cos(e), 0], [0, 0, 1]])
    return rx @ ry


def isosurface_rgb(volume: np.ndarray, threshold_sigma: float, azimuth_deg: float = 30.0,
                   elevation_deg: float = 20.0, render_grid: int = 96,
                   color: Sequence[float] = SURFACE_RGB) -> np.ndarray:
    """Ray-cast the isosurface ``density = mean + threshold_sigma·σ``.

    Parameters
    ----------
    volume : np.ndarray
        ``[D, D, D]`` float density, axes ``[z, y, x]``.
    threshold_sigma : float
        Level in standard deviations above the mean.
    azimuth_deg, elevation_deg : float
        Viewing direction (degrees); ``0, 0`` looks down the z axis (the XY slice's view).
    render_grid : int
        The volume is first resampled to ``render_grid`` voxels per axis (cubic spline when
        enlarging, trilinear when shrinking), the resolution of the ray casting.
    color : (float, float, float)
        Surface RGB in ``[0, 1]``.

    Returns
    -------
    np.ndarray
        ``[G, G, 3]`` uint8 image, ``G = render_grid``; rows ``y`` (down), columns ``x``.
        A threshold above the maximum gives an empty (background) image.
    """
    v = np.asarray(volume, dtype=np.float32)
    level = iso_level(v, threshold_sigma)  # of the map as decoded, before resampling
    return isosurface_rgb_at_level(v, level, azimuth_deg, elevation_deg, render_grid, color)


def isosurface_rgb_at_level(volume: np.ndarray, level: float, azimuth_deg: float = 30.0,
                            elevation_deg: float = 20.0, render_grid: int = 96,
                            color: Sequence[float] = SURFACE_RGB) -> np.ndarray:
    """:func:`isosurface_rgb` at an absolute density ``level`` (the map's units).

    A series rendered at one level (:func:`series_level`) shows the density change between its
    maps; a level per map (``mean + t·σ`` of each) would partly hide it.

    Returns
    -------
    np.ndarray
        ``[G, G, 3]`` uint8, ``G = render_grid``.
    """
    v = _volume_in_view(np.asarray(volume, dtype=np.float32), azimuth_deg, elevation_deg, render_grid)
    G = v.shape[0]
    zz, yy, xx, depth = _first_crossing(v, float(level))
    shade = _headlight(v, zz, yy, xx) * (1.0 - 0.35 * depth / max(G - 1, 1))  # farther is darker
    img = np.full((G, G, 3), BACKGROUND, np.uint8)
    img[yy, xx] = np.clip(shade[:, None] * np.asarray(color)[None, :] * 255, 0, 255).astype(np.uint8)
    return img


def _volume_in_view(v: np.ndarray, azimuth_deg: float, elevation_deg: float, render_grid: int) -> np.ndarray:
    """``v`` ``[D, D, D]`` resampled to ``[G, G, G]`` (``G = render_grid``) and turned so that the
    viewing rays run along +z (index axis 0); outside the box is the map's minimum."""
    if v.shape[0] != render_grid:  # smooth spline upsampling gives smooth normals on small maps
        v = ndimage.zoom(v, render_grid / v.shape[0], order=1 if v.shape[0] > render_grid else 3)
    if azimuth_deg % 360 or elevation_deg % 360:
        R = _view_rotation(azimuth_deg, elevation_deg)
        centre = (np.array(v.shape) - 1) / 2.0
        v = ndimage.affine_transform(v, R, offset=centre - R @ centre, order=1, cval=float(v.min()))
    return v


def _first_crossing(v: np.ndarray, level: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each ray along +z first rises above ``level``.

    Returns
    -------
    zz, yy, xx : np.ndarray
        ``[P]`` int voxel of the first hit of each ray that hits (``P`` rays).
    depth : np.ndarray
        ``[P]`` float sub-voxel depth of the crossing (linear interpolation between ``zz − 1``,
        below the level, and ``zz``, above it).
    """
    inside = v > level                           # [z, y, x]
    hit = inside.any(axis=0)                     # [y, x]
    first = np.argmax(inside, axis=0)            # first voxel above the level
    yy, xx = np.nonzero(hit)
    zz = first[yy, xx]
    prev = v[np.maximum(zz - 1, 0), yy, xx]
    cur = v[zz, yy, xx]
    frac = np.where(zz > 0, (level - prev) / np.maximum(cur - prev, 1e-12), 1.0)
    return zz, yy, xx, zz - 1 + np.clip(frac, 0, 1)


def _headlight(v: np.ndarray, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``[P]`` brightness in ``[0.22, 1]`` at voxels ``(zz, yy, xx)``: ambient plus diffuse light
    from the viewer's upper left on the outward normal (−gradient: density falls outward)."""
    G = v.shape[0]

    def diff(axis: int) -> np.ndarray:  # central difference along one index axis, clamped at the box
        idx_hi, idx_lo = [zz, yy, xx], [zz, yy, xx]
        idx_hi[axis] = np.minimum(idx_hi[axis] + 1, G - 1)
        idx_lo[axis] = np.maximum(idx_lo[axis] - 1, 0)
        return v[tuple(idx_hi)] - v[tuple(idx_lo)]

    g = np.stack([diff(0), diff(1), diff(2)], axis=-1)  # [P, 3] (z, y, x)
    n = -g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    light = np.array([-1.0, -0.45, -0.35])  # towards the viewer (−z), from the upper left
    light /= np.linalg.norm(light)
    return 0.22 + 0.78 * np.clip(n @ light, 0, 1)


def isosurface_png(volume: np.ndarray, threshold_sigma: float, azimuth_deg: float = 30.0,
                   elevation_deg: float = 20.0, size_px: int = 256) -> bytes:
    """:func:`isosurface_rgb` smoothed up to ``size_px × size_px`` and encoded as PNG."""
    return png_bytes(_resize(isosurface_rgb(volume, threshold_sigma, azimuth_deg, elevation_deg),
                             size_px, smooth=True))


def palette(n: int) -> list:
    """``n`` distinguishable colours as ``"#rrggbb"`` (matplotlib's tab10, then tab20, cycled)."""
    # matplotlib here, not at the top: it costs every command ~0.5 s to import while the CLI
    # builds its parser, and only the explorer's colours need it.
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    base = colormaps["tab10"].colors if n <= 10 else colormaps["tab20"].colors
    return [to_hex(base[i % len(base)]) for i in range(n)]


def series_level(volumes: Iterable[np.ndarray], threshold_sigma: float) -> float:
    """One level for a whole series: ``mean + threshold_sigma·σ`` of all its voxels pooled.

    Parameters
    ----------
    volumes : iterable of np.ndarray
        ``[D, D, D]`` maps (read one at a time; none is kept).
    threshold_sigma : float
        Standard deviations above the pooled mean.

    Returns
    -------
    float
        Density level in the maps' units.
    """
    n, total, total_sq = 0, 0.0, 0.0
    for vol in volumes:
        v = np.asarray(vol, dtype=np.float64)
        n += v.size
        total += float(v.sum())
        total_sq += float(np.square(v).sum())
    if n == 0:
        raise ValueError("series_level needs at least one volume")
    mean = total / n
    return float(mean + threshold_sigma * np.sqrt(max(total_sq / n - mean * mean, 0.0)))


def movie_frame(volume: np.ndarray, level: float, index: int, count: int, azimuth_deg: float = 30.0,
                elevation_deg: float = 20.0, size_px: int = 256) -> np.ndarray:
    """One movie frame: the isosurface at ``level`` and a bar at the bottom showing the frame's
    place in the series (``index`` of ``count``, 0-based).

    Returns
    -------
    np.ndarray
        ``[size_px, size_px, 3]`` uint8.
    """
    img = _resize(isosurface_rgb_at_level(volume, level, azimuth_deg, elevation_deg), size_px, smooth=True)
    img = np.array(img)  # writable copy
    bar_px = max(2, size_px // 64)
    filled = int(round(size_px * (index + 1) / max(count, 1)))
    img[-bar_px:] = BACKGROUND // 2
    img[-bar_px:, :filled] = CONTOUR_RGB
    return img


def write_gif(path: str, frames: Sequence[np.ndarray], fps: float = 5.0) -> None:
    """Write ``frames`` (each ``[H, W, 3]`` uint8) as a looping GIF, atomically.

    Parameters
    ----------
    path : str
        Output ``.gif``.
    fps : float
        Frames per second (GIF stores the delay in milliseconds).
    """
    if not frames:
        raise ValueError("a movie needs at least one frame")
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000.0 / fps)), loop=0, optimize=False)


def ffmpeg_executable() -> Optional[str]:
    """The ffmpeg binary: imageio-ffmpeg's bundled one when installed, else ``ffmpeg`` on PATH."""
    try:
        import imageio_ffmpeg  # optional dependency: only the MP4 movies need it

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def write_mp4(path: str, frames: Sequence[np.ndarray], fps: float = 5.0) -> bool:
    """Write ``frames`` (``[H, W, 3]`` uint8, even ``H`` and ``W``) as H.264 MP4 through ffmpeg.

    Returns
    -------
    bool
        False (and a log line) when no ffmpeg is found or it fails: the MP4 is an optional
        extra beside the GIF, never a reason for the command to fail.
    """
    exe = ffmpeg_executable()
    if exe is None or not frames:
        log.info("no ffmpeg found (pip install imageio-ffmpeg for MP4): %s not written", os.path.basename(path))
        return False
    h, w = frames[0].shape[:2]
    raw = b"".join(np.ascontiguousarray(f, dtype=np.uint8).tobytes() for f in frames)
    cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", f"{fps:g}", "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
    try:
        with atomic_path(path, suffix=".mp4") as tmp:
            subprocess.run(cmd + [tmp], input=raw, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("ffmpeg could not write %s (%s): MP4 skipped, the GIF has the same frames",
                    os.path.basename(path), detail.decode(errors="replace").strip() or exc)
        return False
    return True
