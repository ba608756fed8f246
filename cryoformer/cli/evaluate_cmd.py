"""``cryoformer evaluate``: metrics of a trained run against ground truth (docs/conventions.md, "Metrics")."""

from __future__ import annotations

import argparse
import json
import os

from cryoformer.analysis.evaluate import EvaluateConfig, evaluate_run, format_table
from cryoformer.cli.analyze_cmd import add_run_arguments, open_run
from cryoformer.errors import InputError
from cryoformer.io.atomic import atomic_open
from cryoformer.io.guard import claim_output_file


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="accuracy against ground truth: per-state FSC resolution (Å), AU-FSC, pose errors, "
             "flexible-region ROC-AUC",
        description=(
            "For each ground-truth state, decode at the mean latent of its particles and compute the "
            "FSC against that state's map (maps larger than the training box are Fourier-cropped; "
            "the voxel size in Å follows), reporting the FSC=0.5 resolution (Å) and AU-FSC (area "
            "under |FSC| over 0–0.5 cycles/px; perfect = 0.5) per state and their means. With "
            "--gt-poses and refined poses in RUN/poses/: rotation (rad, deg) and shift (px of the "
            "training box) errors. With --gt-motion: the ROC-AUC of the attention-derived "
            "flexible-region scores at predicting voxels moving more than --motion-threshold Å, "
            "inside the molecule, beside the baselines distance-from-centre and decoded-voxel "
            "variance. Prints a table; writes JSON and a per-state FSC plot."
        ),
    )
    add_run_arguments(p)
    p.add_argument("--gt-maps", required=True, nargs="+", metavar="MAP",
                   help="ground-truth state maps (.mrc): a quoted glob such as 'gt/state_*.mrc' (sorted) "
                        "or the files in state order; the k-th map is state k")
    p.add_argument("--gt-labels", required=True,
                   help="state of every particle of the original stack (.npy or .pkl, integers)")
    p.add_argument("--gt-motion", help="per-voxel ground-truth displacement map (.mrc, Å)")
    p.add_argument("--gt-poses", help="true poses of the original stack (.pkl, .star or .cs; default: the "
                                      "--gt-poses given to `cryoformer train`)")
    p.add_argument("-D", "--box", type=int, help="evaluation box in voxels (default: min(ground-truth box, "
                                                 "training box))")
    p.add_argument("--motion-threshold", type=float,
                   help="a voxel moves if its displacement exceeds this, in Å (default: one evaluation voxel)")
    p.add_argument("--support-fraction", type=float, default=0.05,
                   help="molecule support: voxels above this fraction of a ground-truth map's maximum "
                        "(default 0.05)")
    p.add_argument("--mask-radius", type=float,
                   help="soft spherical FSC mask radius in evaluation voxels (px) (default: no mask)")
    p.add_argument("--seed", type=int, default=0, help="seed of latent subsampling (default 0)")
    p.add_argument("-o", "--out", help="metrics JSON (default RUN/evaluation[.E]/metrics.json); the FSC "
                                       "plot is written beside it as fsc_per_state.png")
    return p


def run(args) -> int:
    if args.motion_threshold is not None and args.motion_threshold < 0:
        raise InputError(None, "--motion-threshold", f"must be >= 0 Å, got {args.motion_threshold}")
    if not 0 < args.support_fraction < 1:
        raise InputError(None, "--support-fraction", f"must be in (0, 1), got {args.support_fraction}")
    if args.gt_motion is None and (args.motion_threshold is not None):
        raise InputError(None, "--motion-threshold", "needs --gt-motion")
    loaded = open_run(args)
    tag = loaded.epoch if args.epoch == "last" else args.epoch
    default_dir = os.path.join(args.run_dir, "evaluation" if tag in (None, "best") else f"evaluation.{tag}")
    out = args.out or os.path.join(default_dir, "metrics.json")
    plot = os.path.join(os.path.dirname(os.path.abspath(out)), "fsc_per_state.png")
    gt_inputs = list(args.gt_maps) + [args.gt_labels, args.gt_motion, args.gt_poses]
    for path, option in ((out, "-o"), (plot, "-o (FSC plot beside it)")):
        claim_output_file(path, loaded.input_files() + gt_inputs, args.force, option=option)
    config = EvaluateConfig(motion_threshold_angstrom=args.motion_threshold,
                            support_fraction=args.support_fraction, mask_radius_px=args.mask_radius,
                            fsc_plot=plot, seed=args.seed)
    # The true poses given to `train --gt-poses` are the default.
    gt_poses = args.gt_poses or loaded.paths.get("gt_poses")
    result = evaluate_run(loaded, args.gt_maps, args.gt_labels, args.gt_motion, gt_poses, config,
                          box_size=args.box)
    with atomic_open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(format_table(result))
    print(f"metrics: {out}")
    print(f"FSC plot: {plot}")
    return 0
