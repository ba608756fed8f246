"""``cryoformer eval-vol``: decode volumes at given latents."""

from __future__ import annotations

import argparse
import os
import re

import numpy as np

from cryoformer.analysis.volumes import decoded_voxel_size, staged_directory, write_volumes
from cryoformer.cli.analyze_cmd import add_run_arguments, open_run
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval-vol",
        help="decode volumes at latent coordinates (no images needed)",
        description=(
            "Decode the density at one or more latents z and write DIR/vol_000.mrc, vol_001.mrc, ... "
            "The maps span the training box; decoding at D voxels sets the voxel size to training "
            "pixel size (Å) × training box / D."
        ),
    )
    add_run_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--z", help='one latent as zdim numbers, e.g. "0.1 -0.3 0.7 ..." (spaces or commas)')
    src.add_argument("--zfile", help="latents, one per row: .npy ([M, zdim] or [zdim]) or text (.txt)")
    p.add_argument("-D", "--box", type=int, help="output box in voxels, even (default: the training box)")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="volumes decoded together (default 4)")
    p.add_argument("--prefix", default="vol_", help="file name prefix (default vol_ → vol_000.mrc)")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    return p


def _latents(args, zdim: int):
    if args.z is not None:
        try:
            z = np.array([float(v) for v in re.split(r"[\s,]+", args.z.strip()) if v], dtype=np.float32)
        except ValueError as exc:
            raise InputError(None, "--z", f"expected numbers ({exc})") from exc
        where, field = None, "--z"
    else:
        where, field = args.zfile, None
        if not os.path.isfile(args.zfile):
            raise InputError(args.zfile, None, "latent file does not exist")
        try:
            z = np.load(args.zfile, allow_pickle=False) if args.zfile.endswith(".npy") else np.loadtxt(args.zfile)
        except (ValueError, OSError) as exc:
            raise InputError(args.zfile, None, f"not a readable latent file ({exc})") from exc
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    if z.ndim != 2 or z.shape[1] != zdim or z.shape[0] < 1:
        raise InputError(where, field, f"latents must have zdim = {zdim} values each, got shape {list(z.shape)}")
    if not np.all(np.isfinite(z)):
        raise InputError(where, field, "latents contain NaN or infinite values")
    return z


def run(args) -> int:
    if args.box is not None and (args.box < 2 or args.box % 2):
        raise InputError(None, "-D", f"output box must be even and >= 2, got {args.box}")
    if args.batch_size < 1:
        raise InputError(None, "--batch-size", f"must be positive, got {args.batch_size}")
    loaded = open_run(args)
    claim_output_dir(args.outdir, loaded.input_files() + [args.zfile], args.force, option="-o")
    z = _latents(args, loaded.model.config.zdim)
    D = args.box or loaded.box_size
    # No recorded pixel size: maps in training-pixel units (voxel size 1 at the training box).
    apix = decoded_voxel_size(loaded.box_size, loaded.pixel_size_angstrom or 1.0, D)
    with staged_directory(args.outdir) as stage:
        paths = write_volumes(loaded.model, z, stage, apix, D, pattern=args.prefix + "{:03d}.mrc",
                              batch_size=args.batch_size, progress=True)
    print(f"wrote {len(paths)} volume(s) of {D}³ voxels, {apix:.3f} Å/voxel, to {args.outdir}/ "
          f"({os.path.basename(paths[0])} …)")
    return 0
