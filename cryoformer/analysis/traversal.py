"""Trajectories through latent space, and the files a series of maps along one is written as.

Paths (each a :class:`LatentPath` of ``n`` latents ``[n, zdim]``):

* :func:`pc_path`: along one principal component, between percentiles of the particles'
  coordinates on it (as ``cryoformer analyze`` and cryoDRGN's ``pc_traversal``);
* :func:`straight_path`: the straight line between two latents (given vectors, two particles,
  two K-means centres);
* :func:`graph_path`: along the data, as cryoDRGN's ``graph_traversal``: the shortest path
  between two particles in the k-nearest-neighbour graph of the latents (edges weighted by
  their Euclidean length). Where the particles form a curved or branched manifold, the straight
  line between two states can cross empty latent space, where the decoder has never been
  trained; a path hopping between neighbouring particles stays where the data are.

Every path is resampled to ``n`` latents evenly spaced along its arc length
(:func:`resample_path`), so the maps of a series are equal steps apart.

A series (:func:`write_series`) is the maps ``vol_000.mrc …``, ``z_path.txt`` (the latents, one
per row, as cryoDRGN writes them), ``open_series.cxc`` (a ChimeraX script opening the maps as
one volume series at one isosurface level) and ``movie.gif`` (+ ``movie.mp4`` where ffmpeg is
found): the isosurface of every map at one level and one view, rendered without a GUI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from scipy.sparse import csgraph, csr_matrix
from tqdm.auto import tqdm

from cryoformer.analysis.latent_space import pc_traversal, pca
from cryoformer.analysis.render import movie_frame, series_level, write_gif, write_mp4
from cryoformer.analysis.volumes import VolumeOptions, write_volumes
from cryoformer.errors import InputError, PathLike
from cryoformer.io.atomic import atomic_open
from cryoformer.io.mrc import read_volume

__all__ = ["LatentPath", "SeriesConfig", "resample_path", "straight_path", "pc_path", "knn_graph",
           "graph_path", "write_series", "write_series_movie", "chimerax_script", "DEFAULT_NEIGHBOURS",
           "DEFAULT_GRAPH_POINTS"]

DEFAULT_NEIGHBOURS = 10
# Above this many particles the graph is built on a random subset (the two end particles always
# in it): the graph of 100 000 8-D latents took 44 s on 2 shared cores (20 000: 4 s), and a
# denser sample of a manifold than that does not change its shortest paths visibly.
DEFAULT_GRAPH_POINTS = 100_000


@dataclass(frozen=True, eq=False)  # arrays have no boolean equality
class LatentPath:
    """A trajectory through latent space.

    Attributes
    ----------
    latents : np.ndarray
        ``[n, zdim]`` float32, evenly spaced along the path's arc length.
    description : str
        What the path is, in words (written into the ChimeraX script and the report).
    particles : np.ndarray or None
        ``[m]`` int64 particle rows (the run's particle order) the path visits, in order; only
        for :func:`graph_path`.
    length : float
        Arc length of the path in latent units.
    """

    latents: np.ndarray
    description: str
    particles: Optional[np.ndarray] = None
    length: float = 0.0


def _check_n(n: int) -> None:
    if n < 2:
        raise InputError(None, "-n", f"a path needs at least 2 latents, got {n}")


def resample_path(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along the polyline ``points`` ``[m, zdim]``.

    The first and last points are kept exactly; a polyline of zero length gives ``n`` copies
    of its first point.

    Returns
    -------
    np.ndarray
        ``[n, zdim]`` float32.
    """
    p = np.atleast_2d(np.asarray(points, dtype=np.float64))                 # [m, zdim]
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1)                      # [m - 1]
    arc = np.concatenate([[0.0], np.cumsum(steps)])                         # [m]
    if len(p) == 1 or arc[-1] == 0.0:
        return np.repeat(p[:1], n, axis=0).astype(np.float32)
    targets = np.linspace(0.0, arc[-1], n)                                  # [n]
    seg = np.clip(np.searchsorted(arc, targets, side="right") - 1, 0, len(p) - 2)
    frac = (targets - arc[seg]) / np.maximum(steps[seg], 1e-300)           # [n] in [0, 1]
    out = p[seg] + frac[:, None] * (p[seg + 1] - p[seg])
    out[-1] = p[-1]
    return out.astype(np.float32)


