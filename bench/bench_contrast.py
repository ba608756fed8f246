"""How reliably does the contrast check tell RELION- from cryoDRGN-convention particles?

Statistic: :mod:`cryoformer.physics.contrast` (phase-flipped, re-centred, the Fourier
coefficients at |k| ∈ {1, √2} per image; a t-test across images). Datasets, each projected once
(2000 particles, D = 64, default CTF ranges of ``cryoformer simulate``) and re-noised per trial
the way ``simulate`` does (σ² = var(signal inside the particle) / SNR, one σ per stack):

* ``hinged``: the embedded hinged molecule at ``simulate``'s defaults (3 Å/px, no shifts);
* ``hinged-noctf``: the same projections without CTF (``--no-ctf``);
* ``demo``: the demo's parameters (hinged, 3 Å/px, shifts ±2 px);
* ``adk``: adenylate kinase's closed→open trajectory as ``bench_vs_cryodrgn.py`` builds it
  (1.5 Å/px, shifts ±3 px; needs ``MDAnalysisTests``, skipped with a note when missing);
* ``demo-files``: the demo's own dataset (``examples.example_dataset``: SNR 1, written to disk
  as RELION-convention particles) through ``estimate_contrast_from_source``, and the same stack
  negated (cryoDRGN convention).

Both conventions (RELION: −signal, cryoDRGN: +signal; without CTF +projection reads cryoDRGN),
SNR 1, 0.1, 0.01, ``--seeds`` noise draws each. Also: the images needed (random subsets of the
SNR-0.01 stacks), the null (pure noise, where any verdict is wrong), the brief's first idea (a
real-space disk minus annulus) for comparison, and time per 1000 images.

    python bench/bench_contrast.py -o bench_out/contrast

Prints markdown tables for docs/benchmarks.md and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402

SNRS = (1.0, 0.1, 0.01)
CONVENTIONS = ("relion", "cryodrgn")
SUBSET_SIZES = (25, 50, 100, 200, 500, 1000, 2000)


def draw_ctf(n: int, D: int, apix: float, rng: np.random.Generator) -> np.ndarray:
    """``[n, 9]`` CTF rows drawn from ``cryoformer simulate``'s default ranges."""
    from cryoformer.metadata import CtfParameters
    from cryoformer.simulation.simulate import CtfRanges

    r = CtfRanges()
    dfu = rng.uniform(r.defocus_min_angstrom, r.defocus_max_angstrom, n)
    return CtfParameters.from_columns(
        n, box_size=D, pixel_size_angstrom=apix, defocus_u_angstrom=dfu,
        defocus_v_angstrom=dfu - rng.uniform(0.0, r.astigmatism_max_angstrom, n),
        astigmatism_angle_deg=rng.uniform(0.0, 180.0, n), voltage_kv=r.voltage_kv,
        spherical_aberration_mm=r.spherical_aberration_mm, amplitude_contrast=r.amplitude_contrast,
        phase_shift_deg=r.phase_shift_deg).array


def project_states(volumes: np.ndarray, n: int, seed: int, shift_range_px: float):
    """Clean projections ``[n, D, D]`` of random states at uniform rotations and shifts.

    The datasets here project centred and move the projections by ``shift_images`` instead
    (the same −s move, 3× cheaper than projecting at a shift)."""
    import torch

    from cryoformer.physics.projector import project
    from cryoformer.physics.rotations import random_rotations

    rng = np.random.default_rng(seed)
    vols = torch.from_numpy(np.asarray(volumes, np.float32))  # [K, D, D, D]
    states = rng.integers(0, vols.shape[0], n)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(seed))  # [n, 3, 3]
    shifts = torch.from_numpy(rng.uniform(-shift_range_px, shift_range_px, (n, 2)).astype(np.float32))
    clean = torch.empty((n, vols.shape[-1], vols.shape[-1]))  # [n, D, D]
    for k in np.unique(states):
        sel = torch.from_numpy(states == k)
        clean[sel] = project(vols[k], rot[sel], shifts[sel] if shift_range_px else None)
    return clean, shifts.numpy()


