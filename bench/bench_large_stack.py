"""Training from a particle stack larger than the machine's memory (docs/benchmarks.md).

Particle stacks are read through a read-only memory map, so a stack need not fit in memory.
This script checks that on a stack bigger than RAM. It simulates ``--n-small`` particles of the
hinged molecule at box ``-D``, then tiles them into one ``.mrcs`` of about ``--tile-gb`` GB, with
the poses and CTF tiled to match. It trains ``cryoformer train`` on the small stack and on the
big one with the same options and the same time budget, and reports for each:

* the peak resident memory of the whole process (``/usr/bin/time -v``);
* training images/s, from the epoch rows of ``RUN/log.csv``, the partial epoch a time stop ends
  included;
* the wall time, and the passes over all particles that the run log times (latents,
  held-out, support mask).

    python bench/bench_large_stack.py -o /scratch/big -D 128 --tile-gb 30 --train-box 64 --minutes 4

The tiled stack is written to ``OUT/big/`` and kept (``--keep``) or deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import mrcfile
import numpy as np
import pandas as pd

from cryoformer.io.cryodrgn import read_ctf_pkl, read_poses_pkl, write_ctf_pkl, write_poses_pkl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from machine import CFORMER  # noqa: E402
from timed_runs import simulate_hinged, timed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", required=True)
    ap.add_argument("-D", "--box", type=int, default=128, help="simulated box (px)")
    ap.add_argument("--n-small", type=int, default=512, help="particles simulated (then tiled)")
    ap.add_argument("--tile-gb", type=float, default=30.0, help="size of the tiled stack (GB, 1e9 bytes)")
    ap.add_argument("--train-box", type=int, default=64, help="--box of the training runs")
    ap.add_argument("--minutes", type=float, default=4.0, help="--max-minutes of each training run")
    ap.add_argument("--keep", action="store_true", help="keep the tiled stack")
    return ap.parse_args(argv)


def tile(small: str, out: str, box: int, n_big: int) -> str:
    """``n_big`` particles: the small stack repeated, written chunk by chunk into a memory map."""
    big = os.path.join(out, "big")
    os.makedirs(big, exist_ok=True)
    stack = os.path.join(big, "particles.mrcs")
    with mrcfile.open(os.path.join(small, "particles.mrcs"), permissive=False) as mrc:
        src = np.asarray(mrc.data, dtype=np.float32)  # [n, D, D]
        voxel = mrc.voxel_size.copy()
    n = len(src)
    if not (os.path.isfile(stack) and os.path.getsize(stack) >= n_big * box * box * 4):
        t0 = time.time()
        with mrcfile.new_mmap(stack, shape=(n_big, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.voxel_size = voxel
            for start in range(0, n_big, n):
                stop = min(start + n, n_big)
                mrc.data[start:stop] = src[:stop - start]
            mrc.set_image_stack()
        print(f"wrote {n_big} particles, {os.path.getsize(stack) / 1e9:.1f} GB in {time.time() - t0:.0f} s",
              flush=True)
    reps = np.arange(n_big) % n
    poses = read_poses_pkl(os.path.join(small, "poses.pkl"), box_size=box)
    write_poses_pkl(poses.subset(reps), os.path.join(big, "poses.pkl"))
    ctf = read_ctf_pkl(os.path.join(small, "ctf.pkl"))
    write_ctf_pkl(ctf.subset(reps), os.path.join(big, "ctf.pkl"))
    return big


def train(data: str, run: str, train_box: int, minutes: float) -> dict:
    """One timed training run under ``/usr/bin/time -v`` → its measurements."""
    shutil.rmtree(run, ignore_errors=True)
    r = timed([CFORMER, "train", os.path.join(data, "particles.mrcs"),
               "--poses", os.path.join(data, "poses.pkl"), "--ctf", os.path.join(data, "ctf.pkl"), "-o", run,
               "--box", str(train_box), "--max-minutes", str(minutes), "--seed", "0"])
    log = pd.read_csv(os.path.join(run, "log.csv"))
    epochs = log[(log.kind == "epoch") & (log.phase == "train")]
    images = float(epochs.images.sum())
    rate = float((epochs.images * 1.0).sum() / (epochs.images / epochs.images_per_s).sum())
    passes = re.findall(r"pass (\S+(?: \S+)?) \(epoch \d+\): .*? in ([\d.]+) s",
                        open(os.path.join(run, "run.log")).read())
    return {"peak_rss_gb": r["peak_rss_gb"], "images_per_s": rate, "images_trained": images, "wall_s": r["wall_s"],
            "passes_s": [(name, float(sec)) for name, sec in passes]}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    small = simulate_hinged(os.path.join(args.outdir, "small"), args.box, args.n_small)
    n_big = int(math.ceil(args.tile_gb * 1e9 / (args.box * args.box * 4)))
    big = tile(small, args.outdir, args.box, n_big)
    rows = {}
    for name, data in (("small", small), ("big", big)):
        rows[name] = train(data, os.path.join(args.outdir, f"run_{name}"), args.train_box, args.minutes)
        rows[name]["particles"] = n_big if name == "big" else args.n_small
        rows[name]["stack_gb"] = os.path.getsize(os.path.join(data, "particles.mrcs")) / 1e9
        print(name, json.dumps(rows[name]), flush=True)
    info = machine.describe()
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, handle, indent=1)
    print(f"\n{info['cpu']}, {info['cores']} cores, D = {args.box} read, trained at {args.train_box}, "
          f"{args.minutes:g} min each\n")
    print("| stack | particles | GB on disk | peak RSS (GB) | images/s | wall (s) | passes over all particles (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        passes = ", ".join(f"{n} {s:.1f}" for n, s in r["passes_s"])
        print(f"| {name} | {r['particles']} | {r['stack_gb']:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['wall_s']:.0f} | {passes} |")
    if not args.keep:
        shutil.rmtree(os.path.join(args.outdir, "big"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
