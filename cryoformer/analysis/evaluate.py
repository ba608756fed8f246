"""``evaluate`` as a library call: metrics of a trained run against ground truth (docs/conventions.md, "Metrics").

:func:`evaluate_run` reads the ground truth (state maps, per-particle state labels, optionally a
motion map and poses), brings it onto the run's grid and particle subset, and computes

* per-state FSC of the volume decoded at the state's mean latent: FSC-0.5 resolution (Å) and
  AU-FSC, and their means over states;
* pose errors of the refined poses (``RUN/poses/epoch_XXX.pkl``) against the true poses;
* the flexible-region ROC-AUC of the density-response score (``flex_density``, the default
  map) and of the attention-derived scores (``flex_queries``, ``flex_weights``) beside the
  baselines ``distance_from_centre`` and ``voxel_variance``.

The result is a JSON-ready dict; :func:`format_table` renders it for a terminal.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from cryoformer.analysis.attention_maps import flex_score
from cryoformer.analysis.evaluation import (distance_from_centre, flex_roc_auc, fourier_crop_volume,
                                            heterogeneous_fsc, resample_real, state_mean_latents,
                                            summarise_fsc, support_mask, voxel_variance)
from cryoformer.analysis.export import run_paths
from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.io.dispatch import load_poses
from cryoformer.io.mrc import read_volume
from cryoformer.io.pairing import match_rows
from cryoformer.io.particles import open_particles
from cryoformer.io.safe_pickle import load_pickle
from cryoformer.metrics.fsc import FscResult, plot_fsc, soft_spherical_mask
from cryoformer.metrics.heterogeneity import difference_map_correlation, motion_mask
from cryoformer.metrics.pose_error import pose_error_summary

__all__ = ["EvaluateConfig", "evaluate_run", "format_table", "gt_map_paths", "load_gt_labels"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of :func:`evaluate_run`.

    Attributes
    ----------
    motion_threshold_angstrom : float or None
        A voxel moves when its ground-truth displacement exceeds this (Å); default one voxel of
        the evaluation grid.
    support_fraction : float
        Molecule support = voxels above this fraction of the maximum of any ground-truth map.
    variance_latents : int
        Particle latents decoded for the voxel-variance baseline.
    mask_radius_px : float or None
        Soft spherical FSC mask radius in evaluation-grid voxels (None: no mask).
    fsc_plot : str or None
        Where to draw the per-state FSC curves.
    difference_lowpass_angstrom : float
        Common low-pass (Å, amplitude 1/2) of the difference-map correlation.
    seed : int
    progress : bool
    """

    motion_threshold_angstrom: Optional[float] = None
    support_fraction: float = 0.05
    variance_latents: int = 64
    mask_radius_px: Optional[float] = None
    fsc_plot: Optional[str] = None
    difference_lowpass_angstrom: float = 8.0
    seed: int = 0
    progress: bool = True


