"""Do the passes over all particles grow linearly with the particle count? (docs/benchmarks.md)

A user's run touches every particle outside the training steps too: the latent pass after each
epoch, the held-out scoring (capped at ``--heldout-max`` images, so it should not grow at all),
the pose search, ``cryoformer analyze`` (PCA, K-means, UMAP), ``cryoformer export`` and opening
the run in the explorer. This script simulates ``--n-small`` particles of the hinged molecule at
box ``-D`` once, tiles them to each size of ``--sizes`` (poses and CTF tiled to match), and for
each size, as a user would, in fresh processes:

* ``cryoformer train --max-minutes M`` → the latent and held-out passes from ``RUN/run.log``,
  the whole command's wall time beside its budget, and whether it warned that the budget was
  short;
* ``cryoformer analyze RUN`` (wall time of the command);
* ``cryoformer export RUN --selection half.npy --format star`` (half of the particles);
* opening the run's session (latents, PCA, the K-means of ``analyze``) as the Jupyter and
  napari front ends do, timed inside one process (the import excluded);
* with ``--pose-search-sizes``: one pose-search pass (``train -n 1 --pose-search
  --pose-search-start 1``), timed from the run log, at those sizes only (it costs milliseconds
  per particle, so 300 000 particles take about an hour on 2 cores).

Then each cost per particle, so linear growth reads as a constant column.

    python bench/bench_passes.py -o /scratch/passes --sizes 20000 100000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from bench_large_stack import tile  # noqa: E402
from timed_runs import simulate_hinged  # noqa: E402

CFORMER = os.path.join(os.path.dirname(sys.executable), "cryoformer")
PASS = re.compile(r"pass (latents|held-out|pose search) \((?:after )?epoch \d+\): (\d+) \S+.*? in ([\d.]+) s")
SESSION_TIMER = """
import sys, time
from cryoformer_widgets.session import RunSession
t0 = time.perf_counter()
s = RunSession(sys.argv[1], device="cpu")
print(f"{time.perf_counter() - t0:.3f} {s.n_particles} {s.kmeans_source}")
s.close()
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", required=True, help="work folder (stacks, runs, results.json)")
    ap.add_argument("-D", "--box", type=int, default=32, help="simulated box (px)")
    ap.add_argument("--n-small", type=int, default=2000, help="particles simulated (then tiled)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 300_000], help="particle counts")
    ap.add_argument("--minutes", type=float, default=1.5, help="--max-minutes of each training run")
    ap.add_argument("--pose-search-sizes", type=int, nargs="*", default=[],
                    help="sizes at which one pose-search pass is timed too")
    ap.add_argument("--keep", action="store_true", help="keep the tiled stacks")
    return ap.parse_args(argv)


def timed(cmd: list, log: str) -> tuple[float, int]:
    """Run ``cmd`` with its output to ``log`` → (wall seconds, exit code)."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    return time.monotonic() - t0, code


def passes(run: str) -> dict:
    with open(os.path.join(run, "run.log"), encoding="utf-8") as fh:
        text = fh.read()
    found = {name: (int(count), float(sec)) for name, count, sec in PASS.findall(text)}
    return {"passes": found, "warned": "is short for" in text}


def train(data: str, run: str, minutes: float, extra: list = ()) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    cmd = [CFORMER, "train", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
           "--ctf", os.path.join(data, "ctf.pkl"), "-o", run, "--seed", "0", *extra]
    if minutes:
        cmd += ["--max-minutes", str(minutes)]
    wall, code = timed(cmd, run + ".out")
    if code:
        raise RuntimeError(f"training failed, see {run}.out")
    return {"wall_s": wall, **passes(run)}


def one_size(args, small: str, n: int) -> dict:
    root = os.path.join(args.outdir, f"n{n}")
    os.makedirs(root, exist_ok=True)
    data = tile(small, root, args.box, n)
    run = os.path.join(root, "run")
    row = {"particles": n, "budget_s": 60 * args.minutes, "train": train(data, run, args.minutes)}
    row["analyze_s"], code = timed([CFORMER, "analyze", run, "--force"], os.path.join(root, "analyze.out"))
    if code:
        raise RuntimeError(f"analyze failed, see {root}/analyze.out")
    selection = os.path.join(root, "half.npy")
    np.save(selection, np.arange(0, n, 2))
    out_star = os.path.join(root, "half.star")
    if os.path.exists(out_star):
        os.remove(out_star)
    row["export_s"], code = timed([CFORMER, "export", run, "--selection", selection, "--format", "star", "-o",
                                   out_star], os.path.join(root, "export.out"))
    if code:
        raise RuntimeError(f"export failed, see {root}/export.out")
    proc = subprocess.run([sys.executable, "-c", SESSION_TIMER, run], capture_output=True, text=True)
    if proc.returncode:  # the widgets package is optional: the row says so instead of failing
        print(f"opening the session failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        row["session_s"], row["session_kmeans"] = float("nan"), None
    else:
        seconds, _n, source = proc.stdout.split(maxsplit=2)
        row["session_s"], row["session_kmeans"] = float(seconds), source.strip()
    if n in args.pose_search_sizes:
        ps = train(data, os.path.join(root, "run_search"), 0.0,
                   ["-n", "1", "--pose-search", "--pose-search-start", "1"])
        row["pose_search"] = ps["passes"].get("pose search")
    if not args.keep:
        shutil.rmtree(os.path.join(root, "big"), ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list) -> None:
    print("| particles | budget / whole train (s) | warned | latent pass (s) | held-out pass (s, images) | "
          "analyze (s) | export half (s) | open session (s) | pose search (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["train"]["passes"]
        lat = p.get("latents", (0, float("nan")))
        held = p.get("held-out", (0, float("nan")))
        search = r.get("pose_search")
        print(f"| {r['particles']} | {r['budget_s']:.0f} / {r['train']['wall_s']:.0f} | "
              f"{'yes' if r['train']['warned'] else 'no'} | {lat[1]:.1f} | {held[1]:.1f} ({held[0]}) | "
              f"{r['analyze_s']:.1f} | {r['export_s']:.1f} | {r['session_s']:.2f} | "
              f"{'—' if not search else f'{search[1]:.0f}'} |")
    print("\nper 1000 particles (latents, analyze, export, session, pose search):")
    for r in rows:
        k = r["particles"] / 1000.0
        lat = r["train"]["passes"].get("latents", (0, float("nan")))[1]
        search = r.get("pose_search")
        print(f"  {r['particles']}: {lat / k:.3f} s, {r['analyze_s'] / k:.3f} s, {r['export_s'] / k:.4f} s, "
              f"{r['session_s'] / k:.4f} s, {'—' if not search else f'{search[1] / k:.2f} s'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    small = simulate_hinged(os.path.join(args.outdir, "small"), args.box, args.n_small)
    rows = [one_size(args, small, n) for n in args.sizes]
    info = machine.describe()
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, handle, indent=1)
    print(f"\n{info['cpu']}, {info['cores']} cores, D = {args.box}, --max-minutes {args.minutes:g}\n")
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
