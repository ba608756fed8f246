"""Time-to-quality against cryoDRGN on a real protein trajectory (docs/benchmarks.md).

Dataset: adenylate kinase's closed→open transition (the DIMS trajectory shipped in the
``MDAnalysisTests`` package; 1656 heavy atoms), sampled into ``--n-states`` states, simulated
at D=64, 1.5 Å/px, SNR 0.1, CTF, shifts, RELION-style contrast (``cryoformer simulate``).

Each tool trains on the same particles for the same wall-clock budget on this machine, one
after the other (never concurrently). Then, for each ground-truth state, a volume is decoded at
the mean latent of that state's particles and compared with the state's map (docs/conventions.md,
"Metrics"): FSC-0.5 resolution (Å) and AU-FSC, averaged over states. cryoDRGN runs from its own
virtual environment (created here from PyPI when missing, with the CPU torch pinned).

Smaller budgets are read off the same runs (``--eval-minutes 10,20,30``): each tool is scored
at the last epoch it had written by then (file times from the start of its process) — for
cryoformer, the epoch with the lowest held-out image loss among those, i.e. what
``cryoformer analyze`` would have used had the run been stopped there.

    python bench/bench_vs_cryodrgn.py --budget-minutes 30 --eval-minutes 10,20,30 -o bench_out/vs_cryodrgn

Prints a markdown row per tool for docs/benchmarks.md and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402

REPO = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(sys.executable)


def sh(cmd, timeout=None, log=None, env=None):
    """Run a command, echoing it; returns the exit status (124 on timeout)."""
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    out = open(log, "w") if log else None
    try:
        return subprocess.run([str(c) for c in cmd], timeout=timeout, stdout=out, stderr=subprocess.STDOUT if out else None,
                              env=env).returncode
    except subprocess.TimeoutExpired:
        return 124
    finally:
        if out:
            out.close()


def ensure_cryodrgn(venv: str, version: str) -> str:
    """Path of the ``cryodrgn`` executable, installing it into ``venv`` if needed."""
    exe = os.path.join(venv, "bin", "cryodrgn")
    if not os.path.exists(exe):
        sh([sys.executable, "-m", "venv", venv])
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
        sh(pip + ["torch==2.13.0"])  # CPU build first, so cryodrgn adds no CUDA packages
        sh(pip + [f"cryodrgn=={version}"])
    return exe


def make_dataset(out: str, n_particles: int, n_states: int, seed: int) -> str:
    if os.path.exists(os.path.join(out, "simulation.json")):
        return out
    try:
        from MDAnalysisTests.datafiles import DCD, PSF
    except ImportError:
        sh([sys.executable, "-m", "pip", "install", "-q", "MDAnalysisTests"])
        from MDAnalysisTests.datafiles import DCD, PSF
    rc = sh([os.path.join(VENV_BIN, "cryoformer"), "simulate", "--trajectory", PSF, DCD, "--n-states", n_states,
             "-D", 64, "--Apix", 1.5, "-n", n_particles, "--snr", 0.1, "--shift-range", 3, "--seed", seed,
             "-o", out])
    if rc:
        raise SystemExit("simulation failed")
    return out


def per_state_scores(volumes: dict, data: str) -> dict:
    """Each state's decoded volume against its map: FSC-0.5 resolution and AU-FSC; then the
    scores a single consensus map cannot pass (docs/conventions.md, "Metrics"), each beside
    what the consensus of the true maps gets: the difference-map correlation (8 Å low-pass,
    on the molecule's support; the consensus scores 0) and the mean FSC-0.5 inside a soft mask
    around the voxels that move more than a voxel (``gt/motion.mrc``)."""
    from cryoformer.analysis.evaluation import support_mask
    from cryoformer.io.mrc import read_volume
    from cryoformer.metrics.fsc import FscResult
    from cryoformer.metrics.heterogeneity import difference_map_correlation, motion_mask

    states = sorted(volumes)
    truth = {k: read_volume(os.path.join(data, "gt", f"state_{k:03d}.mrc")) for k in states}
    apix = truth[states[0]][1]
    maps = np.stack([truth[k][0] for k in states])  # [K, D, D, D]
    consensus = maps.mean(axis=0)
    rows = {}
    for k in states:
        res = FscResult.compute(volumes[k], truth[k][0], apix)
        rows[k] = {"fsc05_angstrom": res.resolution(0.5), "au_fsc": res.au_fsc}
    out = {
        "per_state": rows,
        "mean_fsc05_angstrom": float(np.mean([r["fsc05_angstrom"] for r in rows.values()])),
        "mean_au_fsc": float(np.mean([r["au_fsc"] for r in rows.values()])),
        "consensus_mean_fsc05_angstrom": float(np.mean(
            [FscResult.compute(consensus, truth[k][0], apix).resolution(0.5) for k in states])),
    }
    recovered = np.stack([np.asarray(volumes[k], np.float64) for k in states])
    support = support_mask(maps)
    out["difference_map_correlation"] = difference_map_correlation(recovered, maps, apix, 8.0, support)
    motion_path = os.path.join(data, "gt", "motion.mrc")
    if os.path.isfile(motion_path):
        moving = motion_mask(read_volume(motion_path)[0], apix)
        out["moving_fsc05_angstrom"] = float(np.mean(
            [FscResult.compute(volumes[k], truth[k][0], apix, mask=moving).resolution(0.5) for k in states]))
        out["consensus_moving_fsc05_angstrom"] = float(np.mean(
            [FscResult.compute(consensus, truth[k][0], apix, mask=moving).resolution(0.5) for k in states]))
    return out


def state_means(z: np.ndarray, labels: np.ndarray) -> dict:
    return {int(k): z[labels == k].mean(axis=0) for k in np.unique(labels)}


def finished_by(paths_by_epoch: dict, t0: float, budget_min: float):
    """Epochs whose output file was written within ``budget_min`` minutes after ``t0`` (file
    mtime; files older than ``t0`` belong to an earlier run and do not count)."""
    return sorted(e for e, path in paths_by_epoch.items()
                  if 0 <= os.path.getmtime(path) - t0 <= 60 * budget_min)


def train_cryodrgn(exe: str, data: str, out: str, budget_min: float, zdim: int, extra) -> dict:
    os.makedirs(out, exist_ok=True)
    cmd = [exe, "train_vae", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
           "--ctf", os.path.join(data, "ctf.pkl"), "--zdim", zdim, "-n", 10000, "-o", out, "--no-analysis"] + extra
    t0 = time.time()
    sh(cmd, timeout=budget_min * 60, log=os.path.join(out, "stdout.log"))
    info = {"t0": t0, "wall_s": time.time() - t0, "command": " ".join(map(str, cmd))}
    with open(os.path.join(out, "bench_timing.json"), "w") as fh:
        json.dump(info, fh)
    return info


def score_cryodrgn(exe: str, data: str, out: str, epoch: int) -> dict:
    """Per-state scores after cryoDRGN's epoch ``epoch`` (4.3.1 numbers its files 1, 2, …:
    ``weights.N.pkl`` / ``z.N.pkl`` after N epochs)."""
    import pickle

    with open(os.path.join(out, f"z.{epoch}.pkl"), "rb") as fh:  # cryoDRGN's own output
        z = pickle.load(fh)
    z = np.asarray(z[0] if isinstance(z, tuple) else z)
    labels = np.load(os.path.join(data, "gt", "state.npy"))
    means = state_means(z, labels)
    zfile = os.path.join(out, f"zstates.{epoch}.txt")
    np.savetxt(zfile, np.stack([means[k] for k in sorted(means)]))
    voldir = os.path.join(out, f"vols.{epoch}")
    weights = os.path.join(out, f"weights.{epoch}.pkl")
    if not os.path.isdir(voldir) or os.path.getmtime(voldir) < os.path.getmtime(weights):
        sh([exe, "eval_vol", os.path.join(out, f"weights.{epoch}.pkl"), "-c", os.path.join(out, "config.yaml"),
            "--zfile", zfile, "-o", voldir, "--Apix", 1.5])
    from cryoformer.io.mrc import read_volume

    paths = sorted(glob.glob(os.path.join(voldir, "*.mrc")))
    if len(paths) != len(means):
        raise RuntimeError(f"cryodrgn eval_vol wrote {len(paths)} maps to {voldir}, expected {len(means)}")
    vols = {k: read_volume(paths[i])[0] for i, k in enumerate(sorted(means))}
    scores = per_state_scores(vols, data)
    # cryoDRGN's map axes may be mirrored relative to ours; score its better hand, to be fair.
    flipped = per_state_scores({k: v[::-1].copy() for k, v in vols.items()}, data)
    if flipped["mean_au_fsc"] > scores["mean_au_fsc"]:
        scores, scores["hand"] = flipped, "flipped"
    scores["epochs_completed"] = epoch
    return scores


def cryodrgn_at_budgets(exe, data, out, info, budgets) -> dict:
    """At each budget, cryoDRGN's last epoch finished by then (what a run stopped there has)."""
    # An epoch counts when both its weights and its latents exist (the timeout's kill can fall
    # between the two writes).
    weights = {int(p.split(".")[-2]): p for p in glob.glob(os.path.join(out, "weights.*.pkl"))
               if os.path.isfile(os.path.join(out, f"z.{p.split('.')[-2]}.pkl"))}
    rows = {}
    for b in budgets:
        done = finished_by(weights, info["t0"], b)
        rows[f"{b:g}"] = (score_cryodrgn(exe, data, out, done[-1]) if done
                          else {"error": "no epoch finished within the budget"})
    return rows


