"""The CPU slab size chosen from timed steps against the fixed default (docs/benchmarks.md).

``cryoformer train`` on a CPU times its first steps at 4 slab sizes of the density head and keeps
the fastest (:mod:`cryoformer.trainer.slab_tuning`). This script trains one epoch of the same
``--n-images`` particles (hinged molecule, SNR 0.1, box ``-D``, the whole sphere:
``--no-support-mask``) with the tuning and with ``--no-slab-tuning``, interleaved ``--repeats``
times, and reports

* what each tuned run measured per slab size (median step, from its run.log) and chose;
* images/s of the epoch both ways (``RUN/log.csv``; the tuned epoch includes its timing steps).

    python bench/bench_slab_tuning.py -D 64 --n-images 480 --repeats 2

Writes ``results.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from machine import CFORMER  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", default="bench_out/slab_tuning")
    ap.add_argument("-D", "--box", type=int, default=64)
    ap.add_argument("--n-images", type=int, default=480, help="images per epoch (the timing takes 13 steps of 16)")
    ap.add_argument("--repeats", type=int, default=2)
    return ap.parse_args(argv)


def run(data: str, out: str, tuning: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [CFORMER, "train", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
           "--ctf", os.path.join(data, "ctf.pkl"), "-o", out, "--epochs", "1", "--no-support-mask",
           "--heldout-fraction", "0", "--seed", "0", "--device", "cpu"] + ([] if tuning else ["--no-slab-tuning"])
    subprocess.run(cmd, check=True, capture_output=True)
    log = pd.read_csv(os.path.join(out, "log.csv"))
    epoch = log[(log.kind == "epoch") & (log.phase == "train")].iloc[-1]
    line = re.search(r"slab size timed on this machine \(median step\): (.*)", open(os.path.join(out, "run.log")).read())
    return {"images_per_s": float(epoch.images_per_s), "tuning": line.group(1) if line else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    data = os.path.join(args.outdir, f"data_D{args.box}")
    if not os.path.isfile(os.path.join(data, "simulation.json")):
        subprocess.run([CFORMER, "simulate", "-o", data, "-n", str(args.n_images), "-D", str(args.box), "--Apix",
                        f"{3.0 * 64 / args.box:g}", "--snr", "0.1", "--shift-range", "2", "--seed", "0"], check=True)
    rows = {"tuned": [], "default": []}
    for rep in range(args.repeats):
        for name in rows:
            rows[name].append(run(data, os.path.join(args.outdir, f"{name}_{rep}"), name == "tuned"))
            print(name, rep, rows[name][-1], flush=True)
    info = machine.describe()
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, handle, indent=1)
    print(f"\n{info['cpu']}, {info['cores']} cores; D = {args.box}, {args.n_images} images, one epoch, whole sphere\n")
    print("| slab | images/s (runs) | median | what the tuned run measured |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        rates = [x["images_per_s"] for x in r]
        measured = "; ".join(x["tuning"] for x in r if x["tuning"]) or "—"
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in rates)} | {statistics.median(rates):.2f} | {measured} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