def gt_map_paths(spec: Union[str, Sequence[PathLike]]) -> List[str]:
    """Ground-truth map files: state ``k`` is the ``k``-th.

    ``spec`` is a glob (its matches sorted), a list of files (kept in order, as a shell expands
    an unquoted glob), or a list mixing both.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: List[str] = []
    for item in map(os.fspath, items):
        paths += sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    if not paths:
        raise InputError(", ".join(map(os.fspath, items)) or None, "--gt-maps", "no ground-truth map matches")
    for p in paths:
        require_file(p, "ground-truth map")
    return paths


def load_gt_labels(path: PathLike, n_states: int, n_original: Optional[int]) -> np.ndarray:
    """Per-particle ground-truth state ``[N_original]`` int64 from a ``.npy``/``.pkl``; validated."""
    path = require_file(path, "ground-truth labels")
    try:
        labels = np.load(path, allow_pickle=False) if path.endswith(".npy") else load_pickle(path)
    except (ValueError, OSError) as exc:
        raise InputError(path, None, f"not a readable label file ({exc})") from exc
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(path, None, f"expected integer state labels, found dtype {labels.dtype}")
    if n_original is not None and labels.size != n_original:
        raise InputError(path, None, f"{labels.size} labels but the particle stack holds {n_original} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_states):
        raise InputError(path, None, f"labels must lie in 0…{n_states - 1} (one per ground-truth map), "
                         f"found {int(labels.min())}…{int(labels.max())}")
    return labels.astype(np.int64)


def _original_box(run) -> int:
    return int(getattr(run, "original_box_size", None) or run.box_size)


def _gt_on_grid(paths: List[str], run, D_eval: Optional[int]):
    """Ground-truth maps ``[K, d, d, d]`` Fourier-cropped to the evaluation box; ``d``, the maps'
    box and the physical box edge (Å)."""
    maps, shapes = [], set()
    apix_gt = None
    for p in paths:
        vol, apix = read_volume(p)
        shapes.add(vol.shape[0])
        if len(shapes) > 1:
            raise InputError(p, "shape", f"ground-truth maps have different boxes {sorted(shapes)}")
        maps.append(vol)
        apix_gt = apix_gt or apix
    D_gt = shapes.pop()
    phys = run.box_size * run.pixel_size_angstrom if run.pixel_size_angstrom else None
    if apix_gt and phys and abs(D_gt * apix_gt - phys) > 0.02 * phys:
        raise InputError(paths[0], "voxel size", f"map spans {D_gt * apix_gt:.1f} Å but the run's box spans "
                         f"{phys:.1f} Å; ground truth must cover the particle box")
    phys = phys or D_gt * apix_gt
    if not phys:
        raise InputError(paths[0], "voxel size", "neither the run nor the map records a pixel size")
    d = int(D_eval or min(D_gt, run.box_size))
    if d > D_gt or d % 2:
        raise InputError(None, "-D", f"evaluation box must be even and at most the ground-truth box {D_gt}")
    return np.stack([fourier_crop_volume(v, d) for v in maps]), d, D_gt, phys


def _original_count(run) -> Optional[int]:
    """Images in the original particle stack (None when it cannot be opened from here)."""
    paths = run_paths(run)
    try:
        return len(open_particles(paths["particles"], datadir=paths.get("datadir")))
    except (InputError, KeyError, TypeError, OSError):
        return None


def evaluate_run(run, gt_maps: Union[str, Sequence[PathLike]], gt_labels: PathLike,
                 gt_motion: Optional[PathLike] = None, gt_poses: Optional[PathLike] = None,
                 config: EvaluateConfig = EvaluateConfig(), box_size: Optional[int] = None) -> dict:
    """metrics (docs/conventions.md) of ``run`` against ground truth (see module docstring).

    Parameters
    ----------
    run : TrainedRun
    gt_maps : str or list
        Glob (sorted) or list of state maps; state ``k`` is the ``k``-th map.
    gt_labels : path
        ``[N_original]`` state of every particle of the original stack.
    gt_motion : path, optional
        ``[D_gt³]`` per-voxel displacement (Å).
    gt_poses : path, optional
        True poses of the original stack (``.pkl``/``.star``/``.cs``).
    box_size : int, optional
        Evaluation box ``d`` (default ``min(D_gt, training box)``).
    """
    paths = gt_map_paths(gt_maps)
    idx, labels_all = _run_labels(run, gt_labels, len(paths))
    motion = None
    if gt_motion is not None:
        motion, _ = read_volume(gt_motion)
    truth_poses = None if gt_poses is None else _truth_poses(run, gt_poses)
    maps, d, D_gt, phys = _gt_on_grid(paths, run, box_size)
    if motion is not None and motion.shape[0] != D_gt:
        raise InputError(gt_motion, "shape", f"motion map box {motion.shape[0]} differs from the maps' {D_gt}")
    apix = phys / d
    model = run.model.eval()
    labels = labels_all[idx]  # [N] state of each run particle
    z = np.asarray(run.latents, dtype=np.float32)
    mask = None if config.mask_radius_px is None else soft_spherical_mask(d, config.mask_radius_px)
    decoded: dict = {}
    results = heterogeneous_fsc(model, state_mean_latents(z, labels, len(paths)), maps, apix, mask,
                                config.progress, keep_volumes=decoded)
    out = {"epoch": getattr(run, "epoch", None), "evaluation_box_voxels": d, "voxel_size_angstrom": apix,
           "ground_truth_box_voxels": D_gt, "n_states": len(paths), "n_particles": int(len(z)),
           "state_latent": "mean latent of the state's particles",
           # Near zero means the latents collapsed (no heterogeneity learned yet).
           "latent_std_mean": float(z.std(axis=0).mean()),
           "fsc": summarise_fsc(results, [int(np.sum(labels == k)) for k in sorted(results)])}
    counts = np.bincount(labels, minlength=len(paths)).astype(np.float64)  # [K] particles per state
    consensus = np.tensordot(counts / max(counts.sum(), 1.0), maps, axes=1).astype(np.float32)
    out["fsc_consensus_baseline"] = _consensus_fsc(consensus, maps, apix, mask, counts, sorted(results))
    if len(decoded) >= 2:
        out["heterogeneity"] = _heterogeneity(decoded, maps, consensus, apix, config)
    missing = [k for k in range(len(paths)) if k not in results]
    if missing:
        out["fsc"]["states_without_particles"] = missing
    if truth_poses is not None:
        out["pose_error"] = _pose_error_entry(run, truth_poses, idx)
    if motion is not None:
        out.update(_flexible_region(model, z, maps, resample_real(motion, d), apix, decoded, consensus,
                                    counts, config))
    if config.fsc_plot and results:  # last, so a failure above leaves no plot behind
        plot_fsc(list(results.values()), config.fsc_plot, title="decoded vs ground truth, per state")
        out["fsc_plot"] = config.fsc_plot
    return out


def _run_labels(run, gt_labels: PathLike, n_states: int):
    """The run's particles (rows of the original stack, ``[N]``) and the true state of every
    particle of the original stack (``[N_original]``)."""
    labels_all = load_gt_labels(gt_labels, n_states, _original_count(run))
    idx = np.asarray(run.particle_indices, dtype=np.int64)
    if idx.size and idx.max() >= labels_all.size:
        raise InputError(gt_labels, None, f"{labels_all.size} labels but the run uses particle {int(idx.max())}")
    return idx, labels_all


def _pose_error_entry(run, truth_poses, idx: np.ndarray) -> dict:
    """``pose_error`` of the result: the errors of the refined poses, or why there are none."""
    refined = getattr(run, "refined_poses_path", None)
    if refined is None:
        return {"note": "the run has no refined poses (trained without --refine-poses)"}
    return _pose_errors(refined, truth_poses, idx, _original_box(run))


def _consensus_fsc(consensus: np.ndarray, maps: np.ndarray, apix: float, mask: Optional[np.ndarray],
                   counts: np.ndarray, states: List[int]) -> dict:
    """FSC summary of the ``consensus`` map against each state's true map.

    The trivial baseline every per-state score is read against: one map with no heterogeneity
    at all, the particle-weighted mean of the true maps (what a perfect homogeneous refinement
    of these particles would give), scored the same way.
    """
    baseline = {k: FscResult.compute(consensus, maps[k], apix, mask=mask, label=f"consensus vs state {k}")
                for k in states}
    return summarise_fsc(baseline, [int(counts[k]) for k in sorted(baseline)])


def _truth_poses(run, gt_poses: PathLike):
    """The true poses, row ``k`` for image ``k`` of the run's original particles."""
    # cryoDRGN .pkl shifts are box fractions: read them in pixels of the original box D₀.
    pkl = os.fspath(gt_poses).lower().endswith(".pkl")
    truth_poses = load_poses(gt_poses, box_size=_original_box(run) if pkl else None)
    if run.paths.get("particles"):
        # Row k of the truth must be image k of the particles: by name when it has names.
        source = open_particles(run.paths["particles"], datadir=run.paths.get("datadir"))
        truth_poses = match_rows(source, run.paths["particles"], gt_poses, len(truth_poses),
                                 run.paths.get("datadir")).apply(truth_poses)
    return truth_poses


