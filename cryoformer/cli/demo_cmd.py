"""``cryoformer demo``: the README's first command, on the embedded hinged molecule.

Until the trainer lands this runs the simulation half of the pipeline: it simulates a dataset
with ground truth, reads its own outputs back through the RELION and cryoDRGN readers, checks
them against the ground truth, measures how different the end states are (FSC), and draws an
overview figure.
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="simulate the embedded hinged molecule and check the outputs (the README's demo)",
        description="Simulate a dataset from the embedded hinged molecule (D=64 px, 3 Å/px by default), "
                    "read it back, verify it against the ground truth and draw an overview figure.",
    )
    p.add_argument("-o", "--outdir", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("-n", "--n-particles", type=int, default=2000, help="particles (default 2000)")
    p.add_argument("-D", "--box", type=int, default=64, help="box size in pixels (default 64)")
    p.add_argument("--Apix", type=float, default=3.0, help="pixel size in Å/px (default 3.0)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def _overview_figure(path, maps, particles, fsc_curve, apix, res05):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    K = maps.shape[0]
    picks = [0, K // 2, K - 1]
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.5))
    for ax, k in zip(axes[0, :3], picks):
        ax.imshow(maps[k].sum(axis=0), cmap="gray", origin="lower")
        ax.set_title(f"state {k}: projection along z")
    freq, curve = fsc_curve
    ax = axes[0, 3]
    ax.plot(freq[1:] / apix, curve[1:], lw=2)
    ax.axhline(0.5, ls="--", c="gray", lw=1)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"state 0 vs {K - 1}: FSC=0.5 at {res05:.1f} Å")
    for j, ax in enumerate(axes[1]):
        ax.imshow(particles[j], cmap="gray", origin="lower")
        ax.set_title(f"particle {j}")
    for ax in list(axes[0, :3]) + list(axes[1]):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("cryoformer demo: embedded hinged molecule, simulated particles")
    fig.tight_layout()
    from cryoformer.io.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run(args) -> int:
    import time

    import numpy as np
    import torch

    from cryoformer.io.cryodrgn import read_poses_pkl
    from cryoformer.io.particles import open_particles
    from cryoformer.io.star import poses_from_star, read_star
    from cryoformer.metrics.fsc import fsc, resolution_at
    from cryoformer.physics.rotations import geodesic_distance
    from cryoformer.simulation.simulate import CtfRanges, SimulationConfig, simulate_dataset
    from cryoformer.simulation.sources import maps_from_hinged_molecule

    t0 = time.time()
    data_dir = os.path.join(args.outdir, "dataset")
    print(f"[1/3] simulating {args.n_particles} particles of the hinged molecule "
          f"(D={args.box}, {args.Apix} Å/px, SNR {args.snr}, CTF, shifts ±4 px)")
    maps = maps_from_hinged_molecule(10, args.box, args.Apix)
    config = SimulationConfig(n_particles=args.n_particles, snr=args.snr, shift_range_px=4.0,
                              ctf=CtfRanges(), contrast="relion", seed=args.seed)
    result = simulate_dataset(maps.volumes, maps.pixel_size_angstrom, config, data_dir,
                              motion_map=maps.motion_map, source_description=maps.description)

    print("[2/3] reading the dataset back through the RELION and cryoDRGN readers")
    gt = read_poses_pkl(result.files["gt_poses"], box_size=args.box)
    star = poses_from_star(read_star(result.files["star"]))
    rot_err = geodesic_distance(torch.from_numpy(star.rotations), torch.from_numpy(gt.rotations))
    shift_err = np.abs(star.shifts_px - gt.shifts_px).max()
    source = open_particles(result.files["star"])
    particles = source.images(np.arange(4))
    print(f"      particles.star: {len(source)} images, max rotation difference to ground truth "
          f"{float(rot_err.max()):.2e} rad, max shift difference {shift_err:.2e} px")
    print(f"      target SNR {args.snr}, measured {result.measured_snr:.4f}")

    print("[3/3] how different are the end states?")
    freq, curve = fsc(maps.volumes[0], maps.volumes[-1])
    freq, curve = np.asarray(freq), np.asarray(curve)
    res05 = resolution_at(freq, curve, 0.5, args.Apix)
    support = maps.volumes.max(axis=0) > 0.05 * maps.volumes.max()  # voxels the molecule ever occupies
    moving = (maps.motion_map[support] > 5.0).mean()
    print(f"      FSC(state 0, state 9) = 0.5 at {res05:.1f} Å (Nyquist {2 * args.Apix:.1f} Å); "
          f"{100 * moving:.0f} % of the molecule's voxels move by more than 5 Å")
    figure = os.path.join(args.outdir, "overview.png")
    _overview_figure(figure, maps.volumes, particles, (freq, curve), args.Apix, res05)

    print(f"\ndone in {time.time() - t0:.0f} s. Outputs:")
    print(f"  particles      {result.files['particles']}  (+ particles.star, poses.pkl, ctf.pkl)")
    print(f"  ground truth   {os.path.join(data_dir, 'gt')}/  (state maps, labels, poses, motion map)")
    print(f"  record         {result.files['record']}")
    print(f"  overview plot  {figure}")
    return 0
