"""``cryoformer traverse``: maps along a trajectory through latent space, a ChimeraX series and a movie."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Tuple

import numpy as np

from cryoformer.analysis.analyze import AnalyzeConfig, analysis_dir
from cryoformer.analysis.latent_space import kmeans
from cryoformer.analysis.traversal import (DEFAULT_GRAPH_POINTS, DEFAULT_NEIGHBOURS, LatentPath, SeriesConfig,
                                           graph_path, pc_path, straight_path, write_series)
from cryoformer.analysis.volumes import VolumeOptions, decoded_voxel_size, staged_directory
from cryoformer.cli.analyze_cmd import add_run_arguments, open_run
from cryoformer.cli.eval_vol_cmd import latent_argument
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir
from cryoformer.options import add_arguments, from_flat, given_values

PATH_OPTIONS = ("--pc", "--z-start", "--particles", "--centres", "--graph")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "traverse",
        help="maps along a latent trajectory (PC, straight line, or along the data), "
             "a ChimeraX volume series and a movie",
        description=(
            "Decode -n maps along one trajectory through latent space and write DIR/vol_000.mrc … "
            "(voxel size in Å: training pixel size × training box / D), z_path.txt (the latents, one "
            "per row), open_series.cxc (opens the maps in ChimeraX as one volume series), movie.gif "
            "(+ movie.mp4 when ffmpeg or imageio-ffmpeg is installed: the isosurface at one level and "
            "one view for every map) and, for --graph, path_particles.txt. Particles are 0-based rows "
            "of the run's latents (RUN/analysis/z.npy)."
        ),
    )
    add_run_arguments(p)
    path = p.add_argument_group("trajectory (exactly one)")
    path.add_argument("--pc", type=int, metavar="N", help="along principal component N (1 = PC1), between "
                      "the 5th and 95th percentiles of the particles' coordinates on it")
    path.add_argument("--z-start", help="straight line from this latent (zdim numbers, or a file with one "
                      "latent: .npy, .pkl, .txt) to --z-end")
    path.add_argument("--z-end", help="end of the --z-start line")
    path.add_argument("--particles", type=int, nargs=2, metavar=("I", "J"),
                      help="straight line between the latents of particles I and J")
    path.add_argument("--centres", "--centers", type=int, nargs=2, metavar=("A", "B"),
                      help="straight line between K-means centres A and B (those of RUN/analysis for "
                           "this epoch when present, else computed with --k and --seed as analyze does)")
    path.add_argument("--graph", type=int, nargs=2, metavar=("I", "J"),
                      help="along the data: shortest path from particle I to particle J through the "
                           "k-nearest-neighbour graph of the latents (as cryoDRGN's graph_traversal)")
    p.add_argument("-n", type=int, default=10, help="maps along the trajectory (default 10)")
    # computed centres are analyze's: its k and seed are the defaults
    p.add_argument("--k", type=int, default=AnalyzeConfig().k,
                   help="K-means clusters for --centres when computed (default %(default)s)")
    p.add_argument("--seed", type=int, default=AnalyzeConfig().seed,
                   help="seed of K-means and of the graph's subsample (default %(default)s)")
    p.add_argument("--neighbours", "--neighbors", type=int, default=DEFAULT_NEIGHBOURS,
                   help=f"neighbours per particle in the --graph graph (default {DEFAULT_NEIGHBOURS})")
    p.add_argument("--max-graph-points", type=int, default=DEFAULT_GRAPH_POINTS,
                   help="build the --graph graph on a random subset of this many particles when there "
                        f"are more (default {DEFAULT_GRAPH_POINTS})")
    p.add_argument("-D", "--box", type=int, help="decoding box in voxels, even (default: the training box)")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="volumes decoded together (default 4)")
    add_arguments(p, VolumeOptions, "map post-processing")
    movie = p.add_argument_group("movie and ChimeraX level")
    movie.add_argument("--iso-sigma", type=float, default=1.5,
                       help="isosurface level in standard deviations above the mean of all the "
                            "series' voxels (default 1.5); one level for every map")
    movie.add_argument("--azimuth", type=float, default=30.0, help="movie view azimuth in degrees (default 30)")
    movie.add_argument("--elevation", type=float, default=20.0, help="movie view elevation in degrees (default 20)")
    movie.add_argument("--fps", type=float, default=5.0, help="movie frames per second (default 5)")
    movie.add_argument("--no-movie", action="store_true", help="write no movie (the maps and script only)")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    return p


def _check_args(args) -> None:
    given = [name for name, value in (("--pc", args.pc), ("--z-start", args.z_start),
                                      ("--particles", args.particles), ("--centres", args.centres),
                                      ("--graph", args.graph)) if value is not None]
    if len(given) != 1:
        raise InputError(None, "trajectory", f"give exactly one of {', '.join(PATH_OPTIONS)}; got "
                         f"{', '.join(given) if given else 'none'}")
    if (args.z_start is None) != (args.z_end is None):
        raise InputError(None, "--z-end" if args.z_end is None else "--z-start", "--z-start and --z-end go together")
    for name, value in (("-n", args.n), ("--k", args.k), ("--batch-size", args.batch_size),
                        ("--neighbours", args.neighbours), ("--max-graph-points", args.max_graph_points)):
        if value < (2 if name in ("-n", "--max-graph-points") else 1):
            raise InputError(None, name, f"must be at least {2 if name in ('-n', '--max-graph-points') else 1}, "
                             f"got {value}")
    if args.box is not None and (args.box < 2 or args.box % 2):
        raise InputError(None, "-D", f"decoding box must be even and >= 2, got {args.box}")
    if not args.fps > 0:
        raise InputError(None, "--fps", f"must be positive, got {args.fps}")


def _particle_rows(pair, n: int, option: str) -> Tuple[int, int]:
    for row in pair:
        if not 0 <= row < n:
            raise InputError(None, option, f"particles are rows 0…{n - 1} of the run's latents, got {row}")
    return int(pair[0]), int(pair[1])


def _analysis_files(args, loaded) -> List[List[str]]:
    """``[z.npy, kmeans_centers.npy]`` of each existing analysis directory that may be this
    epoch's (``RUN/analysis`` or ``RUN/analysis.E``)."""
    found = []
    for epoch in dict.fromkeys((args.epoch, loaded.epoch)):
        folder = analysis_dir(args.run_dir, epoch)
        files = [os.path.join(folder, name) for name in ("z.npy", "kmeans_centers.npy")]
        if all(os.path.isfile(f) for f in files):
            found.append(files)
    return found


