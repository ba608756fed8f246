"""Local pose refinement by projection matching (MAP search), with the references a run has.

The orientation encoder of paper §3.2 learns the input poses in pose-only pre-training, but
its joint phase, on CPU budgets, brought them back to about the input error and not below it
(``bench/bench_pose_refinement.py --method encoder``, docs/benchmarks.md). This module refines
poses the way a local search in RELION does:

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
   enough; then grids half as fine (``refine_factor``) around the 4 best coarse poses, then
   around the best, the last at the full band. The current pose is scored too and kept unless
   beaten, so the posterior never gets worse. Each level slices the references' spectra from
   a cube cropped to its own band (:meth:`FourierSliceProjector.cropped`), which keeps them in
   the CPU's caches.

Cost per particle and level: ``≈ (4π/3)(radius/step)³`` slices of the level's frequencies plus
one ``[C, M] × [M, S]`` product. Only one frequency of each Hermitian pair ``±k`` is scored,
with weight 2 (:func:`~.grids.half_band`): images and slices of real objects and the CTF give
both the same terms. The band stops where the references hold 99.9 % of what a slice says about
the pose (``information_fraction``): a reconstruction from poses a few degrees off is
Wiener-filtered to almost nothing beyond its resolution. Measured at D = 64 on 2 CPU cores,
20° radius (``bench/bench_pose_search.py``, docs/benchmarks.md): 107–118 ms per particle for
the first version (whole band, both halves, one core slicing); now 11–12 ms with references
back-projected from the input poses and 15–17 ms with references as sharp as the true poses
give, with the same poses found.
The search runs on a CUDA device when it is given one, else on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from cryoformer.physics.slice_projector import FourierSliceProjector
from cryoformer.progress import Progress, resolve_style

from .config import PoseSearchConfig
from .grids import SearchLevel, angle_to, fit_prior_sigma, scored_band, search_levels
from .particles import Particles
from .references import Decoder, make_references

__all__ = ["PoseSearchResult", "search_poses", "search_with_references"]

logger = logging.getLogger(__name__)


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

    def __init__(self, projector: FourierSliceProjector, freqs: torch.Tensor, weights: torch.Tensor) -> None:
        self.projector, self.freqs = projector, freqs  # freqs [M, 2] cycles/px
        self.weights = weights  # [M]: 2 where the frequency stands for its Hermitian partner too

    def shift_basis(self, offsets_px: torch.Tensor, sub: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``exp(−2πi k·δ)`` ``[S, M']`` for shift offsets ``δ`` [S, 2] (px) at the band's
        frequencies (``sub`` of them): fixed per level, so computed once per search."""
        freqs = self.freqs if sub is None else self.freqs[sub]  # [M', 2]
        phase = -2 * torch.pi * (offsets_px @ freqs.T)  # [S, M']
        return torch.polar(torch.ones_like(phase), phase)

    def errors(self, ref: int, image_f: torch.Tensor, ctf: torch.Tensor,
               rotations: torch.Tensor, shift_px: torch.Tensor, basis: Optional[torch.Tensor] = None,
               sub: Optional[torch.Tensor] = None,
               projector: Optional[FourierSliceProjector] = None) -> torch.Tensor:
        """``min_a ‖Î − a·CTF·slice(R)·exp(2πi k·(s + δ))‖²`` for every rotation [C] × shift
        offset δ [S] → [C, S].

        The amplitude ``a ≥ 0`` is fitted per particle and pose (profiled out): the
        reference's scale is arbitrary, and one fixed scale fitted at wrong poses would be
        too small and favour the projections with the most energy. ``shift_px`` [2] is the
        shift the offsets are added to; ``basis`` [S, M'] the offsets' phases
        (:meth:`shift_basis`; None: the shift alone, S = 1). ``sub`` selects part of the band
        (``image_f`` and ``ctf`` are then given on that part); ``projector`` the same spectra
        cropped to that part's band (:meth:`FourierSliceProjector.cropped`)."""
        freqs = self.freqs if sub is None else self.freqs[sub]  # [M', 2]; image_f, ctf: [M']
        w = self.weights if sub is None else self.weights[sub]  # [M']
        slices = (projector or self.projector).slices(ref, rotations, freqs)  # [C, M'] complex
        # The CTF is real, so Re Σ_k conj(CTF·slice·e^{2πi k·(s+δ)})·Î = Re Σ_k slice·conj(H_kδ)
        # with H = CTF·Î·e^{−2πi k·s}·e^{−2πi k·δ}: every shift at once in one [C, M'] × [M', S]
        # product, and nothing [C, M']-sized computed besides the slices
        h = (w * ctf) * image_f * torch.polar(torch.ones_like(freqs[:, 0]), -2 * torch.pi * (freqs @ shift_px))  # [M']
        h = h[:, None] if basis is None else (basis * h).T  # [M', S]
        cross = (slices @ h.conj()).real  # [C, S]
        energy = torch.view_as_real(slices).square().sum(-1) @ (w * ctf.square())  # [C]
        return image_f.abs().square() @ w - cross.clamp(min=0).square() / energy.clamp(min=1e-30)[:, None]


