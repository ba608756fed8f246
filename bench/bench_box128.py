"""Training at the full box D = 128 on a CPU, end to end (docs/benchmarks.md).

It simulates ``-n`` particles of the hinged molecule at box ``-D`` (1.5 Å/px at 128, SNR 0.1,
CTF, shifts), trains ``cryoformer train`` at that box (no ``--box``: every voxel of the D³
grid) for ``--epochs`` epochs, then runs ``cryoformer analyze`` and ``cryoformer evaluate``
against the simulation's ground truth. Each command runs under ``/usr/bin/time -v`` for the
whole process's peak resident memory. It reports:

* training: steps, images/s per epoch (from ``RUN/log.csv``; the first epoch runs on the whole
  sphere, later ones inside the support mask, whose share of the box the run log gives), peak
  memory, wall time;
* analyze and evaluate: wall time and peak memory;
* what the run learned: evaluate's mean per-state FSC-0.5 (Å) and difference-map correlation,
  each beside the consensus of the true maps (a map score is only worth what a map without any
  heterogeneity gets beside it).

    python bench/bench_box128.py -o /scratch/box128 -D 128 -n 1024 --epochs 4

Writes ``results.json`` in the output directory and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from machine import CFORMER  # noqa: E402
from timed_runs import simulate_hinged, timed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", required=True)
    ap.add_argument("-D", "--box", type=int, default=128, help="box of the simulation and of training (px)")
    ap.add_argument("-n", "--n-particles", type=int, default=1024, help="particles simulated")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs")
    ap.add_argument("--eval-box", type=int, default=64,
                    help="box evaluate decodes at (px; the flexible-region scores decode dozens of maps)")
    return ap.parse_args(argv)


def train(data: str, run: str, epochs: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    r = timed([CFORMER, "train", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
               "--ctf", os.path.join(data, "ctf.pkl"), "-o", run, "--epochs", str(epochs), "--seed", "0"])
    log = pd.read_csv(os.path.join(run, "log.csv"))
    ep = log[(log.kind == "epoch") & (log.phase == "train")]
    steps = log[(log.kind == "step") & (log.phase == "train")]
    text = open(os.path.join(run, "run.log")).read()
    cover = [float(c) for c in re.findall(r"support mask[^\n]*?([\d.]+) ?% of the", text)]
    r.update(epochs=[{"epoch": int(e.epoch), "images": int(e.images), "images_per_s": float(e.images_per_s)}
                     for e in ep.itertuples()],
             steps=int(steps.step.max()) if len(steps) else 0, support_cover_percent=cover)
    r.pop("stdout")
    return r


def analyze(run: str) -> dict:
    r = timed([CFORMER, "analyze", run, "--force"])
    r.pop("stdout")
    return r


def evaluate(run: str, data: str, out: str, box: int) -> dict:
    gt = os.path.join(data, "gt")
    maps = sorted(os.path.join(gt, f) for f in os.listdir(gt) if re.fullmatch(r"state_\d+\.mrc", f))
    r = timed([CFORMER, "evaluate", run, "--gt-maps", *maps, "--gt-labels", os.path.join(gt, "state.npy"),
               "--gt-motion", os.path.join(gt, "motion.mrc"), "-D", str(box), "-o", out, "--force"])
    r["report"] = json.load(open(out))
    r.pop("stdout")
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    data = simulate_hinged(os.path.join(args.outdir, "data"), args.box, args.n_particles)
    run = os.path.join(args.outdir, "run")
    result = {"machine": machine.describe(), "args": vars(args)}
    result["train"] = train(data, run, args.epochs)
    print("train", json.dumps(result["train"]), flush=True)
    result["analyze"] = analyze(run)
    print("analyze", json.dumps(result["analyze"]), flush=True)
    result["evaluate"] = evaluate(run, data, os.path.join(args.outdir, "evaluate.json"),
                                  args.eval_box)
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    info, t = result["machine"], result["train"]
    print(f"\n{info['cpu']}, {info['cores']} cores; D = {args.box}, {args.n_particles} particles, "
          f"{args.epochs} epochs ({t['steps']} steps)\n")
    print("| stage | wall (s) | peak resident memory (GB) | images/s per epoch |")
    print("|---|---|---|---|")
    rates = ", ".join(f"{e['images_per_s']:.2f}" for e in t["epochs"])
    print(f"| train | {t['wall_s']:.0f} | {t['peak_rss_gb']:.2f} | {rates} |")
    for stage in ("analyze", "evaluate"):
        print(f"| {stage} | {result[stage]['wall_s']:.0f} | {result[stage]['peak_rss_gb']:.2f} | |")
    rep = result["evaluate"]["report"]
    het = rep.get("heterogeneity", {})
    key = "mean_resolution_fsc0.5_angstrom"
    print(f"\nevaluate at {args.eval_box}³: mean FSC-0.5 {rep['fsc'][key]} Å "
          f"(consensus {rep['fsc_consensus_baseline'][key]}); difference-map "
          f"correlation {het.get('difference_map_correlation')} (consensus {het.get('consensus_baseline')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
