"""What limits pose refinement on a data set: one search from perturbed poses against references
of known quality (rotation-vector noise σ = 0.1 rad, the second reading of the paper's
perturbation; docs/benchmarks.md, pose refinement).

The pipeline (``bench_pose_refinement.py``) alternates reconstruction and search, so its result
mixes the search with the quality of the references it builds. This script separates them.
Every row is *one* search of the first ``--search-particles`` particles from the same perturbed
poses, with :func:`cryoformer.refinement.search_with_references`, against:

* ``true maps`` — each particle's ground-truth state map: the limit the images' noise sets.
* ``back-projected at the true poses, true states, other half`` — gold-standard half maps of
  all particles at their *true* poses, one pair per *true* state, each particle matched
  against the half it is **not** in. The best references a reconstruction from these
  particles can give (perfect poses, perfect grouping) without the particle's own noise.
* ``… own half`` — the same maps, each particle matched against its own half (what RELION and
  the trainer do). The particle's own image sits in its reference at the pose it was inserted
  at, which pulls the search there: at the true poses that flatters the result, at wrong
  poses it holds them.
* ``back-projected at the true poses, one group, other half`` — the consensus map: what
  heterogeneity costs.
* ``model`` (with ``--run``) — a trained model's maps at 16 K-means centres of its latents,
  at the full band (the model must have been trained on the same particles, same order).

    python bench/bench_pose_limits.py --data /tmp/adk2k --sigma-rad 0.1 \\
        --run bench_out/vs_d64/cryoformer --epoch 4 -o bench_out/pose_limits_2k

Writes ``results.json`` into the output directory and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from cryoformer.metrics.pose_error import pose_error_summary
from cryoformer.refinement import PoseSearchConfig, backprojected_references, model_references, search_with_references
from cryoformer.trainer.run_dir import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402
from bench_pose_refinement import load_particles, search_particles, true_maps, write_perturbed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="simulated data set (cryoformer simulate; needs gt/)")
    ap.add_argument("-o", "--outdir", default="bench_out/pose_limits")
    ap.add_argument("--sigma-rad", type=float, default=0.1, help="rotation-vector noise σ per component (rad)")
    ap.add_argument("--shift-noise-px", type=float, default=2.0, help="shift noise U(−a, a) (px)")
    ap.add_argument("--radius-deg", type=float, default=20.0, help="search radius (deg)")
    ap.add_argument("--search-particles", type=int, default=300, help="particles searched (the first ones)")
    ap.add_argument("--run", help="a cryoformer run trained on the same particles: its maps are a row too")
    ap.add_argument("--epoch", default=None, help="epoch of --run (default: as `cryoformer analyze`)")
    ap.add_argument("--seed", type=int, default=0, help="perturbation seed is seed + 1, as bench_pose_refinement")
    return ap.parse_args(argv)


def print_table(rows: list[dict], n_particles: int, n_searched: int, sigma_rad: float) -> None:
    """The rows as a markdown table, each against the input's median error."""
    first = rows[0]["rotation_median_rad"]
    print(f"\n{machine.describe()['cpu']}, {n_particles} particles, σ = {sigma_rad:g} rad, "
          f"{n_searched} searched\n")
    print("| references | median rotation error | input / refined | median shift error |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['rotation_median_rad']:.4f} rad ({np.degrees(row['rotation_median_rad']):.2f}°) "
              f"| {first / row['rotation_median_rad']:.2f}× | {row['shift_median_px']:.2f} px |")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    noisy = write_perturbed(args.data, args.outdir, args.sigma_rad, args.shift_noise_px, args.seed)
    data, sub = load_particles(args.data, noisy, args.search_particles)
    sel = np.arange(len(sub))
    maps, states = true_maps(args.data)

    def errors(rot, shifts) -> dict:
        s = pose_error_summary(rot, sub.gt_poses.rotations, shifts, sub.gt_poses.shifts_px)
        return {"rotation_median_rad": float(s["rotation_median_rad"]), "shift_median_px": float(s["shift_median_px"])}

    search_cfg = PoseSearchConfig.from_degrees(args.radius_deg, max_frequency=0.5)
    rows = [{"row": "input (perturbed)", **errors(sub.poses.rotations, sub.poses.shifts_px)}]
    searched = search_particles(sub)

    def search(name, vols, labels, extra=None):
        t0 = time.time()
        res = search_with_references(vols, labels[sel], searched, sub.poses.rotations, sub.poses.shifts_px,
                                     search_cfg, progress=False)
        row = {"row": name, **errors(res.rotations, res.shifts_px), "prior_sigma_rad": res.prior_sigma_rad,
               "seconds": time.time() - t0, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    search("true maps", maps, states)
    true_rot, true_shifts = data.gt_poses.rotations, data.gt_poses.shifts_px
    particles = search_particles(data)
    vols, labels, res_px = backprojected_references(particles, true_rot, true_shifts, states)
    extra = {"fsc0143_px": [round(float(r), 2) for r in res_px]}
    search("back-projected at the true poses, true states, other half", vols, labels ^ 1, extra)
    search("back-projected at the true poses, true states, own half", vols, labels, extra)
    vols, labels, res_px = backprojected_references(particles, true_rot, true_shifts)
    search("back-projected at the true poses, one group, other half", vols, labels ^ 1,
           {"fsc0143_px": [round(float(r), 2) for r in res_px]})
    if args.run:
        run = load_run(args.run, None if args.epoch is None else int(args.epoch))
        if len(run.latents) != len(data) or not np.array_equal(run.particle_indices, data.indices):
            raise SystemExit(f"{args.run} was not trained on the particles of {args.data} in this order")
        run.model.cpu().eval()  # the maps as the trainer decodes them
        vols, labels = model_references(lambda z: run.model.decode_volume(z, data.original_box), run.latents, 16,
                                        args.seed)
        search(f"model maps ({args.run}, epoch {run.epoch}), 16 K-means centres", vols, labels)

    result = {"machine": machine.describe(), "data": os.path.abspath(args.data), "n_particles": len(data),
              "search_particles": int(sel.size), "sigma_rad": args.sigma_rad, "radius_deg": args.radius_deg,
              "rows": rows}
    with open(os.path.join(args.outdir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print_table(rows, len(data), int(sel.size), args.sigma_rad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
