"""``cryoformer parse-ctf``: RELION ``.star`` / cryoSPARC ``.cs`` CTF → cryoDRGN CTF ``.pkl``."""

from __future__ import annotations

import argparse

from cryoformer.io.cryodrgn import write_ctf_pkl
from cryoformer.io.dispatch import load_ctf
from cryoformer.io.guard import claim_output_file
from cryoformer.io.validate import describe_pixel_groups


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "parse-ctf",
        help="convert CTF parameters from a RELION .star or cryoSPARC .cs to a cryoDRGN CTF .pkl",
        description=(
            "Write a cryoDRGN-format CTF pickle (N×9: box size, pixel size Å, defocus U Å, defocus V Å, "
            "astigmatism angle deg, voltage kV, Cs mm, amplitude contrast, phase shift deg). "
            "Options override the file's values for every particle, as in cryoDRGN's parse_ctf_star."
        ),
    )
    p.add_argument("input", help="RELION .star or cryoSPARC .cs")
    p.add_argument("-D", type=int, dest="box", help="box size in pixels (default: from the file)")
    p.add_argument("--Apix", type=float, help="pixel size in Å/px (default: from the file)")
    p.add_argument("--kv", type=float, help="override the accelerating voltage (kV)")
    p.add_argument("--cs", type=float, help="override the spherical aberration (mm)")
    p.add_argument("-w", type=float, help="override the amplitude contrast ratio")
    p.add_argument("--ps", type=float, help="override the phase shift (degrees)")
    p.add_argument("-o", "--out", required=True, help="output CTF .pkl")
    return p


def run(args) -> int:
    claim_output_file(args.out, [args.input], args.force, option="-o")
    ctf = load_ctf(
        args.input, box_size=args.box, pixel_size_angstrom=args.Apix, voltage_kv=args.kv,
        spherical_aberration_mm=args.cs, amplitude_contrast=args.w, phase_shift_deg=args.ps,
    )
    write_ctf_pkl(ctf, args.out)
    print(f"wrote CTF parameters of {len(ctf)} particles ({describe_pixel_groups(ctf)}) to {args.out}")
    return 0