def with_ctf(clean, ctf_rows, shift_to=None):
    """``(signal, σ² scale)``: CTF-modulated cryoDRGN-convention signal and var inside support."""
    import torch

    from cryoformer.physics.ctf import apply_ctf, ctf_images
    from cryoformer.physics.fourier import shift_images
    from cryoformer.physics.noise import particle_support_mask

    if shift_to is not None:  # move by −s, as projecting with the shift does
        clean = shift_images(clean, torch.from_numpy(shift_to))
    signal = clean if ctf_rows is None else apply_ctf(clean, ctf_images(ctf_rows, clean.shape[-1]))
    mask = particle_support_mask(clean)
    return signal, float(signal[mask].double().var())


def build_datasets(outdir: str, n: int, seed: int, log) -> dict:
    """Noise-free signals of every in-memory dataset (cached as ``.npz`` in ``outdir``)."""
    import torch

    from cryoformer.simulation.sources import maps_from_hinged_molecule

    out = {}
    cache = os.path.join(outdir, "signals.npz")
    if os.path.isfile(cache):
        z = np.load(cache, allow_pickle=False)
        for name in sorted({k.split("/")[0] for k in z.files}):
            out[name] = {key: z[f"{name}/{key}"] for key in ("signal", "ctf", "shifts", "var_in", "apix")}
            for key in ("ctf", "shifts"):
                if out[name][key].size == 0:
                    out[name][key] = None
        log(f"reused {cache}")
        return out
    rng = np.random.default_rng(seed)
    t0 = time.time()
    maps = maps_from_hinged_molecule(10, 64, 3.0)
    clean, _ = project_states(maps.volumes, n, seed, 0.0)
    ctf = draw_ctf(n, 64, 3.0, rng)
    sig, var = with_ctf(clean, ctf)
    out["hinged"] = dict(signal=sig, ctf=ctf, shifts=None, var_in=var, apix=3.0)
    sig, var = with_ctf(clean, None)
    out["hinged-noctf"] = dict(signal=sig, ctf=None, shifts=None, var_in=var, apix=3.0)
    shifts = rng.uniform(-2.0, 2.0, (n, 2)).astype(np.float32)
    sig, var = with_ctf(clean, ctf, shift_to=shifts)
    out["demo"] = dict(signal=sig, ctf=ctf, shifts=shifts, var_in=var, apix=3.0)
    log(f"hinged projections: {time.time() - t0:.0f} s")
    try:
        from MDAnalysisTests.datafiles import DCD, PSF
    except ImportError:
        log("MDAnalysisTests is not installed: AdK skipped (pip install MDAnalysisTests)")
    else:
        from cryoformer.simulation.sources import maps_from_trajectory

        t0 = time.time()
        maps = maps_from_trajectory(PSF, DCD, 10, 64, 1.5)
        clean, _ = project_states(maps.volumes, n, seed + 1, 0.0)
        shifts = rng.uniform(-3.0, 3.0, (n, 2)).astype(np.float32)
        ctf = draw_ctf(n, 64, 1.5, rng)
        sig, var = with_ctf(clean, ctf, shift_to=shifts)
        out["adk"] = dict(signal=sig, ctf=ctf, shifts=shifts, var_in=var, apix=1.5)
        log(f"AdK projections: {time.time() - t0:.0f} s")
    for d in out.values():
        d["signal"] = d["signal"].numpy() if isinstance(d["signal"], torch.Tensor) else d["signal"]
    flat = {f"{name}/{k}": (np.zeros(0) if v is None else np.asarray(v))
            for name, d in out.items() for k, v in d.items()}
    np.savez(cache, **flat)
    return out


def noisy(d: dict, convention: str, snr: float, seed: int):
    """One noisy stack: ``sign · signal + σ·noise`` (sign −1 for RELION)."""
    import torch

    sign = -1.0 if convention == "relion" else 1.0
    g = torch.Generator().manual_seed(seed)
    sig = torch.from_numpy(d["signal"])
    return sign * sig + math.sqrt(float(d["var_in"]) / snr) * torch.randn(sig.shape, generator=g)