def _log_prior(angle_rad, sigma_rad: float):
    """Gaussian log prior (unnormalised) of angles to the input rotation; flat when σ = 0."""
    return -angle_rad ** 2 / (2 * sigma_rad ** 2) if sigma_rad > 0 else 0.0 * angle_rad


@dataclass(frozen=True)
class _CoarseFits:
    """The coarse level scored for every particle (the noise and the prior are fitted on it)."""

    errors: np.ndarray  # [N, C] squared error at each coarse rotation, best shift
    angles_rad: np.ndarray  # [N, C] angle of each coarse rotation to the prior's centre
    best_shifts_px: torch.Tensor  # [N, C, 2] CPU: N × C can outgrow an accelerator's memory
    start_errors: np.ndarray  # [N] squared error at the starting pose
    n_coefficients: int  # coefficients the coarse level scores (Hermitian pairs twice)


@torch.no_grad()
def search_poses(particles: Particles, rotations: np.ndarray, shifts_px: np.ndarray, latents: np.ndarray,
                 config: PoseSearchConfig = PoseSearchConfig(), *, decode: Optional[Decoder] = None,
                 model_box_size: Optional[int] = None, prior_rotations: Optional[np.ndarray] = None,
                 seed: int = 0, progress=True, reference_rows: Optional[np.ndarray] = None,
                 device: Optional[torch.device] = None) -> PoseSearchResult:
    """Refine every particle's pose around ``(rotations, shifts_px)`` against the references
    ``config.reference`` names (:func:`~.references.make_references`).

    Parameters
    ----------
    particles : Particles
        The particles at their original box ``D``.
    rotations : np.ndarray [N, 3, 3]
        Current rotations (docs/conventions.md); the grids are centred on them.
    shifts_px : np.ndarray [N, 2]
        Current shifts, pixels of the original box.
    latents : np.ndarray [N, zdim]
        The particles' latents (their K-means groups get a reference each).
    config : PoseSearchConfig
    decode : callable, optional
        ``decode(z [k, zdim] float32 CPU) → [k, D, D, D]``: the model's maps (needed for
        ``reference="model"``).
    model_box_size : int, optional
        Box the model trains at: the model's maps are scored up to its Nyquist (unless
        ``config.max_frequency`` is set).
    prior_rotations : np.ndarray [N, 3, 3], optional
        Centre of the angle prior (the user's input poses); default ``rotations``.
    seed : int
        For K-means.
    progress : bool or str
        A style of :mod:`cryoformer.progress` (``"bars"``, ``"lines"``, ``"off"``), or a bool
        (True: a bar on a terminal, plain lines in a log file).
    reference_rows : np.ndarray, optional
        Positions of the particles back-projected into the references (default all; every
        particle is searched either way).
    device : torch.device, optional
        The search runs there when it is a CUDA device, else on the CPU.

    Returns
    -------
    PoseSearchResult
    """
    if len(latents) != len(particles):
        raise ValueError(f"need one latent per particle: {len(latents)} for {len(particles)}")
    vols, labels = make_references(config, particles, rotations, shifts_px, latents, decode, seed, reference_rows)
    cuda = device is not None and torch.device(device).type == "cuda"
    return search_with_references(vols, labels, particles, rotations, shifts_px, config, prior_rotations,
                                  progress, device=device if cuda else None, model_box_size=model_box_size)


