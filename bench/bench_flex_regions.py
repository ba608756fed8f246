"""Flexible-region maps against the true motion: attention maps, density response, baselines.

For each dataset a short CPU training run is made (or reused with ``--run NAME=DIR``), then
every candidate map is scored by ROC-AUC at finding the support voxels that truly move more
than one voxel (docs/conventions.md, "Flexible-region ROC-AUC"):

* ``queries``, ``weights`` — the attention-map scores (paper §4.4);
* ``density`` — the density-response score (:mod:`cryoformer.analysis.flexible_regions`, the
  default) and variants of it (number of modes, smoothing);
* baselines ``distance_from_centre`` and ``voxel_variance`` (as ``cryoformer evaluate``), and
  the ground-truth map variance, plain and smoothed as the default map is, as references
  (the second is what a perfect model's density response would score).

Datasets: ``hinged`` (the embedded molecule, one arm), ``hinged2`` (two arms on independent
hinges, ``simulate --hinges 2``; also checks that the two arms land in different regions of
``flexible_regions``) and ``adk`` (adenylate kinase from the MDAnalysisTests trajectory, as in
``bench_vs_cryodrgn.py``).

Scatter: every map is computed at ``--seeds`` latent subsets (mean ± std printed), and the
chosen map is compared with each baseline by a paired bootstrap over support voxels (seed 0).
Verdict per dataset: PASS when the chosen map's mean AUC ≥ 0.9 and, against each baseline, it
is higher at every seed and the bootstrap's 2.5th percentile of the AUC difference is > 0.

Usage (one CPU thread; ~6 min of training per dataset)::

    OMP_NUM_THREADS=1 python bench/bench_flex_regions.py -o /tmp/flex --minutes 5
    python bench/bench_flex_regions.py --run hinged=notebooks/_work/example/run --datasets hinged
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from cryoformer.analysis.attention_maps import flex_score
from cryoformer.analysis.evaluation import (distance_from_centre, fourier_crop_volume, resample_real,
                                            support_mask, voxel_variance)
from cryoformer.analysis.flexible_regions import (DensityModes, FlexRegionConfig, density_flex_score,
                                                  density_modes, flexible_regions, modes_for_fraction)
from cryoformer.io.mrc import read_volume
from cryoformer.trainer import load_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe, one_line  # noqa: E402  (bench/ is not a package)

VENV_BIN = os.path.dirname(sys.executable)
CHOSEN = "density"
BASELINES = ("distance_from_centre", "voxel_variance")
VARIANTS = {  # name → FlexRegionConfig overrides (all else the default)
    "density": {},
    "density, 1 mode": {"n_modes": 1},
    "density, modes for 90 %": {"mode_variance_fraction": 0.9},
    "density, all modes (smoothed std)": {"mode_variance_fraction": 1.0},
    "density, no smoothing": {"smoothing_sigma_px": 0.0},
    "density, smoothing 1.2 px": {"smoothing_sigma_px": 1.2},
}


def sh(cmd: List[str], log: str) -> None:
    """Run a CLI step single-threaded, its output in ``log``; stop on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a") as fh:
        if subprocess.call([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env):
            raise SystemExit(f"failed: {' '.join(map(str, cmd))} (see {log})")


def make_data(name: str, out: str, n_particles: int, seed: int) -> str:
    """Simulate dataset ``name`` into ``out`` (kept when it exists)."""
    if os.path.exists(os.path.join(out, "simulation.json")):
        return out
    if name == "adk":
        from bench_vs_cryodrgn import make_dataset  # needs MDAnalysisTests (installed on demand)

        return make_dataset(out, n_particles, 10, seed)
    hinges = ["--hinges", 2, "--n-states", 16] if name == "hinged2" else ["--n-states", 10]
    sh([os.path.join(VENV_BIN, "cryoformer"), "simulate", *hinges, "-D", 64, "--Apix", 3.0,
        "-n", n_particles, "--snr", 1.0, "--seed", seed, "-o", out], out + ".log")
    return out


def train(data: str, run: str, minutes: float, box: int, seed: int) -> str:
    """A short single-thread CPU training run (kept when it has latents)."""
    if os.path.isdir(os.path.join(run, "latents")) and os.listdir(os.path.join(run, "latents")):
        return run
    sh([os.path.join(VENV_BIN, "cryoformer"), "train", os.path.join(data, "particles.star"), "-o", run,
        "--box", box, "--max-minutes", minutes, "--epochs", 10000, "--num-workers", 0, "--device", "cpu",
        "--seed", seed, "--force"], run + ".log")
    return run


def ground_truth(data: str, d: int):
    """True maps ``[K, d, d, d]``, total motion ``[d, d, d]`` (Å) and per-domain motions."""
    gt = os.path.join(data, "gt")
    paths = sorted(p for p in os.listdir(gt) if p.startswith("state_"))
    maps = np.stack([fourier_crop_volume(read_volume(os.path.join(gt, p))[0], d) for p in paths])
    motion = resample_real(read_volume(os.path.join(gt, "motion.mrc"))[0], d)
    domains = sorted(p for p in os.listdir(gt) if p.startswith("motion_domain_"))
    per_domain = [resample_real(read_volume(os.path.join(gt, p))[0], d) for p in domains]
    return maps, motion, per_domain


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC (Mann–Whitney, ties half) of ``score`` ``[n]`` at finding ``positive`` ``[n]``."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, positive: np.ndarray, n_boot: int, seed: int):
    """2.5th, 50th and 97.5th percentiles of ``AUC(a) − AUC(b)`` over voxel resamples."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        diffs.append(auc(a[idx], positive[idx]) - auc(b[idx], positive[idx]))
    return np.nanpercentile(diffs, [2.5, 50, 97.5])


def candidate_maps(model, z: np.ndarray, d: int, seed: int) -> Dict[str, np.ndarray]:
    """Every map scored, at latent-subset seed ``seed``."""
    maps = {"queries": flex_score(model, z, d, "queries", seed=seed)}
    if model.config.use_rsca:
        maps["weights"] = flex_score(model, z, d, "weights", seed=seed)
    modes = density_modes(model, z, d, FlexRegionConfig(seed=seed, mode_variance_fraction=1.0))
    for name, over in VARIANTS.items():
        cfg = FlexRegionConfig(seed=seed, **over)
        # All variants share one decode: modes are cut from the full set here.
        k = cfg.n_modes or modes_for_fraction(modes.singular_values, cfg.mode_variance_fraction)
        sub = DensityModes(modes.singular_values[:k], modes.modes[:k], modes.explained[:k], modes.support)
        maps[name] = density_flex_score(model, z, d, cfg, sub)
    maps["distance_from_centre"] = distance_from_centre(d)
    maps["voxel_variance"] = voxel_variance(model, z, d, 64, seed)
    return maps


def region_check(model, z: np.ndarray, d: int, per_domain: List[np.ndarray], support: np.ndarray,
                 threshold: float, seed: int) -> dict:
    """Do the true domains land in different regions? Per domain: its majority region and the
    share of its moving voxels (moving only in that domain) that region holds."""
    labels, _ = flexible_regions(model, z, d, FlexRegionConfig(seed=seed))
    moving = [(m > threshold) & support for m in per_domain]
    rows = []
    for h, mask in enumerate(moving):
        own = mask & ~np.any([o for j, o in enumerate(moving) if j != h], axis=0)
        lab = labels[own]
        flagged = lab[lab > 0]
        major = int(np.bincount(flagged).argmax()) if flagged.size else 0
        rows.append({"domain": h, "moving_voxels": int(own.sum()),
                     "in_any_region": float(np.mean(lab > 0)) if lab.size else 0.0,
                     "majority_region": major,
                     "share_in_majority": float(np.mean(lab == major)) if lab.size else 0.0})
    majors = [r["majority_region"] for r in rows]
    return {"n_regions": int(labels.max()), "domains": rows,
            "separated": len(set(majors)) == len(majors) and 0 not in majors}


def evaluate(name: str, data: str, run_dir: str, seeds: int, n_boot: int, epoch: str = "last") -> dict:
    """Scores of every map on one dataset (see module docstring), at the run's ``epoch``."""
    run = load_run(run_dir, epoch=epoch)
    model, z, d = run.model.eval(), np.asarray(run.latents, np.float32), run.box_size
    maps_gt, motion, per_domain = ground_truth(data, d)
    apix = run.pixel_size_angstrom * run.box_size / d
    support = support_mask(maps_gt)
    positive = (motion > apix)[support]
    per_seed = []
    for seed in range(seeds):
        t0 = time.time()
        cands = candidate_maps(model, z, d, seed)
        cands["ground-truth map variance (reference)"] = maps_gt.var(axis=0)
        # what the default's smoothing makes of the true maps: the ceiling of any map of where
        # density changes, which a perfectly trained model's density response would reach
        cands["ground-truth map std, smoothed as the default (reference)"] = gaussian_filter(
            maps_gt.std(axis=0), FlexRegionConfig().smoothing_sigma_px, mode="constant")
        per_seed.append({k: auc(v[support], positive) for k, v in cands.items()})
        if seed == 0:
            first, seconds = cands, time.time() - t0
    names = list(per_seed[0])
    table = {k: (float(np.mean([s[k] for s in per_seed])), float(np.std([s[k] for s in per_seed])))
             for k in names}
    boot = {b: paired_bootstrap(first[CHOSEN][support], first[b][support], positive, n_boot, 0).tolist()
            for b in BASELINES}
    always = {b: all(s[CHOSEN] > s[b] for s in per_seed) for b in BASELINES}
    ok = (table[CHOSEN][0] >= 0.9 and all(always.values()) and all(v[0] > 0 for v in boot.values()))
    out = {"dataset": name, "run": run_dir, "epoch": run.epoch, "n_particles": int(len(z)),
           "support_voxels": int(support.sum()), "moving_voxels": int(positive.sum()),
           "threshold_angstrom": apix, "auc": table, "bootstrap_vs_baselines": boot,
           "above_at_every_seed": always, "seconds_all_maps_one_seed": round(seconds, 1),
           "verdict": "PASS" if ok else "FAIL"}
    if per_domain:
        out["regions"] = region_check(model, z, d, per_domain, support, apix, 0)
        if not out["regions"]["separated"]:
            out["verdict"] = "FAIL"
    return out


def markdown(results: List[dict]) -> str:
    """One table, a row per map, a column per dataset (mean ± std over seeds)."""
    names = list(results[0]["auc"])
    head = "| map | " + " | ".join(f"{r['dataset']} (epoch {r['epoch']})" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for n in names:
        cells = [f"{r['auc'][n][0]:.3f} ± {r['auc'][n][1]:.3f}" if n in r["auc"] else "–" for r in results]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", default="bench_out/flex_regions")
    ap.add_argument("--datasets", nargs="+", default=["hinged", "hinged2", "adk"],
                    choices=("hinged", "hinged2", "adk"))
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                    help="reuse a trained run for a dataset (its data: the run's particles' folder)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per dataset (min)")
    ap.add_argument("--box", type=int, default=32, help="training box (px)")
    ap.add_argument("-n", "--n-particles", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3, help="latent-subset seeds per map")
    ap.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="simulation and training seed")
    ap.add_argument("--epoch", choices=("last", "best"), default="last",
                    help="epoch scored: the last, or the lowest held-out loss (analyze's default); "
                         "a few-minute run's held-out loss is noisy, its last epoch knows the motion best")
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def _data_of(run_dir: str) -> str:
    particles = load_run(run_dir).paths["particles"]
    return os.path.dirname(os.path.abspath(particles))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    reuse = dict(item.split("=", 1) for item in args.run)
    results = []
    for name in args.datasets:
        if name in reuse:
            run_dir: Optional[str] = reuse[name]
            data = _data_of(run_dir)
        else:
            data = make_data(name, os.path.join(args.outdir, name, "data"), args.n_particles, args.seed)
            run_dir = train(data, os.path.join(args.outdir, name, "run"), args.minutes, args.box, args.seed)
        results.append(evaluate(name, data, run_dir, args.seeds, args.bootstrap, args.epoch))
        print(f"{name}: {results[-1]['verdict']}", flush=True)
    print(f"\nmachine: {one_line()}\n")
    print(markdown(results))
    for r in results:
        boot = ", ".join(f"{b} {lo:+.3f} … {hi:+.3f}" for b, (lo, _, hi) in r["bootstrap_vs_baselines"].items())
        print(f"\n{r['dataset']}: {r['moving_voxels']} of {r['support_voxels']} support voxels move "
              f"> {r['threshold_angstrom']:.1f} Å; {CHOSEN} − baseline AUC, 95 % bootstrap: {boot}; "
              f"verdict {r['verdict']}")
        if "regions" in r:
            reg = r["regions"]
            rows = "; ".join(f"domain {x['domain']}: {x['share_in_majority']:.0%} of {x['moving_voxels']} "
                             f"moving voxels in region {x['majority_region']}" for x in reg["domains"])
            print(f"  regions: {reg['n_regions']} found; {rows}; separated: {reg['separated']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": describe(), "results": results}, fh, indent=2)
    passed = all(r["verdict"] == "PASS" for r in results)
    print(f"\nOVERALL: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
