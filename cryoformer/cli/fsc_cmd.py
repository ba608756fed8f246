"""``cryoformer fsc``: Fourier shell correlation between two maps."""

from __future__ import annotations

import argparse

from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_file, same_file
from cryoformer.io.mrc import read_volume
from cryoformer.metrics.fsc import FscResult, plot_fsc


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fsc",
        help="FSC between two maps: resolution at 0.5 and 0.143, AU-FSC, curve and plot",
        description=(
            "Fourier shell correlation between A and B (shells one Fourier pixel wide), optionally "
            "inside a mask. Prints the resolution (Å) where the FSC first falls below 0.5 (the "
            "criterion against ground truth) and 0.143 (half-maps), and the area under |FSC| over "
            "0–0.5 cycles/px (AU-FSC). Writes the curve as text and a plot."
        ),
    )
    p.add_argument("map_a", help="first map (.mrc)")
    p.add_argument("map_b", help="second map (.mrc), same box")
    p.add_argument("--mask", help="mask (.mrc), same box, values in [0, 1]")
    p.add_argument("--Apix", type=float, help="pixel size in Å/px (default: from map A's header)")
    p.add_argument("-o", "--out", default="fsc.txt", help="curve as text (default fsc.txt)")
    p.add_argument("--plot", default="fsc.png", help="plot file (default fsc.png; 'none' for no plot)")
    return p


def run(args) -> int:
    inputs = [args.map_a, args.map_b, args.mask]
    claim_output_file(args.out, inputs, args.force, option="-o")
    want_plot = bool(args.plot) and args.plot.lower() != "none"
    if want_plot:
        if same_file(args.plot, args.out):
            raise InputError(args.plot, "--plot", "is the same file as -o; give them different names")
        claim_output_file(args.plot, inputs, args.force, option="--plot")
    vol_a, apix_a = read_volume(args.map_a)
    vol_b, _ = read_volume(args.map_b)
    if vol_a.shape != vol_b.shape:
        raise InputError(args.map_b, "shape", f"map is {vol_b.shape} but {args.map_a} is {vol_a.shape}")
    mask = None
    if args.mask:
        mask, _ = read_volume(args.mask)
        if mask.shape != vol_a.shape:
            raise InputError(args.mask, "shape", f"mask is {mask.shape} but the maps are {vol_a.shape}")
        if mask.min() < -1e-6 or mask.max() > 1 + 1e-6:
            raise InputError(args.mask, "values", f"mask values must lie in [0, 1], found [{mask.min():.3g}, {mask.max():.3g}]")
    apix = args.Apix or apix_a
    if not apix or apix <= 0:
        raise InputError(args.map_a, "voxel size", "header has no voxel size; pass --Apix")
    result = FscResult.compute(vol_a, vol_b, apix, mask=mask, label=f"{args.map_a} vs {args.map_b}")
    result.to_text(args.out)
    print(f"FSC=0.5:   {result.resolution(0.5):.2f} Å")
    print(f"FSC=0.143: {result.resolution(0.143):.2f} Å")
    print(f"AU-FSC:    {result.au_fsc:.4f}")
    print(f"curve: {args.out}  (columns: frequency in cycles/px, FSC)")
    if want_plot:
        plot_fsc(result, args.plot)
        print(f"plot:  {args.plot}")
    return 0