def straight_path(z_start: np.ndarray, z_end: np.ndarray, n: int, description: str = "") -> LatentPath:
    """``n`` latents evenly spaced on the straight line from ``z_start`` to ``z_end`` (``[zdim]`` each)."""
    _check_n(n)
    a, b = np.asarray(z_start, np.float64).ravel(), np.asarray(z_end, np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(None, "--z-end", f"start and end latents differ in length ({a.size} and {b.size})")
    z = (a[None, :] + np.linspace(0.0, 1.0, n)[:, None] * (b - a)[None, :]).astype(np.float32)
    return LatentPath(z, description or "straight line between two latents", None,
                      float(np.linalg.norm(b - a)))


def pc_path(latents: np.ndarray, pc: int, n: int, percentiles: Sequence[float] = (5.0, 95.0)) -> LatentPath:
    """``n`` latents along principal component ``pc`` (1-based) between two percentiles of the
    particles' coordinates on it, every other PC at zero (the mean latent)."""
    _check_n(n)
    pcs = pca(latents)
    if not 1 <= pc <= pcs.projections.shape[1]:
        raise InputError(None, "--pc", f"must be between 1 and {pcs.projections.shape[1]} (the number of "
                         f"principal components of these latents), got {pc}")
    z = pc_traversal(pcs, pc, n, percentiles)
    lo, hi = percentiles
    return LatentPath(z, f"PC{pc}, {lo:g}th to {hi:g}th percentile", None,
                      float(np.linalg.norm(z[-1].astype(np.float64) - z[0])))


def knn_graph(latents: np.ndarray, n_neighbours: int = DEFAULT_NEIGHBOURS) -> csr_matrix:
    """The symmetric k-nearest-neighbour graph of ``latents`` ``[N, zdim]``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``[N, N]``: entry ``(i, j)`` is the Euclidean distance between latents ``i`` and ``j``
        when either is among the other's ``n_neighbours`` nearest, else absent.
    """
    # scikit-learn here, not at the top: ~1 s to import, and every CLI command imports this
    # module while building its parser.
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(latents, dtype=np.float64)
    k = min(n_neighbours, len(z) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(z)
    graph = nn.kneighbors_graph(z, mode="distance")                         # [N, N], self at 0
    # A duplicated latent has distance 0, which a sparse graph would read as "no edge".
    graph.data = np.maximum(graph.data, 1e-12)
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph.maximum(graph.T).tocsr()


def _graph_nodes(n_total: int, start: int, end: int, max_points: int, seed: int) -> np.ndarray:
    """Rows the graph is built on: all, or a seeded random subset that keeps ``start``, ``end``."""
    if n_total <= max_points:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(n_total), [start, end])
    pick = rng.choice(others, size=max(max_points - 2, 0), replace=False)
    return np.sort(np.concatenate([[start, end], pick]))


def graph_path(latents: np.ndarray, start: int, end: int, n: int, n_neighbours: int = DEFAULT_NEIGHBOURS,
               max_points: int = DEFAULT_GRAPH_POINTS, seed: int = 0) -> LatentPath:
    """Shortest path between particles ``start`` and ``end`` through the k-NN graph of the latents.

    Parameters
    ----------
    latents : np.ndarray
        ``[N, zdim]`` particle latents.
    start, end : int
        Particle rows (0-based, the order of ``latents``).
    n : int
        Latents returned, evenly spaced along the path.
    n_neighbours : int
        ``k`` of the graph; raise it when the two particles are not connected.
    max_points : int
        Above this many particles the graph uses a seeded random subset (``start`` and ``end``
        always in it).
    seed : int
        Seed of that subset.

    Returns
    -------
    LatentPath
        ``particles`` lists the rows the path visits.

    Raises
    ------
    InputError
        A row out of range, ``n_neighbours < 1``, or no path between the two particles.
    """
    _check_n(n)
    z = np.asarray(latents, dtype=np.float64)
    for name, row in (("start", start), ("end", end)):
        if not 0 <= row < len(z):
            raise InputError(None, "--graph",
                             f"{name} particle must be a row 0…{len(z) - 1} of the latents, got {row}")
    if n_neighbours < 1:
        raise InputError(None, "--neighbours", f"must be a positive integer, got {n_neighbours}")
    nodes = _graph_nodes(len(z), start, end, max_points, seed)              # [M] rows of z
    graph = knn_graph(z[nodes], n_neighbours)
    s, e = int(np.searchsorted(nodes, start)), int(np.searchsorted(nodes, end))
    dist, pred = csgraph.dijkstra(graph, directed=False, indices=s, return_predecessors=True)
    if not np.isfinite(dist[e]):
        raise InputError(None, "--graph", f"particles {start} and {end} are not connected in the "
                         f"{n_neighbours}-nearest-neighbour graph of the latents (they lie in separate "
                         "groups); raise --neighbours or pick particles of one connected region")
    hops = [e]
    while hops[-1] != s:
        hops.append(int(pred[hops[-1]]))
    rows = nodes[np.array(hops[::-1])]                                      # [m] path, start → end
    return LatentPath(resample_path(z[rows], n),
                      f"shortest path between particles {start} and {end} in the "
                      f"{n_neighbours}-nearest-neighbour graph of {len(nodes)} latents",
                      rows.astype(np.int64), float(dist[e]))


@dataclass(frozen=True)
class SeriesConfig:
    """How a series of maps is written (:func:`write_series`).

    Attributes
    ----------
    box_size : int or None
        Decoding box in voxels (default the training box).
    volumes : VolumeOptions
        Hand flip, sign, low-pass, first file number.
    iso_sigma : float
        Isosurface level of the movie and the ChimeraX script, in standard deviations above the
        mean of all the series' voxels pooled (one level for every map).
    azimuth_deg, elevation_deg : float
        Movie view (degrees), the same for every frame.
    movie_px : int
        Movie frame edge (px, even for MP4).
    fps : float
        Movie frames per second.
    movie : bool
        Write ``movie.gif`` (and ``movie.mp4`` where ffmpeg is found).
    batch_size : int
        Volumes decoded together.
    progress : bool
        tqdm progress bars.
    """

    box_size: Optional[int] = None
    volumes: VolumeOptions = VolumeOptions()
    iso_sigma: float = 1.5
    azimuth_deg: float = 30.0
    elevation_deg: float = 20.0
    movie_px: int = 256
    fps: float = 5.0
    movie: bool = True
    batch_size: int = 4
    progress: bool = True


def chimerax_script(names: Sequence[str], level: float, description: str, fps: float = 5.0) -> str:
    """A ChimeraX command script that opens ``names`` (paths relative to the script: ChimeraX runs
    a ``.cxc`` in its own directory) as one volume series with surfaces at ``level``."""
    quoted = " ".join(f'"{n}"' if " " in n else n for n in names)
    return "\n".join([
        f"# cryoformer: {len(names)} maps along {description}",
        "# In ChimeraX: open open_series.cxc  (or drag it onto the window).",
        "# The series is model #1 in a fresh session; change #1 below if other models are open.",
        f"open {quoted} vseries true",
        f"volume #1 style surface level {level:.6g}",
        "view",
        "# Play the series back and forth (stop with: vseries stop #1):",
        f"vseries play #1 loop true direction oscillate maxFrameRate {fps:g}",
        "",
    ])


def write_series_movie(paths: Sequence[str], gif_path: str, level: Optional[float] = None,
                       iso_sigma: float = 1.5, azimuth_deg: float = 30.0, elevation_deg: float = 20.0,
                       size_px: int = 256, fps: float = 5.0, progress: bool = False) -> List[str]:
    """A movie of the maps ``paths`` (``.mrc``, in order): the isosurface of each at one level
    and one view, as ``gif_path`` and, where ffmpeg is found, the same name ending ``.mp4``.

    Parameters
    ----------
    level : float, optional
        Density level; default ``mean + iso_sigma·σ`` of all the maps' voxels pooled.
    azimuth_deg, elevation_deg : float
        The view (degrees), the same for every frame.
    size_px : int
        Frame edge (px; even, for MP4).

    Returns
    -------
    list of str
        The paths written.
    """
    if level is None:
        level = series_level((read_volume(p)[0] for p in paths), iso_sigma)
    frames = [movie_frame(read_volume(p)[0], level, i, len(paths), azimuth_deg, elevation_deg, size_px)
              for i, p in enumerate(tqdm(paths, desc="movie frames", unit="frame",
                                         disable=not progress, leave=False))]
    write_gif(gif_path, frames, fps)
    mp4_path = os.path.splitext(gif_path)[0] + ".mp4"
    return [gif_path] + ([mp4_path] if write_mp4(mp4_path, frames, fps) else [])


def write_series(model, path: LatentPath, out_dir: PathLike, voxel_size_angstrom: float,
                 config: SeriesConfig = SeriesConfig()) -> dict:
    """Decode the maps along ``path`` and write the series into ``out_dir`` (module docstring).

    Parameters
    ----------
    model : CryoFormer
        In eval mode.
    path : LatentPath
    out_dir : path
        Directory (normally a staged one: :func:`cryoformer.io.atomic.staged_directory`).
    voxel_size_angstrom : float
        Voxel size (Å) of the decoded maps (:func:`~cryoformer.analysis.volumes.decoded_voxel_size`).
    config : SeriesConfig

    Returns
    -------
    dict
        ``maps`` (file names), ``level`` (density level of the script and the movie), ``files``
        (every file written, names relative to ``out_dir``).
    """
    out_dir = os.fspath(out_dir)
    config.volumes.check(voxel_size_angstrom)
    paths = write_volumes(model, path.latents, out_dir, voxel_size_angstrom, config.box_size,
                          batch_size=config.batch_size, progress=config.progress,
                          desc="decoding maps", options=config.volumes)
    names = [os.path.basename(p) for p in paths]
    np.savetxt(os.path.join(out_dir, "z_path.txt"), path.latents, fmt="%.9g")  # float32 round-trips
    files = names + ["z_path.txt"]
    if path.particles is not None:
        np.savetxt(os.path.join(out_dir, "path_particles.txt"), path.particles, fmt="%d")
        files.append("path_particles.txt")
    level = series_level((read_volume(p)[0] for p in paths), config.iso_sigma)
    with atomic_open(os.path.join(out_dir, "open_series.cxc"), "w") as fh:
        fh.write(chimerax_script(names, level, path.description, config.fps))
    files.append("open_series.cxc")
    if config.movie:
        movies = write_series_movie(paths, os.path.join(out_dir, "movie.gif"), level, config.iso_sigma,
                                    config.azimuth_deg, config.elevation_deg, config.movie_px, config.fps,
                                    config.progress)
        files += [os.path.basename(m) for m in movies]
    return {"maps": names, "level": level, "files": files}
