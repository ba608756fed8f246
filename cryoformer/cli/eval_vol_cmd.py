"""``cryoformer eval-vol``: decode volumes at given latents.

Also home of the latent readers ``traverse`` shares: :func:`parse_latent_text`,
:func:`read_latent_file` and :func:`latent_argument`.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional

import numpy as np

from cryoformer.analysis.traversal import straight_path
from cryoformer.analysis.volumes import VolumeOptions, decoded_voxel_size, staged_directory, write_volumes
from cryoformer.cli.analyze_cmd import add_run_arguments, open_run
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir
from cryoformer.io.safe_pickle import load_pickle
from cryoformer.options import add_arguments, from_flat, given_values

LATENT_FILES = ".npy ([M, zdim]), cryoDRGN's z.pkl, or whitespace-separated text (one latent per row)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval-vol",
        help="decode volumes at latent coordinates (no images needed)",
        description=(
            "Decode the density at one or more latents z and write DIR/vol_000.mrc, vol_001.mrc, ... "
            "The maps span the training box; decoding at D voxels sets the voxel size to training "
            "pixel size (Å) × training box / D. With --z-start/--z-end, -n maps evenly spaced on the "
            "straight line between them (latents in DIR/z_values.txt)."
        ),
    )
    add_run_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--z", help='one latent as zdim numbers, e.g. "0.1 -0.3 0.7 ..." (spaces or commas)')
    src.add_argument("--zfile", help=f"latents, one per row: {LATENT_FILES}")
    src.add_argument("--z-start", help="first latent of a straight path: zdim numbers or a file with one latent")
    p.add_argument("--z-end", help="last latent of the path (with --z-start): zdim numbers or a file")
    p.add_argument("-n", type=int, default=10, help="maps along --z-start … --z-end (default 10)")
    p.add_argument("-D", "--box", type=int, help="output box in voxels, even (default: the training box)")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="volumes decoded together (default 4)")
    p.add_argument("--prefix", default="vol_", help="file name prefix (default vol_ → vol_000.mrc)")
    add_arguments(p, VolumeOptions, "map post-processing")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    return p


def parse_latent_text(text: str, zdim: int, field: str) -> np.ndarray:
    """``zdim`` numbers separated by spaces or commas → ``[1, zdim]`` float32 (``field`` names the option)."""
    try:
        z = np.array([float(v) for v in re.split(r"[\s,]+", text.strip()) if v], dtype=np.float32)
    except ValueError as exc:
        raise InputError(None, field, f"expected numbers or an existing latent file ({exc})") from exc
    return check_latents(z, zdim, None, field)


def read_latent_file(path: str, zdim: int, field: Optional[str] = None) -> np.ndarray:
    """Latents from ``.npy``, a cryoDRGN ``z.pkl`` or text (``np.loadtxt``) → ``[M, zdim]`` float32.

    A cryoDRGN ``z.pkl`` holds the latent means ``[N, zdim]`` (its log-variances, when present,
    follow as a second pickle, which is not read). Pickles are read with the restricted
    unpickler (:func:`cryoformer.io.safe_pickle.load_pickle`): nothing in them is executed.
    """
    if not os.path.isfile(path):
        raise InputError(path, field, "latent file does not exist")
    try:
        if path.endswith(".npy"):
            z = np.load(path, allow_pickle=False)
        elif path.endswith(".pkl"):
            z = load_pickle(path)
            if isinstance(z, (tuple, list)) and z and isinstance(z[0], np.ndarray):
                z = z[0]  # (z_mu, z_logvar) pickled as one tuple: the means
            if not isinstance(z, np.ndarray):
                raise InputError(path, field, f"expected a pickled [N, {zdim}] array, found {type(z).__name__}")
        else:
            z = np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(path, field, f"not a readable latent file ({exc}); expected {LATENT_FILES}") from exc
    return check_latents(z, zdim, path, field)


def check_latents(z, zdim: int, where, field) -> np.ndarray:
    """``z`` as ``[M, zdim]`` float32 with finite values, or an InputError naming ``where``/``field``."""
    z = np.asarray(z)
    if z.dtype.kind not in "fiu":
        raise InputError(where, field, f"latents must be numbers, got dtype {z.dtype}")
    z = np.atleast_2d(z.astype(np.float32))
    if z.ndim != 2 or z.shape[1] != zdim or z.shape[0] < 1:
        raise InputError(where, field, f"latents must have shape [N, zdim] with zdim = {zdim} (this run), "
                         f"got shape {list(z.shape)}")
    if not np.all(np.isfinite(z)):
        raise InputError(where, field, "latents contain NaN or infinite values")
    return z


def latent_argument(text: str, zdim: int, field: str) -> np.ndarray:
    """One latent ``[zdim]`` from an option's value: a file holding exactly one latent, or numbers."""
    if os.path.isfile(text):
        z = read_latent_file(text, zdim, field)
        if len(z) != 1:
            raise InputError(text, field, f"expected one latent, the file holds {len(z)}")
    else:
        z = parse_latent_text(text, zdim, field)
    return z[0]


def _latents(args, zdim: int) -> np.ndarray:
    if args.z is not None:
        return parse_latent_text(args.z, zdim, "--z")
    if args.zfile is not None:
        return read_latent_file(args.zfile, zdim)
    if args.z_end is None:
        raise InputError(None, "--z-end", "is required with --z-start")
    if args.n < 2:
        raise InputError(None, "-n", f"a path needs at least 2 maps, got {args.n}")
    return straight_path(latent_argument(args.z_start, zdim, "--z-start"),
                         latent_argument(args.z_end, zdim, "--z-end"), args.n).latents


def run(args) -> int:
    if args.box is not None and (args.box < 2 or args.box % 2):
        raise InputError(None, "-D", f"output box must be even and >= 2, got {args.box}")
    if args.batch_size < 1:
        raise InputError(None, "--batch-size", f"must be positive, got {args.batch_size}")
    if args.z_end is not None and args.z_start is None:
        raise InputError(None, "--z-end", "needs --z-start")
    options = from_flat(VolumeOptions, given_values(args, VolumeOptions))
    loaded = open_run(args)
    latent_files = [f for f in (args.zfile, args.z_start, args.z_end) if f and os.path.isfile(f)]
    claim_output_dir(args.outdir, loaded.input_files() + latent_files, args.force, option="-o")
    z = _latents(args, loaded.model.config.zdim)
    D = args.box or loaded.box_size
    # No recorded pixel size: maps in training-pixel units (voxel size 1 at the training box).
    apix = decoded_voxel_size(loaded.box_size, loaded.pixel_size_angstrom or 1.0, D)
    options.check(apix)
    with staged_directory(args.outdir) as stage:
        paths = write_volumes(loaded.model, z, stage, apix, D, pattern=args.prefix + "{:03d}.mrc",
                              batch_size=args.batch_size, progress=True, options=options)
        if args.z_start is not None:
            np.savetxt(os.path.join(stage, "z_values.txt"), z, fmt="%.9g")  # float32 round-trips
    print(f"wrote {len(paths)} volume(s) of {D}³ voxels, {apix:.3f} Å/voxel, to {args.outdir}/ "
          f"({os.path.basename(paths[0])} …)")
    return 0
