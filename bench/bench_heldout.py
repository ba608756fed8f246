"""Does the held-out image loss pick the epoch the ground truth would pick? (docs/benchmarks.md)

For every epoch of a finished training run on simulated data, compare the held-out image loss
the trainer recorded (``RUN/validation.json``, no ground truth involved) with the per-state
FSC-0.5 and AU-FSC of that epoch's maps against the true ones (the scoring of
``bench_vs_cryodrgn.py``: each state decoded at the mean latent of its particles, 64³).

    python bench/bench_heldout.py bench_out/vs_cryodrgn/cryoformer bench_out/vs_cryodrgn/data

Prints a markdown table, writes ``RUN/heldout_vs_truth.json`` and ``.png`` (both curves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from bench_vs_cryodrgn import score_cryoformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="cryoformer training run (trained with held-out images)")
    p.add_argument("data_dir", help="simulated dataset with gt/state_XXX.mrc and gt/state.npy")
    p.add_argument("--every", type=int, default=1, help="score every n-th epoch (default all)")
    args = p.parse_args()

    import torch

    from cryoformer.trainer.validation import read_validation

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    summary = read_validation(args.run_dir)
    if not summary or not summary.get("history"):
        raise SystemExit(f"{args.run_dir}: no validation.json (trained with --heldout-fraction 0?)")
    rows = []
    history = sorted(summary["history"], key=lambda r: r["epoch"])
    for r in history[::args.every]:
        s = score_cryoformer(args.data_dir, args.run_dir, r["epoch"])
        rows.append({**r, "fsc05_angstrom": s["mean_fsc05_angstrom"], "au_fsc": s["mean_au_fsc"]})
        print(f"epoch {r['epoch']}: held-out MSE {r['heldout_mse']:.5f}, FSC-0.5 {s['mean_fsc05_angstrom']:.2f} Å",
              flush=True)
    by_loss = min(rows, key=lambda r: (r["heldout_mse"], r["epoch"]))
    by_truth = min(rows, key=lambda r: (r["fsc05_angstrom"], r["epoch"]))
    result = {"machine": machine.describe(), "n_heldout": summary["n_heldout"], "rows": rows,
              "epoch_by_heldout_loss": by_loss["epoch"], "epoch_by_truth": by_truth["epoch"]}
    with open(os.path.join(args.run_dir, "heldout_vs_truth.json"), "w") as fh:
        json.dump(result, fh, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = np.array([r["epoch"] for r in rows])
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [r["heldout_mse"] for r in rows], "o-", color="C1")
    ax[0].set(xlabel="epoch", ylabel="held-out image MSE", title=f"{summary['n_heldout']} held-out images")
    ax[1].plot(ep, [r["fsc05_angstrom"] for r in rows], "o-")
    ax[1].set(xlabel="epoch", ylabel="mean FSC-0.5 vs truth (Å)", title="maps vs ground truth")
    for a in ax:
        a.axvline(by_loss["epoch"], color="gray", ls=":")
    fig.tight_layout()
    fig.savefig(os.path.join(args.run_dir, "heldout_vs_truth.png"), dpi=110)

    print(f"\nmachine: {machine.one_line()}")
    print("| epoch | elapsed (min) | held-out MSE | mean FSC-0.5 vs truth (Å) | mean AU-FSC |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " ←" if r is by_loss else ""
        print(f"| {r['epoch']}{mark} | {r['elapsed_s'] / 60:.1f} | {r['heldout_mse']:.5f} | "
              f"{r['fsc05_angstrom']:.2f} | {r['au_fsc']:.3f} |")
    print(f"lowest held-out loss: epoch {by_loss['epoch']} ({by_loss['fsc05_angstrom']:.2f} Å); "
          f"best against the truth: epoch {by_truth['epoch']} ({by_truth['fsc05_angstrom']:.2f} Å)")


if __name__ == "__main__":
    main()
