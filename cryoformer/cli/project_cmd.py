"""``cryoformer project``: project a volume at poses from a cryoDRGN, RELION or cryoSPARC file."""

from __future__ import annotations

import argparse
import math

import numpy as np

from cryoformer.errors import InputError
from cryoformer.io.dispatch import load_ctf, load_poses
from cryoformer.io.guard import claim_output_file
from cryoformer.io.mrc import read_volume
from cryoformer.io.pairing import match_metadata_rows
from cryoformer.io.validate import PHYSICAL_BOX_RTOL, PLACEHOLDER_PIXEL_SIZE, check_one_pixel_size
from cryoformer.simulation.simulate import render_particle_stack


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "project",
        help="project a volume at poses (+ CTF, + noise) into a particle stack",
        description=(
            "Real-space projection of VOLUME at the poses in --poses (cryoDRGN .pkl, RELION "
            ".star or cryoSPARC .cs), optionally modulated by a CTF (--ctf: cryoDRGN .pkl or the "
            "same .star/.cs) and with white noise at --snr. Shifts move the image by −s (docs/conventions.md)."
        ),
    )
    p.add_argument("volume", help="input volume (.mrc), cubic, even box")
    p.add_argument("--poses", required=True, help="poses: .pkl (cryoDRGN), .star (RELION) or .cs (cryoSPARC)")
    p.add_argument("--ctf", help="CTF parameters: .pkl (cryoDRGN), .star or .cs")
    p.add_argument("--snr", type=float, default=math.inf,
                   help="signal-to-noise ratio of the output (default: inf = noise-free)")
    p.add_argument("--Apix", type=float,
                   help="pixel size in Å/px for shifts in Å and the output header (default: from the files)")
    p.add_argument("--contrast", choices=("relion", "cryodrgn"), default="relion",
                   help="with --ctf: relion writes −(projection⊛CTF) (as relion_project --ctf), "
                        "cryodrgn writes projection⊛CTF (default relion)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--chunk-size", type=int, default=256, help="images per step (default 256)")
    p.add_argument("-o", "--out", required=True, help="output stack (.mrcs)")
    return p


def run(args) -> int:
    claim_output_file(args.out, [args.volume, args.poses, args.ctf], args.force, option="-o")
    if args.chunk_size < 1:
        raise InputError(None, "--chunk-size", f"must be a positive number of images, got {args.chunk_size}")
    volume, voxel_size = read_volume(args.volume, require_cubic=True)
    D = volume.shape[0]
    if D % 2:
        raise InputError(args.volume, "shape", f"box size {D} is odd; an even box is required")
    apix = args.Apix if args.Apix else voxel_size
    poses = load_poses(args.poses, box_size=D, pixel_size_angstrom=args.Apix)
    ctf = None
    if args.ctf:
        ctf = load_ctf(args.ctf, box_size=D, pixel_size_angstrom=args.Apix)
        # CTF row k must be the particle of pose row k: paired by image name when both carry one.
        ctf = match_metadata_rows(args.poses, args.ctf, len(poses), len(ctf)).apply(ctf)
        check_one_pixel_size(ctf, args.ctf)
        if ctf.box_size != D:
            raise InputError(args.ctf, "box size", f"CTF parameters are for D={ctf.box_size}, the volume is D={D}")
        ctf_apix = float(ctf.pixel_size_angstrom)
        # A header of 0 or exactly 1 Å records no voxel size (1 is a common placeholder).
        known = bool(args.Apix) or voxel_size not in (0.0, PLACEHOLDER_PIXEL_SIZE)
        if known and abs(ctf_apix - apix) > PHYSICAL_BOX_RTOL * apix:
            raise InputError(args.ctf, "pixel size", f"CTF parameters are for {ctf_apix:g} Å/px but the "
                             f"volume's voxels are {apix:g} Å; resample the map or pass --Apix")
    snr = None if math.isinf(args.snr) else args.snr
    if snr is not None and snr <= 0:
        raise InputError(None, "--snr", f"must be > 0, got {snr}")
    states = np.zeros(len(poses), dtype=np.int64)
    _, measured = render_particle_stack(args.out, volume[None], apix, states, poses, ctf, snr,
                                        args.contrast, args.seed, args.chunk_size)
    note = "noise-free" if measured is None else f"measured SNR {measured:.4g}"
    print(f"wrote {len(poses)} projections (D={D}, {apix:g} Å/px, {note}) to {args.out}")
    return 0