def _heterogeneity(decoded: dict, maps: np.ndarray, consensus: np.ndarray, apix: float,
                   config: EvaluateConfig) -> dict:
    """Difference-map correlation of the decoded states ``decoded`` (state → ``[d, d, d]``).

    What the per-state FSC cannot see: do the recovered maps change the way the true ones do?
    The consensus scores 0 here by construction, the true maps 1.
    """
    scored = sorted(decoded)
    support = support_mask(maps, config.support_fraction)
    rec, tru = np.stack([decoded[k] for k in scored]), maps[scored]
    lp = config.difference_lowpass_angstrom
    return {
        "lowpass_angstrom": lp, "states": scored,
        "difference_map_correlation": difference_map_correlation(rec, tru, apix, lp, support),
        "consensus_baseline": difference_map_correlation(
            np.broadcast_to(consensus, tru.shape), tru, apix, lp, support),
        "true_maps": 1.0}


def _flexible_region(model, z: np.ndarray, maps: np.ndarray, motion_d: np.ndarray, apix: float,
                     decoded: dict, consensus: np.ndarray, counts: np.ndarray,
                     config: EvaluateConfig) -> dict:
    """``flexible_region`` (ROC-AUC of the scores against the true motion ``motion_d`` ``[d, d, d]``)
    and, when some voxels move, ``fsc_moving_region``."""
    d = motion_d.shape[0]
    threshold = config.motion_threshold_angstrom or apix
    # The default map (the density head's response to z) first, then the attention maps.
    scores = {"flex_density": flex_score(model, z, d, "density", seed=config.seed),
              "flex_queries": flex_score(model, z, d, "queries", seed=config.seed,
                                         progress=config.progress)}
    if model.config.use_rsca:
        scores["flex_weights"] = flex_score(model, z, d, "weights", seed=config.seed,
                                            progress=config.progress)
    scores["distance_from_centre"] = distance_from_centre(d)
    scores["voxel_variance"] = voxel_variance(model, z, d, config.variance_latents, config.seed,
                                              config.progress)
    support = support_mask(maps, config.support_fraction)  # [d, d, d] the molecule
    out = {"flexible_region": flex_roc_auc(scores, motion_d, threshold, support)}
    out["flexible_region"]["support_fraction"] = config.support_fraction
    # Reference, not a method: the variance of the ground-truth maps themselves shows how
    # well a perfect reconstruction's voxel variance would do on this motion.
    ref = flex_roc_auc({"gt": maps.var(axis=0)}, motion_d, threshold, support)
    out["flexible_region"]["reference_auc_ground_truth_variance"] = ref["auc"]["gt"]
    moving = motion_mask(motion_d, threshold)
    if moving.any() and decoded:
        # FSC inside a soft mask around the voxels that move, beside the consensus's.
        here = {k: FscResult.compute(decoded[k], maps[k], apix, mask=moving) for k in sorted(decoded)}
        there = {k: FscResult.compute(consensus, maps[k], apix, mask=moving) for k in sorted(decoded)}
        n = [int(counts[k]) for k in sorted(decoded)]
        out["fsc_moving_region"] = {"threshold_angstrom": threshold,
                                    "recovered": summarise_fsc(here, n),
                                    "consensus_baseline": summarise_fsc(there, n)}
    return out


