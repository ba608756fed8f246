"""``cryoformer demo``: the README's first command — the whole job on the embedded molecule.

simulate (hinged molecule, ground truth kept) → train (a fixed number of epochs, sized for a
2-core CPU) → analyze (PCA, K-means, volumes, attention maps, summary) → evaluate (per-state FSC
against ground truth, flexible-region ROC-AUC) → judge the recovered end states against the true
ones (:func:`end_state_verdict`: PASS and exit status 0, or FAIL and exit status 1), and draw one
overview figure. Every step is the same library call the individual commands make.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from cryoformer.analysis import (AnalyzeConfig, EvaluateConfig, analysis_dir, analyze_run, evaluate_run,
                                 format_table, pca)
from cryoformer.analysis.evaluation import fourier_crop_volume, state_mean_latents
from cryoformer.errors import InputError
from cryoformer.examples import example_dataset
from cryoformer.io.atomic import atomic_open, atomic_path
from cryoformer.io.guard import claim_output_dir
from cryoformer.io.mrc import read_volume
from cryoformer.metrics.fsc import fsc, resolution_at
from cryoformer.metrics.heterogeneity import lowpass_gaussian
from cryoformer.trainer import TrainConfig, load_run, train

# Epochs of the demo's training: a fixed amount of work, so a busy machine takes longer instead
# of judging a model it had no time to train (docs/benchmarks.md has the timings).
DEFAULT_EPOCHS = 16


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="simulate → train → analyze → evaluate on the embedded hinged molecule (the README's demo)",
        description="Simulate particles of the embedded hinged molecule (D=64 px, 3 Å/px, CTF, shifts, "
                    "ground truth kept), train a CryoFormer model on them for a fixed number of epochs, "
                    "analyse the latent space, evaluate against the ground truth and judge whether the "
                    "recovered end states differ the way the true ones do (PASS, exit status 0; FAIL, "
                    "exit status 1). Sized for a 2-core CPU: about 6½ minutes in all on a quiet one.",
    )
    p.add_argument("-o", "--outdir", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("-n", "--n-particles", type=int, default=2000, help="particles (default 2000)")
    p.add_argument("--snr", type=float, default=1.0,
                   help="signal-to-noise ratio (default 1.0, so a few CPU minutes resolve the motion; "
                        "real data are ~0.01-0.1)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs (default {DEFAULT_EPOCHS}: about 6 minutes of training on 2 quiet "
                        f"CPU cores; "
                        f"a slower or busier machine takes longer, and trains the same)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="optional cap on the training wall-clock minutes; if it ends training before "
                        "--epochs, the verdict is FAIL (not enough training)")
    p.add_argument("--box", type=int, default=32,
                   help="training box in px, Fourier-cropped from the 64-px particles (default 32)")
    p.add_argument("--k", type=int, default=6, help="K-means clusters for the analysis (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


@dataclass(frozen=True)
class EndStateCriteria:
    """Margins the recovered end states must clear for the demo to print ``PASS``.

    Every score is 1 for the true maps themselves and about 0 for a model that recovered no
    motion (the consensus of the true end states decoded twice), so a threshold is a fraction
    of the true motion; the defaults leave room on both sides (docs/benchmarks.md).

    Attributes
    ----------
    lowpass_angstrom : float
        All four maps are low-passed by a Gaussian whose amplitude is 1/2 at this resolution
        (Å) before scoring: the motion is a low-resolution change, and the recovered maps'
        fine detail is noise from the scores' point of view.
    min_motion_correlation : float
        Lowest correlation of the recovered difference map (state B − state A) with the true one.
    min_motion_fraction : float
        Lowest fraction of the true difference recovered: the recovered difference projected on
        the true one, ``<Δr, Δt> / <Δt, Δt>``; noise cannot raise it, a smaller motion lowers it.
    min_identity_margin : float
        Lowest value, over both states, of ``corr(rᵢ, tᵢ) − corr(rᵢ, tⱼ)`` as a fraction of
        what the true maps score (``1 − corr(t_A, t_B)``): each recovered state must be closer
        to its own true state than to the other by this much.
    support_threshold : float
        The maps are compared inside the voxels where either low-passed true map exceeds this
        fraction of its maximum (the molecule in both conformations).
    """

    # Measured on the demo, seeds 0 and 1 (docs/benchmarks.md): 0.75-0.85 / 0.05-0.06 / 0.03-0.06
    # after 2 epochs (the motion points the right way but is barely there), 0.93-0.95 /
    # 0.71-0.72 / 0.61-0.67 after 6, and 0.975-0.989 / 0.91-1.02 / 0.90-0.99 from epoch 10 to 16
    # (the default, 16: 0.989 / 0.93-0.96 / 0.92-0.95).
    lowpass_angstrom: float = 20.0
    min_motion_correlation: float = 0.85
    min_motion_fraction: float = 0.75
    min_identity_margin: float = 0.75
    support_threshold: float = 0.05


def _pearson(a, b) -> float:
    x, y = a - a.mean(), b - b.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else 0.0


def _end_state_scores(recovered, true, mask) -> dict:
    """The three scores of :class:`EndStateCriteria` for low-passed maps, inside ``mask``."""
    t = [np.asarray(v)[mask] for v in true]
    consensus = 0.5 * (t[0] + t[1])
    design = np.stack([consensus, np.ones_like(consensus)], axis=1)
    r = []
    for v in recovered:
        # The model's density has its own units: each recovered map is put into the true maps'
        # units by fitting it as scale × consensus + offset (the consensus favours neither
        # state, so the fit cannot create a difference; regressing the map on the consensus,
        # not the other way round, keeps the map's noise from shrinking the scale).
        v = np.asarray(v, np.float64)[mask]
        scale, offset = np.linalg.lstsq(design, v, rcond=None)[0]
        # A map that does not look like the molecule at all (scale ≤ 0) carries no motion.
        r.append((v - offset) / scale if scale > 1e-12 * np.abs(v).max() else consensus.copy())
    dt, dr = t[1] - t[0], r[1] - r[0]
    norm = np.sqrt((dr * dr).sum() * (dt * dt).sum())
    motion_correlation = float((dr * dt).sum() / norm) if norm > 0 else 0.0
    motion_fraction = float((dr * dt).sum() / (dt * dt).sum())
    true_margin = 1.0 - _pearson(t[0], t[1])
    margins = [(_pearson(r[i], t[i]) - _pearson(r[i], t[1 - i])) / true_margin for i in (0, 1)]
    return {"motion_correlation": motion_correlation, "motion_fraction": motion_fraction,
            "identity_margin": float(min(margins)), "identity_margin_per_state": margins,
            "correlation_recovered_vs_true": [[_pearson(r[i], t[j]) for j in (0, 1)] for i in (0, 1)]}


def end_state_verdict(recovered, true, voxel_size_angstrom: float,
                      criteria: EndStateCriteria = EndStateCriteria()) -> dict:
    """Do two recovered end-state maps differ the way the true ones do, by a clear margin?

    Parameters
    ----------
    recovered, true : np.ndarray
        ``[2, D, D, D]``: the maps decoded for the two end states and the true maps of those
        states, on the same grid.
    voxel_size_angstrom : float
        Å per voxel of both.
    criteria : EndStateCriteria

    Returns
    -------
    dict
        ``scores`` (see :class:`EndStateCriteria`; also ``correlation_recovered_vs_true``
        ``[i][j]``), ``thresholds``, ``baseline_no_motion`` (the scores of the consensus of the
        true maps decoded twice; the true maps themselves score 1), ``checks`` (score name →
        passed), ``passed`` (all checks), ``lowpass_angstrom`` and ``support_voxels``.
    """
    recovered, true = np.asarray(recovered), np.asarray(true)
    if recovered.shape != true.shape or recovered.shape[0] != 2 or recovered.ndim != 4:
        raise ValueError(f"need two [2, D, D, D] stacks of one shape, got {recovered.shape} and {true.shape}")
    lp = [[lowpass_gaussian(v, voxel_size_angstrom, criteria.lowpass_angstrom) for v in s] for s in (recovered, true)]
    support = np.maximum(lp[1][0] / lp[1][0].max(), lp[1][1] / lp[1][1].max()) > criteria.support_threshold
    scores = _end_state_scores(lp[0], lp[1], support)
    consensus = 0.5 * (lp[1][0] + lp[1][1])
    baseline = _end_state_scores([consensus, consensus], lp[1], support)
    thresholds = {"motion_correlation": criteria.min_motion_correlation,
                  "motion_fraction": criteria.min_motion_fraction,
                  "identity_margin": criteria.min_identity_margin}
    checks = {name: bool(scores[name] >= value) for name, value in thresholds.items()}
    return {"scores": scores, "thresholds": thresholds, "baseline_no_motion": baseline, "checks": checks,
            "passed": all(checks.values()), "lowpass_angstrom": criteria.lowpass_angstrom,
            "support_voxels": int(support.sum())}


def _overview(path, gt_end, decoded_end, z2, labels, end_states):
    """The overview figure: true and recovered end states, latents, recovered vs true motion."""
    # Imported here, not at the top: importing matplotlib sets up its cache directory and warns on
    # stderr where that is not writable, and every command loads this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7))
    FigureCanvasAgg(fig)  # draws without pyplot: no global backend or figure state
    axes = fig.subplots(2, 3)
    for row, (vols, name) in enumerate(((gt_end, "true"), (decoded_end, "recovered"))):
        for col, k in enumerate(end_states):
            ax = axes[row, col]
            ax.imshow(vols[col].sum(axis=0), cmap="gray", origin="lower")
            ax.set_title(f"{name} state {k} (projection along z)")
            ax.set_xticks([])
            ax.set_yticks([])
    ax = axes[0, 2]
    sc = ax.scatter(z2[:, 0], z2[:, 1], c=labels, cmap="viridis", s=4)
    fig.colorbar(sc, ax=ax, label="true state")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title("latents, coloured by true state")
    diff_true = gt_end[1].sum(axis=0) - gt_end[0].sum(axis=0)
    diff_rec = decoded_end[1].sum(axis=0) - decoded_end[0].sum(axis=0)
    ax = axes[1, 2]
    lim = abs(diff_true).max()
    ax.imshow(diff_rec / max(abs(diff_rec).max(), 1e-12) * lim, cmap="RdBu_r", vmin=-lim, vmax=lim,
              origin="lower")
    ax.contour(diff_true, levels=[-0.3 * lim, 0.3 * lim], colors=["navy", "darkred"], linewidths=1)
    ax.set_title("recovered motion (colour) vs true (contours)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle("cryoformer demo: the hinged molecule, recovered from simulated particles")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")


_SCORE_LABELS = {
    "motion_correlation": "motion: correlation of the recovered difference map with the true one",
    "motion_fraction": "motion: fraction of the true difference recovered (projection)",
    "identity_margin": "identity: corr(own true state) - corr(other one), ÷ the true maps' gap",
}


def format_verdict(verdict: dict, why_not: str = "") -> list:
    """Lines that show each score of :func:`end_state_verdict` beside its threshold and baselines.

    ``why_not``, when given, is a reason the verdict fails regardless of the scores (e.g. the
    training was cut short) and is printed with the ``FAIL``.
    """
    scores, base = verdict["scores"], verdict["baseline_no_motion"]
    lines = [f"end states, low-passed to {verdict['lowpass_angstrom']:g} Å, inside the molecule "
             f"({verdict['support_voxels']} voxels):",
             f"  {'score':<72} {'value':>6} {'needs':>7} {'no motion':>9} {'true maps':>9}"]
    for name, label in _SCORE_LABELS.items():
        mark = "ok" if verdict["checks"][name] else "FAIL"
        lines.append(f"  {label:<72} {scores[name]:6.3f} {'≥ ' + format(verdict['thresholds'][name], '.2f'):>7} "
                     f"{base[name]:9.3f} {1.0:9.3f}  {mark}")
    passed = verdict["passed"] and not why_not
    reason = why_not or ("" if passed else "the recovered end states do not differ the way the true ones "
                                           "do by the margins above")
    lines.append(f"end states told apart: {'PASS' if passed else 'FAIL'}" + (f" ({reason})" if reason else ""))
    return lines


def compare_end_states(run, data, figure: str, criteria: EndStateCriteria = EndStateCriteria(),
                       why_not: str = "") -> dict:
    """Decode at the mean latent of the first and last true state; judge them against the true maps.

    Prints :func:`format_verdict`'s lines and draws the overview figure; returns the verdict of
    :func:`end_state_verdict` plus the FSC between the end states (information only) and
    ``passed`` (False also when ``why_not`` is given).
    """
    labels_all = np.load(data.gt_labels)
    labels = labels_all[run.particle_indices]
    n_states = len(data.gt_maps)
    ends = (0, n_states - 1)
    means = state_mean_latents(run.latents, labels, n_states)
    d = run.box_size
    gt_end = np.stack([fourier_crop_volume(read_volume(data.gt_maps[k])[0], d) for k in ends])
    decoded = run.model.decode_volume(np.stack([means[k] for k in ends])).cpu().numpy()
    apix = run.pixel_size_angstrom or 1.0
    verdict = end_state_verdict(decoded, gt_end, apix, criteria)
    corr = verdict["scores"]["correlation_recovered_vs_true"]
    f_true, c_true = fsc(gt_end[0], gt_end[1])
    f_rec, c_rec = fsc(decoded[0], decoded[1])
    res_true = resolution_at(np.asarray(f_true), np.asarray(c_true), 0.5, apix)
    res_rec = resolution_at(np.asarray(f_rec), np.asarray(c_rec), 0.5, apix)
    for i, k in enumerate(ends):
        print(f"      recovered state {k}: correlation {corr[i][i]:.3f} with true state {k}, "
              f"{corr[i][1 - i]:.3f} with true state {ends[1 - i]}")
    print(f"      FSC=0.5 between the end states: true {res_true:.1f} Å, recovered {res_rec:.1f} Å "
          f"(information; the verdict below uses the difference maps)")
    print("\n".join("      " + line for line in format_verdict(verdict, why_not)), flush=True)
    z2 = pca(run.latents).projections[:, :2]
    _overview(figure, gt_end, decoded, z2, labels, ends)
    return {**verdict, "states": list(ends), "passed": bool(verdict["passed"] and not why_not),
            "correlation_recovered_vs_true": corr,
            "failed_because": why_not or None,
            "fsc0.5_between_true_end_states_angstrom": res_true,
            "fsc0.5_between_recovered_end_states_angstrom": res_rec}


def run(args) -> int:
    _check_arguments(args)
    claim_output_dir(args.outdir, [], args.force, option="-o")
    t0 = time.time()
    outdir = os.path.abspath(args.outdir)

    def stamp() -> str:
        return f"[{time.time() - t0:5.0f} s]"

    print(f"{stamp()} 1/5 simulating {args.n_particles} particles of the hinged molecule "
          f"(D=64, 3 Å/px, SNR {args.snr:g}, CTF, shifts ±2 px)", flush=True)
    data = example_dataset(outdir, n_particles=args.n_particles, snr=args.snr, seed=args.seed)

    run_dir = os.path.join(outdir, "run")
    cap = f" (at most {args.max_minutes:g} min)" if args.max_minutes else ""
    epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    print(f"{stamp()} 2/5 training {epochs}{cap} at box {args.box} px -> {run_dir}", flush=True)
    result, why_not = _train(args, data, run_dir)
    training = {"steps": result.step, "epochs": result.epoch, "epochs_requested": args.epochs,
                "stopped": result.stopped, "max_minutes": args.max_minutes}
    if result.epoch < 1:  # nothing to analyse or judge
        with atomic_open(os.path.join(outdir, "metrics.json"), "w") as fh:
            json.dump({"verdict": "FAIL", "failed_because": why_not, "training": training,
                       "wall_s": time.time() - t0}, fh, indent=1)
        print(f"\ndemo verdict: FAIL ({why_not})")
        return 1
    run = load_run(run_dir)
    why = " (lowest loss on the held-out particles)" if run.selected_by == "heldout" else ""
    print(f"      {result.step} steps, {result.epoch} epoch(s) with outputs; using epoch {run.epoch}{why}",
          flush=True)

    print(f"{stamp()} 3/5 analysing the latent space (PCA, K-means k={args.k}, volumes, attention maps)",
          flush=True)
    adir = analysis_dir(run_dir)
    analyze_run(run, adir, AnalyzeConfig(k=args.k, n_traversal=6, progress=False))

    print(f"{stamp()} 4/5 evaluating against the ground truth", flush=True)
    fsc_plot = os.path.join(outdir, "fsc_per_state.png")
    metrics = evaluate_run(run, data.gt_maps, data.gt_labels, data.gt_motion, None,
                           EvaluateConfig(fsc_plot=fsc_plot, progress=False))
    print("\n".join("      " + line for line in format_table(metrics).splitlines()))

    print(f"{stamp()} 5/5 comparing the recovered end states with the true ones", flush=True)
    figure = os.path.join(outdir, "overview.png")
    ends = compare_end_states(run, data, figure, why_not=why_not)
    summary = {"verdict": "PASS" if ends["passed"] else "FAIL", "metrics": metrics, "end_states": ends,
        "training": {**training, "epoch_used": run.epoch, "epoch_selected_by": run.selected_by},
        "wall_s": time.time() - t0}
    with atomic_open(os.path.join(outdir, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=float)
    _print_outputs(time.time() - t0, figure, adir, fsc_plot, outdir, data, run_dir)
    return _final_verdict(ends)


def _check_arguments(args) -> None:
    if args.epochs < 1 or args.n_particles < 10:
        raise InputError(None, "--epochs/--n-particles", "need at least 1 epoch and at least 10 particles")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InputError(None, "--max-minutes", f"must be positive, got {args.max_minutes:g}")


def _train(args, data, run_dir: str):
    """Train afresh in ``run_dir``; the training result and why the verdict must fail ("" if not)."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # the demo always trains afresh (its own output; --force was given)
    # The example data are a toy at SNR 1 (real particles: ~0.1 or less): within a few minutes the
    # maps do not fit noise, while the latent space keeps organising; a held-out loss on ~100
    # images picked epoch 4 of 14 in the demo, whose end states were then far less distinct
    # (correlation with the true end states 0.80, against 0.93 at epoch 14; docs/benchmarks.md). So the
    # examples hold out nothing and use their latest epoch; real data keep the default 5 %.
    config = TrainConfig.from_flat(particles=data.star, outdir=run_dir, box_size=args.box, epochs=args.epochs,
                                   max_minutes=args.max_minutes, seed=args.seed, device="auto", heldout_fraction=0.0)
    result = train(config, command_line="cryoformer demo")  # tqdm bar per epoch on stderr
    # A model stopped early is not the demo's model: judge it FAIL whatever its scores, so a
    # slow machine under a cap can never pass on too little training.
    why_not = ""
    if result.stopped != "finished":
        why_not = (f"not enough training: stopped ({result.stopped}) at step {result.step}, in epoch "
                   f"{max(result.epoch, 0)} of {args.epochs}")
    return result, why_not