def verdict_counts(zs, truth, margin):
    zs = np.asarray(zs)
    right = zs >= margin if truth == "cryodrgn" else zs <= -margin
    wrong = zs <= -margin if truth == "cryodrgn" else zs >= margin
    return int(right.sum()), int(wrong.sum()), int((~right & ~wrong).sum())


def disk_annulus_z(d: dict, convention: str, snr: float, radius_frac: float, seed: int,
                   outer: Optional[float] = 1.4, weight: str = "flip") -> float:
    """A real-space alternative, for comparison: flip (``weight="ctf"``: multiply by the CTF,
    a Wiener-like weighting), re-centre, low-pass to 1/20 Å, then mean in a disk of radius
    ``radius_frac·D`` minus the mean in the annulus out to ``outer`` × that radius (capped at
    D/2; ``None``: the whole rest of the box); z of that difference across images (positive =
    cryoDRGN)."""
    import torch

    from cryoformer.physics.ctf import ctf_images
    from cryoformer.physics.fourier import fft2_center, frequency_grid_2d, ifft2_center

    img = noisy(d, convention, snr, seed)
    D = img.shape[-1]
    F = fft2_center(img)
    k = frequency_grid_2d(D, 1.0)  # [D, D, 2] cycles/px
    if d["shifts"] is not None:
        s = torch.from_numpy(np.asarray(d["shifts"], np.float32))
        phase = -2 * math.pi * (k * s[:, None, None, :]).sum(-1)
        F = F * torch.polar(torch.ones_like(phase), phase)
    if d["ctf"] is not None:
        C = ctf_images(d["ctf"], D)
        F = F * (torch.sign(C) if weight == "flip" else C)
    f_angstrom = k.norm(dim=-1) / float(d["apix"])
    F = F * torch.exp(-((f_angstrom * 20.0) ** 2) * math.log(2))  # half amplitude at 1/20 Å
    low = ifft2_center(F).real  # [n, D, D]
    yy, xx = torch.meshgrid(torch.arange(D) - D // 2, torch.arange(D) - D // 2, indexing="ij")
    r = torch.sqrt((xx**2 + yy**2).float())
    r_in = radius_frac * D
    disk = r <= r_in
    ring = (r > r_in) if outer is None else (r > r_in) & (r <= min(outer * r_in, D / 2))
    diff = (low[:, disk].mean(-1) - low[:, ring].mean(-1)).double()
    return float(diff.mean() / diff.std() * math.sqrt(len(diff)))


RING_EDGES = ((0.5, 1.01), (1.01, 1.5), (1.5, 2.01), (2.01, 2.3), (2.3, 2.9))  # |k| = 1, √2, 2, √5, √8


def ring_z(volume: np.ndarray, apix: float, n: int = 400, seed: int = 3) -> list:
    """Noise-free z of the flipped coefficients in each ring of :data:`RING_EDGES` (cryoDRGN
    convention, so positive = the ring votes for the right convention) over ``n`` random views."""
    import torch

    from cryoformer.physics.ctf import ctf_images
    from cryoformer.physics.fourier import fft2_center, frequency_grid_2d

    D = volume.shape[-1]
    clean, _ = project_states(volume[None], n, seed, 0.0)
    ctf = draw_ctf(n, D, apix, np.random.default_rng(seed))
    signal, _ = with_ctf(clean, ctf)
    flipped = fft2_center(signal).real * torch.sign(ctf_images(ctf, D))  # [n, D, D]
    kappa = frequency_grid_2d(D, 1.0).norm(dim=-1) * D  # [D, D] Fourier px
    out = []
    for lo, hi in RING_EDGES:
        x = flipped[:, (kappa > lo) & (kappa <= hi)].sum(-1).double()
        out.append(float(x.mean() / x.std() * math.sqrt(n)))
    return out


def tight_boxes(log) -> list:
    """Ring signs when the box is barely larger than the particle (why the band stops at √2)."""
    import dataclasses

    from cryoformer.simulation.hinged import HingedMoleculeConfig, hinged_state_volumes

    rows = []
    for fill in (0.6, 0.8, 0.95):
        cfg = dataclasses.replace(HingedMoleculeConfig(), box_fill=fill)
        vol = hinged_state_volumes(1, 48, 4.0, cfg)[0].astype(np.float32)
        rows.append(dict(data=f"hinged, diameter {fill:g}·D (D = 48, 4 Å/px)", z=ring_z(vol, 4.0)))
    try:
        from MDAnalysisTests.datafiles import DCD, PSF
    except ImportError:
        return rows
    from cryoformer.simulation.sources import maps_from_trajectory

    for D, apix in ((64, 1.5), (48, 1.5), (40, 1.5)):
        vol = maps_from_trajectory(PSF, DCD, 1, D, apix).volumes[0]
        rows.append(dict(data=f"AdK, D = {D} at {apix:g} Å/px ({D * apix:g} Å box)", z=ring_z(vol, apix)))
    log("tight boxes: done")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--outdir", default="bench_out/contrast")
    p.add_argument("-n", "--n-particles", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=5, help="noise draws per dataset/convention/SNR")
    p.add_argument("--null-stacks", type=int, default=40, help="pure-noise stacks of n images")
    p.add_argument("--demo-data", help="an existing demo dataset directory (e.g. demo_out/data) instead of "
                   "simulating one (2000 particles, ~2.5 min)")
    p.add_argument("--subset-trials", type=int, default=40, help="random subsets per size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from cryoformer.physics.contrast import (DEFAULT_MARGIN_Z, contrast_statistic, estimate_contrast,
                                             estimate_contrast_from_source, summarize_contrast)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(args.outdir, exist_ok=True)
    margin = DEFAULT_MARGIN_Z
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    data = build_datasets(args.outdir, args.n_particles, args.seed, log)
    results = {"machine": machine.describe(), "margin_z": margin, "n_particles": args.n_particles}

    # 1. Full stacks: every dataset × convention × SNR × seed; keep each stack's u values.
    trials, u_store = [], {}
    for name, d in data.items():
        for conv in CONVENTIONS:
            for snr in SNRS:
                zs = []
                for s in range(args.seeds):
                    img = noisy(d, conv, snr, 1000 * s + 17)
                    u = contrast_statistic(img, d["ctf"], d["shifts"])
                    est = summarize_contrast(u, margin)
                    zs.append(est.z_score)
                    u_store[(name, conv, snr, s)] = u.numpy()
                right, wrong, und = verdict_counts(zs, conv, margin)
                trials.append(dict(dataset=name, convention=conv, snr=snr, z=zs, right=right, wrong=wrong,
                                   undecided=und, mean_u=float(np.mean([u_store[(name, conv, snr, s)].mean()
                                                                         for s in range(args.seeds)]))))
        log(f"{name}: done")
    results["trials"] = trials

    # 2. Images needed: random subsets of the SNR-0.01 stacks (disjoint noise seeds rotate).
    rng = np.random.default_rng(args.seed + 5)
    needed = []
    for name in data:
        for conv in CONVENTIONS:
            row = {"dataset": name, "convention": conv, "sizes": {}}
            for size in SUBSET_SIZES:
                zs = []
                for t in range(args.subset_trials if size < args.n_particles else args.seeds):
                    u = u_store[(name, conv, 0.01, t % args.seeds)]
                    pick = rng.choice(u.size, size=min(size, u.size), replace=False)
                    zs.append(summarize_contrast(u[pick], margin).z_score)
                right, wrong, und = verdict_counts(zs, conv, margin)
                row["sizes"][size] = dict(right=right, wrong=wrong, undecided=und, median_z=float(np.median(zs)))
            u_all = np.concatenate([u_store[(name, conv, 0.01, s)] for s in range(args.seeds)])
            row["images_for_margin"] = int(math.ceil((margin * u_all.std() / abs(u_all.mean())) ** 2))
            needed.append(row)
    results["images_needed"] = needed
    log("subsets: done")

    # 3. Null: white noise with the hinged CTF rows and demo shifts; any verdict is wrong.
    ref = data["demo"]
    null_z, null_small = [], []
    g = torch.Generator().manual_seed(args.seed + 99)
    for s in range(args.null_stacks):
        img = torch.randn(ref["signal"].shape, generator=g)
        u = contrast_statistic(img, ref["ctf"], ref["shifts"]).numpy()
        null_z.append(summarize_contrast(u, margin).z_score)
        for a in range(0, u.size - 49, 50):  # disjoint 50-image subsets: the smallest verdict
            null_small.append(summarize_contrast(u[a:a + 50], margin, min_images=1).z_score)
    results["null"] = dict(stacks=len(null_z), max_abs_z=float(np.max(np.abs(null_z))),
                           n50_subsets=len(null_small), n50_max_abs_z=float(np.max(np.abs(null_small))),
                           n50_over_margin=int(np.sum(np.abs(null_small) >= margin)))
    log("null: done")

    # 4. The real-space disk − annulus statistic at a few radii (SNR 0.1, seed 0, RELION-convention data:
    #    a correct statistic is negative).
    comparison = []
    for name, d in data.items():
        if name == "hinged-noctf":
            continue
        row = {"dataset": name, "band_statistic": float(summarize_contrast(u_store[(name, "relion", 0.1, 0)]).z_score)}
        for frac in (0.15, 0.25, 0.35):
            row[f"disk_{frac}"] = disk_annulus_z(d, "relion", 0.1, frac, 17)
            row[f"disk_{frac}_vs_box"] = disk_annulus_z(d, "relion", 0.1, frac, 17, outer=None)
            row[f"disk_{frac}_vs_box_ctf"] = disk_annulus_z(d, "relion", 0.1, frac, 17, outer=None, weight="ctf")
        comparison.append(row)
    results["disk_annulus"] = comparison
    log("comparison: done")
    rings = tight_boxes(log)
    results["ring_z"] = rings

    # 5. The demo's own files, through the ImageSource helper.
    from cryoformer.examples import example_dataset
    from cryoformer.io import open_particles, read_ctf_pkl, read_poses_pkl, write_stack

    if args.demo_data:
        particles, poses_path, ctf_path = (os.path.join(args.demo_data, f) for f in
                                           ("particles.mrcs", "poses.pkl", "ctf.pkl"))
    else:
        ds = example_dataset(os.path.join(args.outdir, "demo_files"))
        particles, poses_path, ctf_path = ds.particles, ds.poses, ds.ctf
    with open_particles(particles) as src:
        box, apix = src.box_size, src.pixel_size_angstrom
    poses = read_poses_pkl(poses_path, box_size=box)
    ctf = read_ctf_pkl(ctf_path)
    os.makedirs(os.path.join(args.outdir, "demo_files"), exist_ok=True)
    flipped = os.path.join(args.outdir, "demo_files", "particles_cryodrgn.mrcs")
    if not os.path.isfile(flipped):
        with open_particles(particles) as src:
            write_stack(flipped, -src.images(np.arange(len(src))), apix)
    demo_files = []
    for conv, path in (("relion", particles), ("cryodrgn", flipped)):
        with open_particles(path) as src:
            t0 = time.perf_counter()
            est = estimate_contrast_from_source(src, poses, ctf)
            dt = time.perf_counter() - t0
            sub = [estimate_contrast_from_source(src, poses, ctf, max_images=100, seed=s).z_score for s in range(20)]
        demo_files.append(dict(convention=conv, verdict=est.convention, z=est.z_score, n=est.n_images,
                               seconds=dt, z_100_images=sub, right_100=verdict_counts(sub, conv, margin)))
    results["demo_files"] = demo_files
    log("demo files: done")

    # 6. Time per 1000 images (median of 3): in memory at D = 64 and 256, and from disk at D = 64.
    timing = {}
    for D in (64, 256):
        img = torch.randn((1000, D, D), generator=g)
        ctf_rows = draw_ctf(1000, D, 3.0 * 64 / D, np.random.default_rng(1))
        shifts = np.random.default_rng(2).uniform(-2, 2, (1000, 2)).astype(np.float32)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            estimate_contrast(img, ctf_rows, shifts)
            runs.append(time.perf_counter() - t0)
        timing[f"memory_D{D}_s_per_1000"] = float(np.median(runs))
    with open_particles(particles) as src:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            estimate_contrast_from_source(src, poses.subset(np.arange(1000)), ctf.subset(np.arange(1000)),
                                          rows=np.arange(1000))
            runs.append(time.perf_counter() - t0)
    timing["disk_D64_s_per_1000"] = float(np.median(runs))
    results["timing"] = timing
    results["wall_s"] = time.time() - t_start

    with open(os.path.join(args.outdir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)

    # Markdown.
    print(f"\nmachine: {machine.one_line()}; margin |z| ≥ {margin:g}; {args.n_particles} images per stack\n")
    print("| data | convention | SNR | right / wrong / undecided | z (min … max) | mean u |")
    print("|---|---|---|---|---|---|")
    for t in trials:
        print(f"| {t['dataset']} | {t['convention']} | {t['snr']:g} | {t['right']} / {t['wrong']} / {t['undecided']} "
              f"| {min(t['z']):+.1f} … {max(t['z']):+.1f} | {t['mean_u']:+.3f} |")
    print("\nSNR 0.01, random subsets: right / wrong / undecided (median z)\n")
    print("| data | convention | " + " | ".join(f"n = {s}" for s in SUBSET_SIZES) + " | n for |z| = margin |")
    print("|---|---|" + "---|" * len(SUBSET_SIZES) + "---|")
    for row in needed:
        cells = [f"{c['right']}/{c['wrong']}/{c['undecided']} ({c['median_z']:+.1f})" for c in row["sizes"].values()]
        print(f"| {row['dataset']} | {row['convention']} | " + " | ".join(cells) + f" | {row['images_for_margin']} |")
    nl = results["null"]
    print(f"\nnull (pure noise): {nl['stacks']} stacks of {args.n_particles}: max |z| {nl['max_abs_z']:.2f}; "
          f"{nl['n50_subsets']} stacks of 50: max |z| {nl['n50_max_abs_z']:.2f}, "
          f"{nl['n50_over_margin']} over the margin")
    print("\nRELION-convention data at SNR 0.1 (correct sign: negative)\n")
    print("| data | band |k| ≤ 1.5 | disk r − annulus to 1.4 r: r = 0.15·D / 0.25·D / 0.35·D "
          "| disk r − rest of box: 0.15·D / 0.25·D / 0.35·D | same, CTF-weighted instead of flipped |")
    print("|---|---|---|---|---|")
    for row in comparison:
        ann = " / ".join(f"{row[f'disk_{f}']:+.1f}" for f in (0.15, 0.25, 0.35))
        box = " / ".join(f"{row[f'disk_{f}_vs_box']:+.1f}" for f in (0.15, 0.25, 0.35))
        ctfw = " / ".join(f"{row[f'disk_{f}_vs_box_ctf']:+.1f}" for f in (0.15, 0.25, 0.35))
        print(f"| {row['dataset']} | {row['band_statistic']:+.1f} | {ann} | {box} | {ctfw} |")
    print("\nnoise-free z per ring of the flipped spectrum, 400 views (positive = right sign)\n")
    print("| data | |k| = 1 | √2 | 2 | √5 | √8 |")
    print("|---|---|---|---|---|---|")
    for row in rings:
        print(f"| {row['data']} | " + " | ".join(f"{v:+.1f}" for v in row["z"]) + " |")
    print("\ndemo files (SNR 1):")
    for r in demo_files:
        print(f"  {r['convention']}: verdict {r['verdict']}, z {r['z']:+.1f} over {r['n']} images "
              f"in {r['seconds']:.2f} s; "
              f"20 samples of 100 images: right/wrong/undecided {r['right_100']}, z {min(r['z_100_images']):+.1f} … "
              f"{max(r['z_100_images']):+.1f}")
    print("\ntiming (s per 1000 images): " + ", ".join(f"{k} {v:.3f}" for k, v in timing.items()))
    print(f"wall time {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
