"""UMAP cost and quality of :func:`cryoformer.analysis.latent_space.umap_embedding` (docs/benchmarks.md).

Synthetic latents (zdim 8, a few Gaussian clusters) stand in for a run's ``z``:

* **cost** — seconds and peak resident memory (RSS) of one ``umap_embedding`` call at each
  particle count (default 2·10⁴, 10⁵, 3·10⁵) with the default ``fit_max``; each size runs in a
  fresh Python process, so its peak RSS is its own and every row pays umap-learn's import and
  numba compilation, as one ``cryoformer analyze`` does;
* **fit on a subset vs on everything** — at the smallest size, the embedding fitted on a
  ``--subset-fit-max`` subset (the rest placed with ``transform``) against the one fitted on all
  particles: trustworthiness (sklearn.manifold, 10 neighbours; 1 = every embedded neighbour is a
  true neighbour) on a random sample of particles, and the share of particles whose nearest
  embedded neighbour lies in the same Gaussian cluster.

Usage::

    python bench/bench_umap.py                         # 20k, 100k, 300k; minutes on 2 cores
    python bench/bench_umap.py --sizes 20000 --max-seconds 120 --json umap.json
    python bench/bench_umap.py --part quality          # only the subset-vs-all comparison
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from cryoformer.analysis.latent_space import UMAP_FIT_MAX, umap_available, umap_embedding
from cryoformer.io.atomic import atomic_open

ZDIM = 8
N_CLUSTERS = 5


def synthetic_latents(n: int, seed: int = 0):
    """``[n, 8]`` float32 latents around 5 centres 6 σ apart (cluster sizes unequal), and the
    cluster of each ``[n]``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_CLUSTERS, ZDIM)) * 6.0 / np.sqrt(2.0)
    labels = rng.choice(N_CLUSTERS, size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    return (centres[labels] + rng.normal(size=(n, ZDIM))).astype(np.float32), labels


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one_size(n: int, fit_max: int, seed: int) -> dict:
    """Time one embedding of ``n`` particles in this process (run in a fresh one)."""
    z, _ = synthetic_latents(n, seed)
    start = time.perf_counter()
    xy = umap_embedding(z, seed=seed, fit_max=fit_max)  # [n, 2]
    seconds = time.perf_counter() - start
    assert xy.shape == (n, 2) and np.all(np.isfinite(xy))
    return {"particles": n, "fit_particles": min(n, fit_max), "seconds": round(seconds, 1),
            "peak_rss_mib": round(_peak_rss_mib(), 0)}


def nearest_same_cluster(xy: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    """Share of ``rows`` whose nearest other particle in ``xy`` ``[N, 2]`` has the same label."""
    from sklearn.neighbors import NearestNeighbors  # only this comparison needs scikit-learn

    nn = NearestNeighbors(n_neighbors=2).fit(xy)
    idx = nn.kneighbors(xy[rows], return_distance=False)[:, 1]  # [r]; column 0 is the particle itself
    return float(np.mean(labels[idx] == labels[rows]))


def subset_vs_full(n: int, subset_fit_max: int, sample: int, seed: int) -> dict:
    """Neighbourhood quality of fitting on ``subset_fit_max`` particles against fitting all ``n``."""
    from sklearn.manifold import trustworthiness  # only this comparison needs scikit-learn

    z, labels = synthetic_latents(n, seed)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, min(sample, n), replace=False))  # [s]
    result = {"particles": n, "sample": int(rows.size)}
    for name, fit_max in (("fit_all", n), ("fit_subset", subset_fit_max)):
        start = time.perf_counter()
        xy = umap_embedding(z, seed=seed, fit_max=fit_max)  # [n, 2]
        # trustworthiness needs all pairwise distances: computed on a sample, in both spaces.
        result[name] = {"fit_particles": min(n, fit_max), "seconds": round(time.perf_counter() - start, 1),
                        "trustworthiness_10nn": round(float(trustworthiness(z[rows], xy[rows], n_neighbors=10)), 4),
                        "nearest_same_cluster": round(nearest_same_cluster(xy, labels, rows), 4)}
    return result


def _in_child(args: list, timeout_s: float):
    """Run this script with ``args`` in a fresh process; its JSON line, or why there is none."""
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over the --max-seconds cap ({timeout_s:.0f} s)"}
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 300_000],
                   help="particle counts (default 20000 100000 300000)")
    p.add_argument("--fit-max", type=int, default=UMAP_FIT_MAX, help="fit_max of the cost rows (default %(default)s)")
    p.add_argument("--subset-fit-max", type=int, default=5_000,
                   help="fit_max compared against fitting all particles at the smallest size (default %(default)s)")
    p.add_argument("--sample", type=int, default=4_000, help="particles the trustworthiness is computed on")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="cap on each measurement (a fresh process); rows over it are reported as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("all", "cost", "quality"), default="all",
                   help="the cost rows, the subset-vs-all comparison, or both (default)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_one", type=int, help=argparse.SUPPRESS)       # internal: one cost row
    p.add_argument("--_quality", type=int, help=argparse.SUPPRESS)   # internal: the comparison
    args = p.parse_args()
    if not umap_available():
        sys.exit("umap-learn is not installed: pip install 'cryoformer[umap]'")
    if args._one:
        print(json.dumps(one_size(args._one, args.fit_max, args.seed)))
        return
    if args._quality:
        print(json.dumps(subset_vs_full(args._quality, args.subset_fit_max, args.sample, args.seed)))
        return

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from machine import one_line  # bench/machine.py, beside this script

    print(f"machine: {one_line()}", flush=True)
    common = ["--fit-max", str(args.fit_max), "--seed", str(args.seed)]
    rows, quality = [], None
    if args.part in ("all", "cost"):
        print(f"{'particles':>10} {'fit on':>8} {'seconds':>8} {'peak RSS MiB':>13}", flush=True)
        for n in args.sizes:  # each row printed as it comes: a long run killed keeps its rows
            rows.append(_in_child(["--_one", str(n), *common], args.max_seconds))
            row = rows[-1]
            line = (f"{row['fit_particles']:>8} {row['seconds']:>8} {row['peak_rss_mib']:>13.0f}"
                    if "seconds" in row else json.dumps(row))
            print(f"{n:>10} {line}", flush=True)
    if args.part in ("all", "quality"):
        quality = _in_child(["--_quality", str(min(args.sizes)), "--subset-fit-max", str(args.subset_fit_max),
                             "--sample", str(args.sample), *common], args.max_seconds)
        print(f"fit on a subset vs on all, at {min(args.sizes)} particles: {json.dumps(quality)}", flush=True)
    if args.json:
        with atomic_open(args.json, "w") as fh:
            json.dump({"machine": one_line(), "cost": rows, "subset_vs_full": quality}, fh, indent=2)

if __name__ == "__main__":
    main()