def _print_outputs(wall_s: float, figure: str, adir: str, fsc_plot: str, outdir: str, data,
                   run_dir: str) -> None:
    print(f"\ndone in {wall_s:.0f} s. Look at:")
    print(f"  overview figure  {figure}")
    print(f"  analysis         {adir}/  (summary.html, vol_kmeans_XX.mrc, pc1/, attn_kmeans_XX.mrc, "
          f"flex_score.mrc, flex_regions.mrc)")
    print(f"  FSC per state    {fsc_plot}")
    print(f"  metrics          {os.path.join(outdir, 'metrics.json')}")
    print(f"  dataset          {data.root}/  (particles.star, gt/)")
    print(f"  explore it       LatentExplorer('{run_dir}') in Jupyter, or napari → Plugins → cryoformer")
    if importlib.util.find_spec("cryoformer_widgets") is None:  # `make demo` sets up the core only
        print("                   (the widgets are not installed here: `make setup`, or "
              "pip install './widgets[jupyter]' / './widgets[napari]')")


def _final_verdict(ends: dict) -> int:
    """Print the verdict line; the exit status (0 PASS, 1 FAIL)."""
    if ends["passed"]:
        print("\ndemo verdict: PASS (the recovered end states differ the way the true ones do)")
        return 0
    reason = ends["failed_because"] or ("the recovered end states do not differ the way the true ones "
                                        "do; the scores above show by how much")
    print(f"\ndemo verdict: FAIL ({reason})")
    return 1
