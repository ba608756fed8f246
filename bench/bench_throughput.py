"""Training throughput, cryoformer vs cryoDRGN ``train_vae``, same data, same machine (docs/benchmarks.md).

Both tools train one epoch on the same ``--n-images`` particles of one simulated dataset (the
hinged molecule, SNR 0.1, CTF, RELION contrast) at box ``D``; runs are interleaved A/B
(cryoformer, cryoDRGN default, cryoDRGN small, then again) ``--repeats`` times and the median
images/s is reported. Throughput is images / wall time of the training epoch itself:

* cryoformer: ``images_per_s`` of the epoch row in ``RUN/log.csv`` (excludes start-up and the
  end-of-epoch latent pass). Two cryoformer rows: ``--no-support-mask`` (one epoch, the whole
  sphere) and the default (the support mask exists from epoch 2 on, so that run trains
  ``--mask-epochs`` epochs and the last one is timed; the mask's share of the box is reported —
  a model this briefly trained has a loose mask, so this understates the steady-state gain);
* cryoDRGN: images / the epoch time cryoDRGN logs (``Finished in`` of the epoch line), which
  likewise excludes start-up.

    python bench/bench_throughput.py -D 64 --n-images 200 --repeats 3

cryoDRGN comes from its own virtual environment (``--cryodrgn-venv``, created from PyPI with
the CPU torch pinned when missing). Prints a markdown table for docs/benchmarks.md and writes
``results.json``. Every run is timed under GNU ``time -v`` (when installed), whose peak resident
memory of the whole process is reported beside the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from bench_vs_cryodrgn import ensure_cryodrgn, sh  # noqa: E402
from timed_runs import peak_rss_gb  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
# every training runs under GNU time, whose report (in the run's log) gives the peak resident memory
TIME_V = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
SMALL_DRGN = ["--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3"]


def _epoch_seconds(log_text: str) -> float:
    """Seconds of the first training epoch from cryoDRGN's log ("Epoch: 1 ... Finished in H:MM:SS.ss")."""
    m = re.search(r"Epoch: \d+ .*?Finished in (\d+):(\d+):([\d.]+)", log_text)
    if not m:
        raise RuntimeError("no epoch time in the cryoDRGN log")
    h, mnt, s = m.groups()
    return 3600 * int(h) + 60 * int(mnt) + float(s)


def run_cryodrgn(exe: str, data: str, out: str, ind: str, n: int, extra) -> tuple[float, float]:
    """(images/s of the epoch, peak resident memory in GB) of one cryoDRGN epoch."""
    log = out + ".log"
    cmd = TIME_V + [exe, "train_vae", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
           "--ctf", os.path.join(data, "ctf.pkl"), "--ind", ind, "--zdim", "8", "-n", "1", "-o", out,
           "--no-analysis"] + list(extra)
    rc = sh(cmd, log=log)
    text = open(log).read()
    if rc != 0 and "Finished in" not in text:
        raise RuntimeError(f"cryoDRGN failed (exit {rc}); see {log}")
    return n / _epoch_seconds(text), peak_rss_gb(text)


def run_cryoformer(data: str, out: str, ind: str, box: int, preset: str, epochs: int = 1,
                   extra=()) -> tuple[float, float]:
    """(images/s of the last epoch, peak resident memory in GB) of one cryoformer run."""
    import pandas as pd

    cmd = TIME_V + [os.path.join(VENV_BIN, "cryoformer"), "train", os.path.join(data, "particles.star"), "-o", out,
           "--epochs", str(epochs), "--ind", ind, "--seed", "0", "--device", "auto", "--preset", preset]
    cmd += list(extra)
    if box:
        cmd += ["--box", str(box)]
    if sh(cmd, log=out + ".log") != 0:
        raise RuntimeError(f"cryoformer failed; see {out}.log")
    log = pd.read_csv(os.path.join(out, "log.csv"))
    return float(log[log.kind == "epoch"].images_per_s.iloc[-1]), peak_rss_gb(open(out + ".log").read())