def _pose_errors(refined_path: str, truth, idx: np.ndarray, box0: int) -> dict:
    """Refined (run particles) vs true (original stack) poses; shifts in pixels of the original box."""
    refined = read_poses_pkl(refined_path, box_size=box0)
    if len(refined) != len(idx):
        raise InputError(refined_path, None, f"{len(refined)} poses but the run has {len(idx)} particles")
    if idx.size and idx.max() >= len(truth):
        raise InputError(None, "--gt-poses", f"{len(truth)} poses but the run uses particle {int(idx.max())}")
    t = truth.subset(idx)
    # A .star/.cs records its own box; shifts are compared in pixels of the original box D₀.
    scale = box0 / (t.box_size or box0)
    summary = pose_error_summary(refined.rotations, t.rotations, refined.shifts_px, t.shifts_px * scale,
                                 box_size=box0)
    summary["refined_poses"] = refined_path
    summary["shift_unit"] = f"pixels of the original box (D = {box0})"
    return summary


def format_table(result: dict) -> str:
    """The metrics as readable text (one line per state, then means, poses and ROC-AUC)."""
    lines = [f"evaluation at {result['evaluation_box_voxels']}³ voxels of "
             f"{result['voxel_size_angstrom']:.3f} Å (epoch {result['epoch']})",
             f"{'state':>5} {'particles':>9} {'FSC=0.5 (Å)':>12} {'AU-FSC':>7}   "
             f"{'consensus: FSC=0.5 (Å)':>22} {'AU-FSC':>7}"]

    def res(value, width=12) -> str:
        return f"{value:>{width}.2f}" if value is not None else f"{'n/a':>{width}}"

    base = result.get("fsc_consensus_baseline") or {"states": [], "mean_au_fsc": None}
    base_rows = {row["state"]: row for row in base["states"]}
    for row in result["fsc"]["states"]:
        b = base_rows.get(row["state"])
        trivial = f"   {res(b['resolution_fsc0.5_angstrom'], 22)} {b['au_fsc']:>7.4f}" if b else ""
        lines.append(f"{row['state']:>5} {row['n_particles']:>9} {res(row['resolution_fsc0.5_angstrom'])} "
                     f"{row['au_fsc']:>7.4f}{trivial}" + (f"  ({row['note']})" if "note" in row else ""))
    if result["fsc"]["mean_au_fsc"] is not None:
        trivial = (f"   {res(base.get('mean_resolution_fsc0.5_angstrom'), 22)} {base['mean_au_fsc']:>7.4f}"
                   if base["mean_au_fsc"] is not None else "")
        lines.append(f"{'mean':>5} {'':>9} {res(result['fsc']['mean_resolution_fsc0.5_angstrom'])} "
                     f"{result['fsc']['mean_au_fsc']:>7.4f}{trivial}")
    if base["mean_au_fsc"] is not None:
        lines.append("consensus = the particle-weighted mean of the true maps, one map with no "
                     "heterogeneity: per-state scores near it show little of the motion")
    if result["fsc"].get("states_without_particles"):
        lines.append(f"states without particles in the run: {result['fsc']['states_without_particles']}")
    pe = result.get("pose_error")
    if pe and "note" in pe:
        lines.append(f"poses: {pe['note']}")
    elif pe:
        lines.append(f"poses: rotation error median {pe['rotation_median_deg']:.2f}° "
                     f"(mean square {pe['rotation_mean_square_rad2']:.4g} rad²), shift error median "
                     f"{pe.get('shift_median_px', float('nan')):.2f} px (mean square "
                     f"{pe.get('shift_mean_square_px2', float('nan')):.3g} px²)")
    het = result.get("heterogeneity")
    if het:
        lines.append(f"difference-map correlation (states' changes vs the true ones, low-pass "
                     f"{het['lowpass_angstrom']:g} Å): {het['difference_map_correlation']:.3f}   "
                     f"consensus {het['consensus_baseline']:.3f}, true maps {het['true_maps']:.0f}")
    mv = result.get("fsc_moving_region")
    if mv and mv["recovered"]["mean_au_fsc"] is not None:
        lines.append(f"AU-FSC inside the moving region (> {mv['threshold_angstrom']:.2f} Å): "
                     f"{mv['recovered']['mean_au_fsc']:.4f}   consensus "
                     f"{mv['consensus_baseline']['mean_au_fsc']:.4f}")
    fr = result.get("flexible_region")
    if fr:
        lines.append(f"flexible-region ROC-AUC ({fr['n_moving']} of {fr['n_voxels']} support voxels move "
                     f"> {fr['threshold_angstrom']:.2f} Å):")
        ref = fr.get("reference_auc_ground_truth_variance")
        for name, auc in list(fr["auc"].items()) + [("(ground-truth variance)", ref)]:
            lines.append(f"  {name:<24} {'n/a' if auc is None else f'{auc:.3f}'}")
    return "\n".join(lines)