def _centres(args, loaded) -> Tuple[np.ndarray, str]:
    """K-means centres ``[K, zdim]``: those ``analyze`` wrote for these latents, else computed."""
    for z_file, centres_file in _analysis_files(args, loaded):
        z_saved = np.load(z_file, allow_pickle=False)
        if z_saved.shape == loaded.latents.shape and np.array_equal(z_saved, loaded.latents):
            return np.load(centres_file, allow_pickle=False), f"from {os.path.dirname(z_file)}"
    km = kmeans(loaded.latents, args.k, seed=args.seed)
    return km.centers, f"computed: k = {args.k}, seed {args.seed}"


def _path(args, loaded) -> LatentPath:
    """The trajectory the arguments ask for."""
    z, zdim = loaded.latents, loaded.model.config.zdim
    if args.pc is not None:
        return pc_path(z, args.pc, args.n)
    if args.z_start is not None:
        return straight_path(latent_argument(args.z_start, zdim, "--z-start"),
                             latent_argument(args.z_end, zdim, "--z-end"), args.n)
    if args.particles is not None:
        i, j = _particle_rows(args.particles, len(z), "--particles")
        return straight_path(z[i], z[j], args.n, f"straight line between particles {i} and {j}")
    if args.graph is not None:
        i, j = _particle_rows(args.graph, len(z), "--graph")
        # One step without a progress bar (scikit-learn's k-NN): say what the wait is for.
        print(f"k-nearest-neighbour graph of {min(len(z), args.max_graph_points)} latents "
              "(under a minute for 10⁵) …", file=sys.stderr, flush=True)
        return graph_path(z, i, j, args.n, args.neighbours, args.max_graph_points, args.seed)
    centres, source = _centres(args, loaded)
    for c in args.centres:
        if not 0 <= c < len(centres):
            raise InputError(None, "--centres", f"centres are numbered 0…{len(centres) - 1} ({source}), got {c}")
    a, b = args.centres
    return straight_path(centres[a], centres[b], args.n,
                         f"straight line between K-means centres {a} and {b} ({source})")


def run(args) -> int:
    _check_args(args)
    options = from_flat(VolumeOptions, given_values(args, VolumeOptions))
    loaded = open_run(args)
    inputs = loaded.input_files() + [f for f in (args.z_start, args.z_end) if f and os.path.isfile(f)]
    if args.centres is not None:
        inputs += [f for files in _analysis_files(args, loaded) for f in files]
    claim_output_dir(args.outdir, inputs, args.force, option="-o")
    path = _path(args, loaded)
    D = args.box or loaded.box_size
    # No recorded pixel size: maps in training-pixel units (voxel size 1 at the training box).
    apix = decoded_voxel_size(loaded.box_size, loaded.pixel_size_angstrom or 1.0, D)
    options.check(apix)
    config = SeriesConfig(box_size=D, volumes=options, iso_sigma=args.iso_sigma, azimuth_deg=args.azimuth,
                          elevation_deg=args.elevation, fps=args.fps, movie=not args.no_movie,
                          batch_size=args.batch_size)
    with staged_directory(args.outdir) as stage:
        result = write_series(loaded.model, path, stage, apix, config)
    print(f"{len(result['maps'])} maps of {D}³ voxels, {apix:.3f} Å/voxel, along {path.description} "
          f"(length {path.length:.3g} in latent units)")
    print(f"output: {args.outdir}/ ({', '.join(result['files'][-3:])}; ChimeraX level {result['level']:.4g})")
    return 0
