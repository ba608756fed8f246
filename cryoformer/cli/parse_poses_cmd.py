"""``cryoformer parse-poses``: RELION ``.star`` / cryoSPARC ``.cs`` poses → cryoDRGN pose ``.pkl``."""

from __future__ import annotations

import argparse

from cryoformer.errors import InputError
from cryoformer.io.cryodrgn import write_poses_pkl
from cryoformer.io.dispatch import load_poses
from cryoformer.io.guard import claim_output_file
from cryoformer.metadata import Poses


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "parse-poses",
        help="convert poses from a RELION .star or cryoSPARC .cs to a cryoDRGN pose .pkl",
        description=(
            "Write a cryoDRGN-format pose pickle (rotation matrices [N,3,3], translations [N,2] as "
            "fractions of the box) from a RELION 3.0/3.1/5 .star or a cryoSPARC .cs file, with the "
            "same meaning cryoDRGN's parse_pose_star / parse_pose_csparc give them. A cryoSPARC "
            "ab-initio or heterogeneous refinement .cs holds poses per class: choose one with "
            "--cs-class."
        ),
    )
    p.add_argument("input", help="RELION .star or cryoSPARC .cs")
    p.add_argument("-D", type=int, dest="box",
                   help="box size in pixels of the images the poses refer to (default: from the file); "
                        "shifts are rescaled when it differs from the file's box (downsampled images)")
    p.add_argument("--Apix", type=float,
                   help="pixel size in Å/px of the images the poses refer to (default: from the file): "
                        "origins in Å are divided by it, origins in px rescaled from the file's pixel size")
    p.add_argument("--cs-class", type=int, metavar="K",
                   help="cryoSPARC .cs only: read the poses of class K (alignments_class_K/pose), for "
                        "ab-initio / heterogeneous refinement outputs")
    p.add_argument("-o", "--out", required=True, help="output pose .pkl")
    return p


def run(args) -> int:
    claim_output_file(args.out, [args.input], args.force, option="-o")
    poses = load_poses(args.input, box_size=args.box, pixel_size_angstrom=args.Apix, cs_class=args.cs_class)
    if args.box:
        poses = Poses(poses.rotations, poses.shifts_px, args.box)
    if poses.box_size is None:
        raise InputError(args.input, "box size", "not found in the file; pass -D BOX")
    write_poses_pkl(poses, args.out)
    print(f"wrote {len(poses)} poses (D={poses.box_size}) to {args.out}")
    return 0
