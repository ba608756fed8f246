"""Cost of one pose search against back-projected references, and what the band cut changes.

The search (:mod:`cryoformer.refinement.search`) scores each candidate pose on the Fourier
coefficients up to a band. Back-projected references are Wiener-filtered: beyond their
resolution they hold almost nothing, and those coefficients cost as much to interpolate as any
other. ``information_fraction`` cuts the band where the references hold that fraction of what a
slice says about the pose. This script times one search over ``-n`` particles with the whole
band (``--fractions 1``) and with the cut, against references back-projected (one group, gold-
standard halves) from

* the perturbed input poses (the first search of a run: blurred references), and
* the true poses (sharp references: what later searches approach),

each band fraction with each grid refinement factor (``--refine-factors``: 3, the grids a third
as fine per level as before; 2, halved per level, the default now), and reports ms per
particle, the band scored, the median rotation error against the truth and how far each
search's poses are from the first row's (the whole band, factor 3).

    python bench/bench_pose_search.py --data bench_out/pose_sd/data -n 200 --sigma-rad 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from cryoformer.io.cryodrgn import read_poses_pkl, write_poses_pkl
from cryoformer.metrics.pose_error import rotation_errors
from cryoformer.physics.slice_projector import FourierSliceProjector
from cryoformer.refinement import PoseSearchConfig, search_with_references
from cryoformer.refinement.grids import information_band
from cryoformer.refinement.references import make_references
from cryoformer.simulation.perturb import perturb_poses

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from bench_pose_refinement import load_particles  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a simulated data set (simulation.json, gt/poses.pkl)")
    ap.add_argument("-n", "--n-particles", type=int, default=200, help="particles searched (timed)")
    ap.add_argument("--n-reference", type=int, default=2000, help="particles back-projected into the references")
    ap.add_argument("--sigma-rad", type=float, default=0.1, help="rotation-vector noise of the input poses")
    ap.add_argument("--radius-deg", type=float, default=20.0)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.999])
    ap.add_argument("--refine-factors", type=int, nargs="+", default=[3, 2],
                    help="grid refinement factors tried with each fraction (3: the grids before, 2: now)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", help="write the results here as JSON")
    return ap.parse_args(argv)


def one_search(vols, labels, searched, config):
    """Search the particles of ``searched`` (the first of the reference set) → (seconds, rotations [n, 3, 3])."""
    n = len(searched)
    t0 = time.perf_counter()
    res = search_with_references(vols, labels[:n], searched.search_particles(), searched.poses.rotations,
                                 searched.poses.shifts_px, config, progress=False)
    return time.perf_counter() - t0, res.rotations


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.data, "simulation.json")) as handle:
        box = int(json.load(handle)["box_size"])
    gt = read_poses_pkl(os.path.join(args.data, "gt", "poses.pkl"), box_size=box)
    # the perturbed input poses go to a scratch directory: nothing is written beside the data
    scratch = tempfile.mkdtemp(prefix="bench_pose_search_")
    noisy_path = os.path.join(scratch, "perturbed_poses.pkl")
    write_poses_pkl(perturb_poses(gt, args.sigma_rad, 2.0, seed=args.seed + 1), noisy_path)
    _, data = load_particles(args.data, noisy_path, args.n_reference)
    truth = data.gt_poses.rotations
    n = min(args.n_particles, len(data))
    _, searched = load_particles(args.data, noisy_path, n)
    rows = []
    print(f"{machine.describe()['cpu']}, {args.threads} threads; {n} particles searched, references from "
          f"{len(data)}, D = {box}, σ = {args.sigma_rad:g} rad, radius {args.radius_deg:g}°\n")
    print("| references from | band fraction | refine factor | band (cycles/px) | ms / particle | "
          "median error (rad) | median distance to the first row's poses |\n|---|---|---|---|---|---|---|")
    for name, poses in (("input poses", data.poses), ("true poses", data.gt_poses)):
        base = PoseSearchConfig.from_degrees(args.radius_deg, n_references=1)
        vols, labels = make_references(base, data.search_particles(), poses.rotations, poses.shifts_px,
                                       np.zeros((len(data), 1), np.float32))
        shells = FourierSliceProjector(vols).shell_power()
        first = None
        for frac in args.fractions:
            for factor in args.refine_factors:
                cfg = PoseSearchConfig.from_degrees(args.radius_deg, n_references=1, information_fraction=frac,
                                                    refine_factor=factor)
                seconds, rot = one_search(vols, labels, searched, cfg)
                first = rot if first is None else first
                row = {"references": name, "fraction": frac, "refine_factor": factor,
                       "band": information_band(*shells, frac, 0.5), "ms_per_particle": 1e3 * seconds / n,
                       "median_error_rad": float(np.median(rotation_errors(rot, truth[:n]))),
                       "input_error_rad": float(np.median(rotation_errors(data.poses.rotations[:n], truth[:n]))),
                       "median_to_first_rad": float(np.median(rotation_errors(rot, first)))}
                rows.append(row)
                print(f"| {name} | {frac:g} | {factor} | {row['band']:.3f} | {row['ms_per_particle']:.1f} | "
                      f"{row['median_error_rad']:.4f} (input {row['input_error_rad']:.4f}) | "
                      f"{row['median_to_first_rad']:.4f} |", flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"machine": machine.describe(), "args": vars(args), "rows": rows}, handle, indent=1)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
