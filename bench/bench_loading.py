"""Does reading particles stall the training step? (docs/benchmarks.md)

For each box ``-D`` (a simulated stack of the hinged molecule, read through the memory map the
trainer uses), this script measures

* the time to read and prepare one training batch (``ParticleData.batch``: the images copied out
  of the map, Fourier-cropped to ``--train-box`` when it is smaller, poses and CTF), alone;
* the images/s of ``cryoformer train`` for one epoch with ``--num-workers 0`` (reading inside the
  step) and ``--num-workers 2`` (DataLoader workers reading ahead),

and reports the read time as a fraction of the step time without workers. A small fraction
means workers cannot win much; on 2 CPU cores they also take cores from the step.

    python bench/bench_loading.py -o /scratch/loading -D 64 128 --train-box 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from cryoformer.trainer import TrainConfig
from cryoformer.trainer.data import load_particle_data

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from machine import CFORMER  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", required=True)
    ap.add_argument("-D", "--boxes", type=int, nargs="+", default=[64, 128], help="simulated boxes (px)")
    ap.add_argument("--train-box", type=int, default=64, help="--box of training (cropped on the fly)")
    ap.add_argument("-n", "--n-particles", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="the trainer's default batch")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    return ap.parse_args(argv)


def simulate(out: str, box: int, n: int) -> str:
    data = os.path.join(out, f"data_D{box}")
    if not os.path.isfile(os.path.join(data, "simulation.json")):
        subprocess.run([CFORMER, "simulate", "-o", data, "-n", str(n), "-D", str(box), "--Apix",
                        f"{3.0 * 64 / box:g}", "--snr", "0.1", "--seed", "0"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return data


def read_seconds_per_batch(data_dir: str, train_box: int, batch: int, repeats: int = 3) -> float:
    """Median seconds of ``ParticleData.batch`` for random batches (cold pages released each time)."""
    cfg = TrainConfig.from_flat(particles=os.path.join(data_dir, "particles.mrcs"),
                                poses=os.path.join(data_dir, "poses.pkl"), ctf=os.path.join(data_dir, "ctf.pkl"),
                                outdir=os.path.join(data_dir, "_unused"), box_size=train_box, device="cpu")
    data = load_particle_data(cfg)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        for positions in np.array_split(rng.permutation(len(data)), max(1, len(data) // batch)):
            t0 = time.perf_counter()
            data.batch(np.sort(positions))
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_rate(data_dir: str, out: str, train_box: int, workers: int) -> float:
    """images/s of one training epoch (log.csv's epoch row)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([CFORMER, "train", os.path.join(data_dir, "particles.mrcs"), "--poses",
                    os.path.join(data_dir, "poses.pkl"), "--ctf", os.path.join(data_dir, "ctf.pkl"), "-o", out,
                    "--box", str(train_box), "-n", "1", "--num-workers", str(workers), "--seed", "0",
                    "--no-support-mask", "--heldout-fraction", "0"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = pd.read_csv(os.path.join(out, "log.csv"))
    return float(log[log.kind == "epoch"].images_per_s.iloc[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    rows = []
    for box in args.boxes:
        data = simulate(args.outdir, box, args.n_particles)
        read_s = read_seconds_per_batch(data, min(args.train_box, box), args.batch_size)
        rates = {w: train_rate(data, os.path.join(args.outdir, f"run_D{box}_w{w}"), min(args.train_box, box), w)
                 for w in args.workers}
        step_s = args.batch_size / rates[args.workers[0]]
        row = {"box": box, "train_box": min(args.train_box, box), "read_ms_per_batch": 1e3 * read_s,
               "step_ms_no_workers": 1e3 * step_s, "read_fraction": read_s / step_s,
               "images_per_s": {str(w): r for w, r in rates.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = machine.describe()
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, handle, indent=1)
    print(f"\n{info['cpu']}, {info['cores']} cores, batch {args.batch_size}\n")
    heads = " | ".join(f"images/s, {w} workers" for w in args.workers)
    print(f"| stack box | trained at | read + crop per batch (ms) | step without workers (ms) | read share | {heads} |")
    print("|---|---|---|---|---|" + "---|" * len(args.workers))
    for r in rows:
        rates = " | ".join(f"{r['images_per_s'][str(w)]:.1f}" for w in args.workers)
        print(f"| {r['box']} | {r['train_box']} | {r['read_ms_per_batch']:.1f} | {r['step_ms_no_workers']:.0f} | "
              f"{100 * r['read_fraction']:.1f} % | {rates} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