def train_cryoformer(data: str, out: str, budget_min: float, zdim: int, extra) -> dict:
    cmd = [os.path.join(VENV_BIN, "cryoformer"), "train", os.path.join(data, "particles.star"), "-o", out,
           "--zdim", zdim, "--max-minutes", budget_min, "--epochs", 10000] + extra
    t0 = time.time()
    sh(cmd, log=os.path.join(os.path.dirname(out), "cryoformer_stdout.log"))
    info = {"t0": t0, "wall_s": time.time() - t0, "command": " ".join(map(str, cmd))}
    with open(os.path.join(out, "bench_timing.json"), "w") as fh:
        json.dump(info, fh)
    return info


def score_cryoformer(data: str, out: str, epoch) -> dict:
    import torch

    from cryoformer.trainer.run_dir import load_run

    run = load_run(out, epoch=epoch)
    labels = np.load(os.path.join(data, "gt", "state.npy"))[run.particle_indices]
    means = state_means(run.latents, labels)
    with torch.no_grad():
        vols = {k: run.model.decode_volume(torch.as_tensor(m, dtype=torch.float32), D=64).cpu().numpy()
                for k, m in means.items()}
    scores = per_state_scores(vols, data)
    scores["epochs_completed"] = run.epoch
    return scores


def cryoformer_at_budgets(data, out, info, budgets) -> dict:
    """At each budget, the epoch a user would analyse had the run stopped there: the lowest
    held-out image loss among the epochs written by then (``load_run``'s default), and, for
    comparison, simply the last one."""
    from cryoformer.trainer.run_dir import list_epochs
    from cryoformer.trainer.validation import read_validation

    ckpts = {e: os.path.join(out, "checkpoints", f"epoch_{e:03d}.pt") for e in list_epochs(out)}
    history = {r["epoch"]: r["heldout_mse"] for r in (read_validation(out) or {}).get("history", [])}
    rows = {}
    for b in budgets:
        done = finished_by(ckpts, info["t0"], b)
        if not done:
            rows[f"{b:g}"] = {"error": "no epoch finished within the budget"}
            continue
        scored = [e for e in done if e in history]
        pick = min(scored, key=lambda e: (history[e], e)) if scored else done[-1]
        row = score_cryoformer(data, out, pick)
        row["selected_by"] = "heldout" if scored else "latest"
        row["last_epoch"] = done[-1]
        if pick != done[-1]:
            last = score_cryoformer(data, out, done[-1])
            row["last_epoch_fsc05_angstrom"] = last["mean_fsc05_angstrom"]
            row["last_epoch_au_fsc"] = last["mean_au_fsc"]
        rows[f"{b:g}"] = row
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", default="bench_out/vs_cryodrgn", help="working directory")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training wall-clock budget per tool")
    p.add_argument("--eval-minutes", default=None,
                   help="comma-separated budgets (minutes, <= --budget-minutes) at which to score both "
                        "tools from the one run each: the epochs finished by then (default: the budget)")
    p.add_argument("--n-particles", type=int, default=5000)
    p.add_argument("--n-states", type=int, default=10)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cryodrgn-venv", default="/opt/cryodrgn-venv")
    p.add_argument("--cryodrgn-version", default="4.3.1")
    p.add_argument("--cryodrgn-args", default="", help="extra train_vae arguments (e.g. a small architecture)")
    p.add_argument("--cryoformer-args", default="", help="extra cryoformer train arguments")
    p.add_argument("--skip", choices=("cryodrgn", "cryoformer"), action="append", default=[])
    p.add_argument("--reuse", action="store_true",
                   help="score existing runs in -o again (e.g. at other --eval-minutes) instead of training")
    args = p.parse_args()

    os.makedirs(args.out, exist_ok=True)
    data = make_dataset(os.path.join(args.out, "data"), args.n_particles, args.n_states, args.seed)
    results = {"machine": machine.describe(), "budget_minutes": args.budget_minutes,
               "dataset": {"source": "AdK closed→open (MDAnalysisTests adk.psf + adk_dims.dcd)",
                           "n_particles": args.n_particles, "n_states": args.n_states, "box": 64,
                           "pixel_size_angstrom": 1.5, "snr": 0.1}}
    budgets = sorted({float(b) for b in (args.eval_minutes or f"{args.budget_minutes:g}").split(",")})
    results["eval_minutes"] = budgets
    for tool in ("cryodrgn", "cryoformer"):
        if tool in args.skip:
            continue
        out = os.path.join(args.out, tool)
        timing = os.path.join(out, "bench_timing.json")
        if args.reuse and os.path.isfile(timing):
            info = json.load(open(timing))
        elif tool == "cryodrgn":
            exe = ensure_cryodrgn(args.cryodrgn_venv, args.cryodrgn_version)
            info = train_cryodrgn(exe, data, out, args.budget_minutes, args.zdim, shlex.split(args.cryodrgn_args))
        else:
            info = train_cryoformer(data, out, args.budget_minutes, args.zdim, shlex.split(args.cryoformer_args))
        if tool == "cryodrgn":
            exe = ensure_cryodrgn(args.cryodrgn_venv, args.cryodrgn_version)
            rows = cryodrgn_at_budgets(exe, data, out, info, budgets)
        else:
            rows = cryoformer_at_budgets(data, out, info, budgets)
        results[tool] = {"command": info["command"], "wall_s": info["wall_s"], "budgets": rows}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=float)
    print(f"\nmachine: {machine.one_line()}; one {args.budget_minutes:g}-min run per tool")
    print("| budget | tool | epoch used | mean FSC-0.5 (Å) | mean AU-FSC | difference-map correlation | "
          "FSC-0.5 in the moving region (Å) | per-state FSC-0.5 (Å) |")
    print("|---|---|---|---|---|---|---|---|")
    for b in budgets:
        for tool in ("cryodrgn", "cryoformer"):
            r = results.get(tool, {}).get("budgets", {}).get(f"{b:g}")
            if r is None:
                continue
            if "mean_fsc05_angstrom" not in r:
                print(f"| {b:g} min | {tool} | – | {r.get('error')} | | |")
                continue
            used = str(r["epochs_completed"])
            if r.get("selected_by") == "heldout":
                used += f" (held-out best; last {r['last_epoch']}"
                used += (f": {r['last_epoch_fsc05_angstrom']:.2f} Å)" if "last_epoch_fsc05_angstrom" in r else ")")
            per = " ".join(f"{v['fsc05_angstrom']:.1f}" for _, v in sorted(r["per_state"].items(), key=lambda kv: int(kv[0])))
            moving = f"{r['moving_fsc05_angstrom']:.2f}" if "moving_fsc05_angstrom" in r else "–"
            print(f"| {b:g} min | {tool} | {used} | {r['mean_fsc05_angstrom']:.2f} | {r['mean_au_fsc']:.3f} | "
                  f"{r['difference_map_correlation']:.3f} | {moving} | {per} |")
    first = next((r for t in ("cryodrgn", "cryoformer") for r in results.get(t, {}).get("budgets", {}).values()
                  if "consensus_mean_fsc05_angstrom" in r), None)
    if first is not None:
        print(f"| – | consensus of the true maps (no heterogeneity) | – | {first['consensus_mean_fsc05_angstrom']:.2f} "
              f"| | 0 (by construction) | {first.get('consensus_moving_fsc05_angstrom', float('nan')):.2f} | |")


if __name__ == "__main__":
    main()