def _check_inputs(volumes: torch.Tensor, labels: np.ndarray, n: int, D: int, rotations: np.ndarray,
                  shifts_px: np.ndarray) -> np.ndarray:
    """Raise ValueError unless the shapes fit ``n`` particles of box ``D``; the labels as int64."""
    if np.shape(rotations) != (n, 3, 3) or np.shape(shifts_px) != (n, 2):
        raise ValueError(f"need [N, 3, 3] rotations and [N, 2] shifts for N={n} particles")
    if volumes.dim() != 4 or volumes.shape[-1] != D:
        raise ValueError(f"references must be [K, {D}, {D}, {D}], got {tuple(volumes.shape)}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(volumes):
        raise ValueError(f"labels must be {n} indices into the {len(volumes)} references")
    return labels


class _LocalSearch:
    """One search's fixed parts: the references' spectra, the band, the level grids, the
    particles' labels and prior centres, all on ``device``."""

    def __init__(self, volumes: torch.Tensor, labels: np.ndarray, particles: Particles,
                 prior_rotations: np.ndarray, config: PoseSearchConfig, device: torch.device,
                 model_box_size: Optional[int]) -> None:
        D = particles.box_size
        self.particles, self.labels, self.device = particles, labels, device
        self.prior_rot = torch.from_numpy(np.asarray(prior_rotations, dtype=np.float32)).to(device)  # [N, 3, 3]
        self.projector = FourierSliceProjector(volumes.to(device))
        # band [D, D] (CPU: the particles are read there), weights [M], freqs [M, 2] cycles/px
        self.kmax, self.band, weights, self.freqs = scored_band(
            self.projector, D, config.information_fraction, config.band_limit(D, model_box_size))
        self.levels = [level.to(device) for level in search_levels(config, D, self.kmax, self.freqs, weights)]
        # each level reads the spectra from a cube cropped to its own band: the same samples,
        # fewer cache misses (the coarse level's band is a third of the Nyquist or less)
        radius = self.freqs.norm(dim=-1).to(device)  # [M]
        self.level_projectors = [self.projector.cropped(float(radius[level.band].max()) if level.band.any() else 0.0)
                                 for level in self.levels]
        self.projector = self.projector.cropped(self.kmax)
        self.scorer = _Scorer(self.projector, self.freqs.to(device), weights.to(device))
        self.shift_bases = [self.scorer.shift_basis(level.shifts_px, level.band) for level in self.levels]  # [S, M_l]

    def spectra(self):
        """``(positions [b], spectra [b, M], ctf [b, M])`` of every particle, on the device."""
        return self.particles.spectra(self.band, self.device)

    def score_coarse(self, rot: torch.Tensor, t: torch.Tensor, bar: Progress) -> _CoarseFits:
        """Every particle at its current pose ``(rot [N, 3, 3], t [N, 2])`` and on the coarse grid."""
        n, coarse = len(rot), self.levels[0]
        n_rot = len(coarse.rotations)
        fits = _CoarseFits(np.empty((n, n_rot), dtype=np.float64), np.empty((n, n_rot), dtype=np.float64),
                           torch.empty(n, n_rot, 2), np.empty(n), coarse.n_coefficients)
        for pos, img_f, ctf in self.spectra():
            for j, p in enumerate(pos):
                lab = int(self.labels[p])
                fits.start_errors[p] = float(self.scorer.errors(lab, img_f[j], ctf[j], rot[p:p + 1], t[p]))
                cand = coarse.rotations @ rot[p]  # [C, 3, 3]
                shifts = t[p] + coarse.shifts_px  # [S, 2]
                e = self.scorer.errors(lab, img_f[j][coarse.band], ctf[j][coarse.band], cand, t[p],
                                       self.shift_bases[0], coarse.band, self.level_projectors[0])  # [C, S]
                e_min, s_idx = e.min(dim=1)
                fits.errors[p] = e_min.double().cpu().numpy()
                fits.best_shifts_px[p] = shifts[s_idx].cpu()
                fits.angles_rad[p] = angle_to(cand, self.prior_rot[p]).double().cpu().numpy()
                bar.update()
        return fits

    def refine_one(self, p: int, img_f: torch.Tensor, ctf: torch.Tensor, seeds: list,
                   noise_power: float, sigma_p: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Particle ``p`` through the fine levels from ``seeds`` (its best coarse poses, best
        first) → (log posterior, rotation [3, 3], shift [2]) of the best pose of the last level.

        After the first fine level only the best candidate goes on."""
        lab = int(self.labels[p])
        for level, projector, basis in zip(self.levels[1:], self.level_projectors[1:], self.shift_bases[1:]):
            found = []
            for r0, t0 in seeds:
                cand = level.rotations @ r0  # [C, 3, 3]
                e = self.scorer.errors(lab, img_f[level.band], ctf[level.band], cand, t0, basis,
                                       level.band, projector)  # [C, S]
                lp = (-e.double() / (2 * noise_power)
                      + _log_prior(angle_to(cand, self.prior_rot[p]).double(), sigma_p)[:, None])
                c, s = divmod(int(torch.argmax(lp)), len(level.shifts_px))
                found.append((float(lp[c, s]), cand[c], t0 + level.shifts_px[s]))
            found.sort(key=lambda f: -f[0])
            seeds = [(r, t) for _, r, t in found[:1]]
        return found[0]


def _fit_noise_and_prior(fits: _CoarseFits, config: PoseSearchConfig) -> tuple[float, float]:
    """(noise power σ² per coefficient, prior width σ_p rad) from the coarse fits.

    White noise, the same power per coefficient at every frequency, estimated from the best
    coarse fits (in the low band they leave almost only noise). Tried instead: the residuals
    at the starting poses, white (7.2× with the AdK true maps against 7.5× this way) or per
    frequency shell as RELION's σ²(k) (7.0×; 0.163 rad against 0.157 with a trained model):
    wrong starting poses overstate the noise."""
    noise_power = float(fits.errors.min(axis=1).mean() / fits.n_coefficients)
    if config.prior_sigma_rad is not None:
        return noise_power, float(config.prior_sigma_rad)
    # At most half the radius: a reference that says nothing (early in training) would
    # otherwise fit the widest prior and let the poses wander from search to search.
    return noise_power, fit_prior_sigma(-fits.errors / (2 * noise_power), fits.angles_rad, config.radius_rad / 2)


@torch.no_grad()
def search_with_references(volumes: torch.Tensor, labels: np.ndarray, particles: Particles,
                           rotations: np.ndarray, shifts_px: np.ndarray,
                           config: PoseSearchConfig = PoseSearchConfig(),
                           prior_rotations: Optional[np.ndarray] = None, progress=True,
                           device: Optional[torch.device] = None,
                           model_box_size: Optional[int] = None) -> PoseSearchResult:
    """The search of :func:`search_poses` against given reference volumes.

    Parameters
    ----------
    volumes : torch.Tensor [K, D, D, D]
        References at the particles' original box ``D`` (any device; copied to ``device``).
    labels : np.ndarray [N]
        Which reference each particle is matched against.
    particles, rotations, shifts_px, config, prior_rotations, progress, model_box_size
        As :func:`search_poses`.
    device : torch.device, optional
        Where the references' spectra are sliced and scored (default the CPU). The particles
        are read on the CPU and sent there a chunk at a time; the result is the same up to
        floating-point summation order.

    Returns
    -------
    PoseSearchResult
    """
    n = len(particles)
    labels = _check_inputs(volumes, labels, n, particles.box_size, rotations, shifts_px)
    dev = torch.device("cpu") if device is None else torch.device(device)
    search = _LocalSearch(volumes, labels, particles, rotations if prior_rotations is None else prior_rotations,
                          config, dev, model_box_size)
    # copies: the caller's arrays are the poses the search started from
    rot = torch.from_numpy(np.asarray(rotations, dtype=np.float32)).to(dev, copy=True)  # [N, 3, 3]
    t = torch.from_numpy(np.asarray(shifts_px, dtype=np.float32)).to(dev, copy=True)  # [N, 2]
    # a step per particle for the coarse level and one for the fine ones; plain lines in a batch log
    steps = n if len(search.levels) == 1 else 2 * n
    bar = Progress(steps, "pose search", resolve_style(progress), unit="particle", images_per_step=1)
    fits = search.score_coarse(rot, t, bar)
    noise_power, sigma_p = _fit_noise_and_prior(fits, config)
    post = -fits.errors / (2 * noise_power) + _log_prior(fits.angles_rad, sigma_p)  # [N, C]
    keep = np.argsort(-post, axis=1)[:, :config.keep_coarse]  # [N, k] best coarse candidates
    # coarse rotation 0 is the identity offset: angles_rad[:, 0] is the starting pose's
    start_post = -fits.start_errors / (2 * noise_power) + _log_prior(fits.angles_rad[:, 0], sigma_p)
    final = start_post.copy()
    if len(search.levels) == 1:  # the coarse level was the last: take its best pose
        _take_best_coarse(search.levels[0], fits, post, keep, final, rot, t)
    else:
        _refine_all(search, fits, keep, noise_power, sigma_p, final, rot, t, bar)
    bar.close()
    gain = float(np.mean(final - start_post))
    if config.prior_sigma_rad is None and sigma_p >= config.radius_rad / 2 * 0.999:
        logger.warning("pose search: the prior width fitted to the data reached its cap, half the search "
                       "radius (%.3g rad): either the input poses are further off than the search reaches "
                       "(increase the radius) or the model's maps do not yet constrain the poses",
                       config.radius_rad)
    logger.info("pose search: %d particles, %d references, band ≤ %.3g cycles/px (%d coefficients, %d scored: "
                "one of each Hermitian pair), prior σ = %.3g rad, mean log-posterior gain %.3g", n,
                len(search.projector), search.kmax, search.levels[-1].n_coefficients, len(search.freqs), sigma_p, gain)
    return PoseSearchResult(rot.cpu().numpy(), t.cpu().numpy(), sigma_p, noise_power, gain)


def _take_best_coarse(coarse: SearchLevel, fits: _CoarseFits, post: np.ndarray, keep: np.ndarray,
                      final: np.ndarray, rot: torch.Tensor, t: torch.Tensor) -> None:
    """Move each particle to its best coarse pose where that beats ``final`` (in place)."""
    for p in range(len(rot)):
        c = int(keep[p, 0])
        if post[p, c] > final[p]:
            final[p], rot[p], t[p] = post[p, c], coarse.rotations[c] @ rot[p], fits.best_shifts_px[p, c].to(rot.device)


def _refine_all(search: _LocalSearch, fits: _CoarseFits, keep: np.ndarray, noise_power: float,
                sigma_p: float, final: np.ndarray, rot: torch.Tensor, t: torch.Tensor, bar: Progress) -> None:
    """The fine levels for every particle from its ``keep`` best coarse poses; a particle moves
    where the last level's best beats ``final`` (``final``, ``rot``, ``t`` updated in place)."""
    coarse_rot = search.levels[0].rotations
    for pos, img_f, ctf in search.spectra():
        for j, p in enumerate(pos):
            seeds = [(coarse_rot[c] @ rot[p], fits.best_shifts_px[p, c].to(rot.device)) for c in keep[p]]
            best, r, s = search.refine_one(p, img_f[j], ctf[j], seeds, noise_power, sigma_p)
            if best > final[p]:
                final[p], rot[p], t[p] = best, r, s
            bar.update()
