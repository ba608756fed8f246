"""Local pose refinement by projection matching (MAP search), with the references the run has.

The orientation encoder of paper §3.2 learns poses only after long pre-training (the paper:
200 epochs of 50k images on a GPU); on a CPU budget it does not get close to the input poses
(measured: 124° median error after 50 pre-training epochs of 1000 images, see
``bench/bench_pose_refinement.py``). This module refines poses the way a local search in
RELION does:

1. **References** at the particles' *original* box (:mod:`.references`): by default
   gold-standard half maps back-projected from the particles at their current poses, one
   pair per K-means group of the latents (4 groups by default); or the model's own maps
   at the K-means centres. Measured on AdK (``docs/benchmarks.md``): the model's maps,
   limited by the training box and by the pose errors they were trained with, held the
   poses at a fixed point 2.75× better than the input; back-projected maps at the full box
   went further.
2. **Scoring** in Fourier space (:class:`~cryoformer.physics.slice_projector.FourierSliceProjector`):
   for a candidate pose the predicted spectrum is ``a · CTF · slice(R) · exp(2πi k·s)`` and
   the log-likelihood under white Gaussian noise is ``−‖Î − pred‖² / (2σ²)`` over the
   frequencies up to ``max_frequency``. The amplitude ``a`` is fitted for every particle and
   pose; the noise power ``σ²`` once per search, from the best coarse fits of all particles.
3. **Prior.** Input poses come from an earlier refinement and are wrong by some typical angle;
   a Gaussian prior ``exp(−θ²/(2σ_p²))`` on the angle ``θ`` between a candidate and the
   *input* rotation pulls noisy particles back. ``σ_p`` is not a guess: it is the value that
   maximises the marginal likelihood of all particles over the coarse grid (empirical Bayes),
   unless the user fixes it.
4. **Search**, coarse to fine: every rotation ``exp(δ)·R`` on a cubic grid of ``δ`` inside a
   ball of ``radius_rad``, each with every shift on a grid of ``shift_radius_px`` (the shift
   sum is one complex matrix product), low-passed so the grid samples the likelihood finely
   enough; then grids a third as fine around the 4 best coarse poses, then around the best,
   the last at the full band. The current pose is scored too and kept unless beaten, so the
   posterior never gets worse.

Cost per particle and level: ``≈ (4π/3)(radius/step)³`` slices of the level's frequencies plus
one ``[C, M] × [M, S]`` product. Measured at D = 64 on 2 CPU cores with a 20° radius: 20–35 ms
per particle when the band stops at a box-32 model's 0.25 cycles/px (the coarse level
dominates), about 100 ms at the full band (back-projected references; the fine levels score
every coefficient), 70 % of it in ``grid_sample``. The search runs where the model trains when
that is a CUDA GPU, else on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cryoformer.model import CryoFormer
from cryoformer.physics.fourier import frequency_grid_2d
from cryoformer.physics.slice_projector import FourierSliceProjector

from .config import POSE_SEARCH_REFERENCES as REFERENCES
from .data import ParticleData
from .pose_grids import angle_to, fit_prior_sigma, rotation_ball, search_levels
from .references import (FullBoxStream, backprojected_references, kmeans_groups, merge_small_groups,
                         model_references)

__all__ = ["PoseSearchConfig", "PoseSearchResult", "search_poses", "search_with_references",
           "fit_prior_sigma", "rotation_ball"]

logger = logging.getLogger(__name__)

# A back-projected group needs this many particles: fewer, and each half map is mostly its own
# particles' noise, which holds them at their current poses.
MIN_GROUP_PARTICLES = 40


@dataclass(frozen=True)
class PoseSearchConfig:
    """Search grids (angles in rad, shifts in px of the particles' original box).

    Attributes
    ----------
    radius_rad : float
        Coarse rotations cover a ball of this radius around the current rotation. Make it
        about 3× the typical error of the input poses (the log reports the fitted prior
        width, and warns when it comes close to the radius).
    coarse_step_rad : float, optional
        Spacing of the coarse rotation grid (default ``radius_rad / 6``, about 900
        rotations); each finer level uses a third of the previous spacing over a ball just
        covering one cell of the previous grid.
    fine_levels : int, optional
        Levels after the coarse one; default: until the spacing is at most ``final_step_rad``.
    final_step_rad : float
        See ``fine_levels``.
    shift_radius_px : float
        Shifts within ± this of the current shift, per axis, at the coarse level.
    coarse_shift_step_px : float, optional
        Shift spacing of the coarse level (finer levels: a quarter, a tenth, a twentieth of a
        pixel). Default ``min(1, 1/(6·k₀))`` for the coarse band limit ``k₀`` (cycles/px):
        with 1-px steps at ``k₀ = 0.33`` a fifth of SNR-100 particles lost the basin, with
        0.5 px none did.
    max_frequency : float, optional
        Highest frequency scored, cycles/px of the original box. Default: the original box's
        Nyquist (0.5) for back-projected references, which the Wiener filter already weights
        by what the data support; the training box's Nyquist for the model's maps (the model
        holds nothing finer).
    prior_sigma_rad : float, optional
        Width of the Gaussian prior on the angle to the input rotation; None fits it to the
        data (empirical Bayes), 0 disables the prior (maximum likelihood).
    reference : str
        ``"backprojection"``: gold-standard half maps reconstructed from the particles at their
        current poses; ``"model"``: the model's decoded maps (:mod:`.references`).
    n_references : int, optional
        K-means clusters of the latents, one reference (pair of half maps) each. Default 16
        for ``"model"``, 4 for ``"backprojection"``: a group's maps are reconstructed from its
        particles alone, so more groups resolve heterogeneity at the price of noisier maps.
        Measured on AdK (2000 particles, 10 states; docs/benchmarks.md): with input poses
        24° off, one group refines faster (0.134 rad after 3 searches, 4 groups 0.144) but 4
        end as far (0.1306 against 0.1313 rad); once the poses are within a few degrees the
        heterogeneity dominates (one search from 0.0979 rad: 0.0891 with 4 groups, 0.0816
        with the 10 true states as groups, 0.0979 with one).
    keep_coarse : int
        Best coarse poses refined at the next level (the posterior can have several basins).
    """

    radius_rad: float = 0.36
    coarse_step_rad: Optional[float] = None
    fine_levels: Optional[int] = None
    final_step_rad: float = 0.007
    shift_radius_px: float = 3.0
    coarse_shift_step_px: Optional[float] = None
    max_frequency: Optional[float] = None
    prior_sigma_rad: Optional[float] = None
    reference: str = "backprojection"
    n_references: Optional[int] = None
    keep_coarse: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.radius_rad <= math.pi:
            raise ValueError(f"radius_rad must be in (0, π], got {self.radius_rad}")
        if self.coarse_step_rad is not None and not 0 < self.coarse_step_rad <= self.radius_rad:
            raise ValueError("need 0 < coarse_step_rad <= radius_rad")
        if self.coarse_shift_step_px is not None and not 0 < self.coarse_shift_step_px:
            raise ValueError("coarse_shift_step_px must be > 0")
        if self.final_step_rad <= 0 or (self.fine_levels is not None and self.fine_levels < 0):
            raise ValueError("final_step_rad must be > 0 and fine_levels >= 0")
        if self.shift_radius_px < 0 or (self.n_references is not None and self.n_references < 1) \
                or self.keep_coarse < 1:
            raise ValueError("shift_radius_px must be >= 0, n_references and keep_coarse >= 1")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.prior_sigma_rad is not None and self.prior_sigma_rad < 0:
            raise ValueError("prior_sigma_rad must be >= 0 (0: no prior) or None (fitted)")

    def groups(self) -> int:
        """K-means groups of the latents (``n_references`` or the reference kind's default)."""
        return self.n_references or (4 if self.reference == "backprojection" else 16)

    def rotation_steps(self) -> list[float]:
        """Rotation grid spacing (rad) of each level, coarse first."""
        steps = [self.coarse_step_rad or self.radius_rad / 6]
        if self.fine_levels is not None:
            steps += [steps[0] / 3 ** (i + 1) for i in range(self.fine_levels)]
        else:
            while steps[-1] > self.final_step_rad * (1 + 1e-9):
                steps.append(steps[-1] / 3)
        return steps


@dataclass(frozen=True)
class PoseSearchResult:
    """Refined poses and what the search found out about the data.

    Attributes
    ----------
    rotations : np.ndarray [N, 3, 3]
    shifts_px : np.ndarray [N, 2]
        Pixels of the original box.
    prior_sigma_rad : float
        The prior width used (fitted unless given; 0 = none).
    noise_power : float
        σ² per Fourier coefficient, from the best coarse fits.
    log_posterior_gain : float
        Mean increase of the log posterior over the starting poses (≥ 0).
    """

    rotations: np.ndarray
    shifts_px: np.ndarray
    prior_sigma_rad: float
    noise_power: float
    log_posterior_gain: float


class _Scorer:
    """Squared errors of one particle against candidate poses (Fourier, within the band)."""

    def __init__(self, projector: FourierSliceProjector, freqs: torch.Tensor) -> None:
        self.projector, self.freqs = projector, freqs  # freqs [M, 2] cycles/px

    def errors(self, ref: int, image_f: torch.Tensor, ctf: torch.Tensor,
               rotations: torch.Tensor, shifts: torch.Tensor,
               sub: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``min_a ‖Î − a·CTF·slice(R)·exp(2πi k·s)‖²`` for every rotation [C] × shift [S] → [C, S].

        The amplitude ``a ≥ 0`` is fitted per particle and pose (profiled out): the
        reference's scale is arbitrary, and one fixed scale fitted at wrong poses would be
        too small and favour the projections with the most energy. ``sub`` selects part of
        the band (``image_f`` and ``ctf`` are then given on that part)."""
        freqs = self.freqs if sub is None else self.freqs[sub]  # [M', 2]; image_f, ctf: [M']
        pred = ctf * self.projector.slices(ref, rotations, freqs)  # [C, M']
        phase = 2 * torch.pi * (shifts.reshape(-1, 2) @ freqs.T)  # [S, M']
        # Σ_k Re(conj(pred·e^{iφ}) Î) for all shifts at once: one complex matrix product
        cross = ((pred.conj() * image_f) @ torch.polar(torch.ones_like(phase), -phase).T).real  # [C, S]
        energy = pred.abs().square().sum(-1).clamp(min=1e-30)[:, None]  # [C, 1]
        return image_f.abs().square().sum() - cross.clamp(min=0).square() / energy


@torch.no_grad()
def search_poses(model: CryoFormer, data: ParticleData, rotations: np.ndarray, shifts_px: np.ndarray,
                 latents: np.ndarray, device: torch.device,
                 config: PoseSearchConfig = PoseSearchConfig(),
                 prior_rotations: Optional[np.ndarray] = None, seed: int = 0,
                 progress: bool = True, reference_rows: Optional[np.ndarray] = None) -> PoseSearchResult:
    """Refine every selected particle's pose around ``(rotations, shifts_px)``.

    Parameters
    ----------
    model : CryoFormer
        Unwrapped model; its mode is restored afterwards.
    data : ParticleData
        The particles (read at their original box whatever the training box).
    rotations : np.ndarray [N, 3, 3]
        Current rotations (docs/conventions.md); the grids are centred on them.
    shifts_px : np.ndarray [N, 2]
        Current shifts, pixels of the original box.
    latents : np.ndarray [N, zdim]
        The particles' latents (for the references).
    device : torch.device
        Where the model decodes the references, and where the search runs when it is a CUDA
        device (else on the CPU).
    config : PoseSearchConfig
    prior_rotations : np.ndarray [N, 3, 3], optional
        Centre of the angle prior (the user's input poses); default ``rotations``.
    seed : int
        For K-means.
    progress : bool
        Show a progress bar.
    reference_rows : np.ndarray, optional
        Positions of the particles back-projected into the references (default all; every
        particle is searched either way).

    Returns
    -------
    PoseSearchResult
    """
    if len(latents) != len(data):
        raise ValueError(f"need one latent per particle: {len(latents)} for {len(data)}")
    t0 = time.monotonic()
    if config.reference == "model":
        vols, labels = model_references(model, latents, config.groups(), data.original_box, seed, device)
        logger.info("pose search references: the model's maps at %d K-means centres (%.0f s)",
                    len(vols), time.monotonic() - t0)
    else:
        groups, _ = kmeans_groups(latents, config.groups(), seed)
        # at least MIN_GROUP_PARTICLES per group (about half in each half map)
        groups = merge_small_groups(groups, latents, MIN_GROUP_PARTICLES)
        vols, labels, res_px = backprojected_references(data, rotations, shifts_px, groups, reference_rows)
        apix = float(data.ctf.array[0, 1]) if data.ctf is not None else None
        shown = ", ".join(f"{r:.2f} px" + (f" ({r * apix:.1f} Å)" if apix else "") for r in res_px[:4])
        logger.info("pose search references: %d gold-standard half-map pair(s) back-projected from %d "
                    "particles, FSC-0.143 resolution %s%s (%.0f s)", len(res_px),
                    len(data) if reference_rows is None else len(reference_rows), shown,
                    " …" if len(res_px) > 4 else "", time.monotonic() - t0)
    return search_with_references(vols, labels, data, rotations, shifts_px, config, prior_rotations,
                                  progress, device=device if torch.device(device).type == "cuda" else None)


@torch.no_grad()
def search_with_references(volumes: torch.Tensor, labels: np.ndarray, data: ParticleData,
                           rotations: np.ndarray, shifts_px: np.ndarray,
                           config: PoseSearchConfig = PoseSearchConfig(),
                           prior_rotations: Optional[np.ndarray] = None,
                           progress: bool = True,
                           device: Optional[torch.device] = None) -> PoseSearchResult:
    """The search of :func:`search_poses` against given reference volumes.

    Parameters
    ----------
    volumes : torch.Tensor [K, D, D, D]
        References at the particles' original box ``D`` (any device; copied to ``device``).
    labels : np.ndarray [N]
        Which reference each particle is matched against.
    data, rotations, shifts_px, config, prior_rotations, progress
        As :func:`search_poses`.
    device : torch.device, optional
        Where the references' spectra are sliced and scored (default the CPU). The particles
        are read on the CPU and sent there a chunk at a time; the result is the same up to
        floating-point summation order.

    Returns
    -------
    PoseSearchResult
    """
    n, D = len(data), data.original_box
    if np.shape(rotations) != (n, 3, 3) or np.shape(shifts_px) != (n, 2):
        raise ValueError(f"need [N, 3, 3] rotations and [N, 2] shifts for N={n} particles")
    if volumes.dim() != 4 or volumes.shape[-1] != D:
        raise ValueError(f"references must be [K, {D}, {D}, {D}], got {tuple(volumes.shape)}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(volumes):
        raise ValueError(f"labels must be {n} indices into the {len(volumes)} references")
    dev = torch.device("cpu") if device is None else torch.device(device)
    prior_rot = torch.from_numpy(np.asarray(rotations if prior_rotations is None else prior_rotations,
                                            dtype=np.float32)).to(dev)
    projector = FourierSliceProjector(volumes.to(dev))
    kmax = config.max_frequency or (0.5 if config.reference == "backprojection" else 0.5 * data.box_size / D)
    k = frequency_grid_2d(D, 1.0)  # [D, D, 2] cycles/px
    band = k.norm(dim=-1) <= kmax
    freqs = k[band]  # [M, 2]
    scorer = _Scorer(projector, freqs.to(dev))
    full = FullBoxStream(data)  # reads on the CPU: `band` stays there, the batches go to `dev`
    levels = [tuple(x.to(dev) if torch.is_tensor(x) else x for x in level)
              for level in search_levels(config, D, kmax, freqs)]

    # copies: the caller's arrays are the poses the search started from
    rot = torch.from_numpy(np.asarray(rotations, dtype=np.float32)).to(dev, copy=True)  # [N, 3, 3]
    t = torch.from_numpy(np.asarray(shifts_px, dtype=np.float32)).to(dev, copy=True)  # [N, 2]
    coarse_rot, coarse_shifts, coarse_band, _ = levels[0]
    n_coarse = len(coarse_rot)
    err_coarse = np.empty((n, n_coarse), dtype=np.float64)
    ang_coarse = np.empty((n, n_coarse), dtype=np.float64)
    best_shift = torch.empty(n, n_coarse, 2)  # CPU: N × C can outgrow an accelerator's memory
    start_err = np.empty(n)
    bar = tqdm(total=2 * n, desc="pose search", disable=not progress, leave=False)
    for pos, img_f, ctf in full.batches(band, dev):
        for j, p in enumerate(pos):
            lab = int(labels[p])
            start_err[p] = float(scorer.errors(lab, img_f[j], ctf[j], rot[p:p + 1], t[p:p + 1]))
            cand = coarse_rot @ rot[p]  # [C, 3, 3]
            e = scorer.errors(lab, img_f[j][coarse_band], ctf[j][coarse_band], cand, t[p] + coarse_shifts,
                              coarse_band)  # [C, S]
            e_min, s_idx = e.min(dim=1)
            err_coarse[p] = e_min.double().cpu().numpy()
            best_shift[p] = (t[p] + coarse_shifts)[s_idx].cpu()
            ang_coarse[p] = angle_to(cand, prior_rot[p]).double().cpu().numpy()
            bar.update()
    # White noise, the same power per coefficient at every frequency, estimated from the best
    # coarse fits (in the low band they leave almost only noise). Tried instead: the
    # residuals at the starting poses, white (7.2× with the AdK true maps against 7.5× this
    # way) or per frequency shell as RELION's σ²(k) (7.0×; 0.163 rad against 0.157 with a
    # trained model): wrong starting poses overstate the noise.
    noise_power = float(err_coarse.min(axis=1).mean() / int(coarse_band.sum()))
    log_lik = -err_coarse / (2 * noise_power)
    # At most half the radius: a reference that says nothing (early in training) would
    # otherwise fit the widest prior and let the poses wander from search to search.
    sigma_p = (fit_prior_sigma(log_lik, ang_coarse, config.radius_rad / 2) if config.prior_sigma_rad is None
               else float(config.prior_sigma_rad))

    def log_prior(angle):
        return -angle ** 2 / (2 * sigma_p ** 2) if sigma_p > 0 else 0.0 * angle

    post = log_lik + log_prior(ang_coarse)
    keep = np.argsort(-post, axis=1)[:, :config.keep_coarse]  # [N, k] best coarse candidates
    start_post = -start_err / (2 * noise_power) + log_prior(ang_coarse[:, 0])
    final = start_post.copy()
    if len(levels) == 1:  # the coarse level was the last: take its best pose
        for p in range(n):
            c = int(keep[p, 0])
            if post[p, c] > final[p]:
                final[p], rot[p], t[p] = post[p, c], coarse_rot[c] @ rot[p], best_shift[p, c].to(dev)
    else:
        for pos, img_f, ctf in full.batches(band, dev):
            for j, p in enumerate(pos):
                lab = int(labels[p])
                seeds = [(coarse_rot[c] @ rot[p], best_shift[p, c].to(dev)) for c in keep[p]]
                for cand_rot, sg, sub, last in levels[1:]:
                    found = []
                    for r0, t0 in seeds:
                        cand = cand_rot @ r0
                        e = scorer.errors(lab, img_f[j][sub], ctf[j][sub], cand, t0 + sg, sub)
                        lp = (-e.double() / (2 * noise_power)
                              + log_prior(angle_to(cand, prior_rot[p]).double())[:, None])
                        c, s_ = divmod(int(torch.argmax(lp)), len(sg))
                        found.append((float(lp[c, s_]), cand[c], t0 + sg[s_]))
                    found.sort(key=lambda f: -f[0])
                    seeds = [(r_, t_) for _, r_, t_ in found[:1]]  # one candidate after the first refinement
                    if last and found[0][0] > final[p]:
                        final[p] = found[0][0]
                        rot[p], t[p] = found[0][1], found[0][2]
                bar.update()
    bar.close()
    gain = float(np.mean(final - start_post))
    if config.prior_sigma_rad is None and sigma_p >= config.radius_rad / 2 * 0.999:
        logger.warning("pose search: the prior width fitted to the data reached its cap, half the search "
                       "radius (%.3g rad): either the input poses are further off than the search reaches "
                       "(increase the radius) or the model's maps do not yet constrain the poses",
                       config.radius_rad)
    logger.info("pose search: %d particles, %d references, band ≤ %.3g cycles/px (%d coefficients), "
                "prior σ = %.3g rad, mean log-posterior gain %.3g", n, len(projector), kmax, len(freqs), sigma_p, gain)
    return PoseSearchResult(rot.cpu().numpy(), t.cpu().numpy(), sigma_p, noise_power, gain)