def mask_fraction(out: str) -> float:
    """Share of the box inside the support mask of the run's last checkpoint."""
    import torch

    state = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True, map_location="cpu")
    return float(state["support"].float().mean()) if state.get("support") is not None else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-D", type=int, default=64, help="simulated box (px)")
    p.add_argument("--n-images", type=int, default=200, help="images per timed epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="n512", help="cryoformer preset")
    p.add_argument("-o", "--outdir", default="bench_out/throughput")
    p.add_argument("--cryodrgn-venv", default=os.environ.get("CRYODRGN_VENV", "/opt/cryodrgn-venv"))
    p.add_argument("--cryodrgn-version", default="4.3.1")
    p.add_argument("--skip-cryodrgn", action="store_true")
    p.add_argument("--mask-epochs", type=int, default=2,
                   help="epochs of the --support-mask variant (the last is timed; 0 = skip the variant)")
    args = p.parse_args()
    if args.mask_epochs == 1:
        p.error("--mask-epochs must be 0 (skip) or >= 2: the mask exists from epoch 2 on")

    import shutil

    import numpy as np

    os.makedirs(args.outdir, exist_ok=True)
    data = os.path.join(args.outdir, f"data_D{args.D}")
    if not os.path.isfile(os.path.join(data, "simulation.json")):
        sh([os.path.join(VENV_BIN, "cryoformer"), "simulate", "-o", data, "-n", str(args.n_images), "-D",
            str(args.D), "--Apix", str(3.0 * 64 / args.D), "--snr", "0.1", "--shift-range", "2", "--seed", "0"])
    ind_npy, ind_pkl = os.path.join(args.outdir, "ind.npy"), os.path.join(args.outdir, "ind.pkl")
    np.save(ind_npy, np.arange(args.n_images))
    import pickle

    with open(ind_pkl, "wb") as fh:
        pickle.dump(np.arange(args.n_images), fh)
    exe = None if args.skip_cryodrgn else ensure_cryodrgn(args.cryodrgn_venv, args.cryodrgn_version)

    rates = {"cryoformer --no-support-mask": [], "cryoformer (support mask)": [], "cryodrgn-default": [],
             "cryodrgn-small": []}
    rss = {k: [] for k in rates}
    fractions = []

    def record(name: str, measured: tuple[float, float]) -> None:
        rates[name].append(measured[0])
        rss[name].append(measured[1])

    for rep in range(args.repeats):
        out = os.path.join(args.outdir, f"cf_{rep}")
        shutil.rmtree(out, ignore_errors=True)
        record("cryoformer --no-support-mask",
               run_cryoformer(data, out, ind_npy, 0, args.preset, extra=["--no-support-mask"]))
        if args.mask_epochs:
            out = os.path.join(args.outdir, f"cfmask_{rep}")
            shutil.rmtree(out, ignore_errors=True)
            record("cryoformer (support mask)", run_cryoformer(
                data, out, ind_npy, 0, args.preset, epochs=args.mask_epochs))
            fractions.append(mask_fraction(out))
        if exe:
            for name, extra in (("cryodrgn-default", []), ("cryodrgn-small", SMALL_DRGN)):
                out = os.path.join(args.outdir, f"{name}_{rep}")
                shutil.rmtree(out, ignore_errors=True)
                record(name, run_cryodrgn(exe, data, out, ind_pkl, args.n_images, extra))
        print({k: [round(x, 2) for x in v] for k, v in rates.items()}, flush=True)

    med = {k: statistics.median(v) for k, v in rates.items() if v}
    med_rss = {k: statistics.median(v) for k, v in rss.items() if v}
    info = machine.describe()
    result = {"D": args.D, "n_images": args.n_images, "repeats": args.repeats, "preset": args.preset,
              "images_per_s": rates, "median_images_per_s": med, "peak_rss_gb": rss, "machine": info,
              "support_mask_box_fraction": fractions,
              "when": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(args.outdir, f"results_D{args.D}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nmachine: {machine.one_line()}")
    print("| D | tool | images/s (median of %d) | faster cryoformer row ÷ tool | ms per image | peak RSS (GB) |"
          % args.repeats)
    print("|---|---|---|---|---|---|")
    for k, v in med.items():
        best = max(med[c] for c in med if c.startswith("cryoformer"))
        ratio = f"{best / v:.2f}×" if k.startswith("cryodrgn") else "—"
        print(f"| {args.D} | {k} | {v:.2f} | {ratio} | {1e3 / v:.0f} | {med_rss[k]:.2f} |")
    if fractions:
        print(f"support mask: {', '.join(f'{100 * f:.1f}' for f in fractions)} % of the box")


if __name__ == "__main__":
    main()
