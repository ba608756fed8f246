"""What a pose search does: :class:`PoseSearchConfig`, the algorithm's own options in radians and
pixels. The trainer declares the user-facing ``--pose-search-*`` options in degrees and converts
them here, in :meth:`PoseSearchConfig.from_degrees` only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["REFERENCE_KINDS", "PoseSearchConfig"]

# Measured with back-projected references (docs/benchmarks.md, "Pose search cost").
INFORMATION_FRACTION = 0.999

# What the particles can be matched against (:mod:`.references`).
REFERENCE_KINDS = ("backprojection", "model")

# From this many particles on, the back-projected references get a group per CLASSIFY_PER_GROUP
# particles (at most MAX_AUTO_GROUPS) and the groups are sharpened by CLASSIFY_ROUNDS rounds of
# classification (:mod:`.classification`). Measured at 20 000 AdK particles only (docs/benchmarks.md);
# below, the 4 K-means groups measured at 2000–8000 particles stay.
CLASSIFY_MIN_PARTICLES = 10_000
CLASSIFY_PER_GROUP = 2000
MAX_AUTO_GROUPS = 16
CLASSIFY_ROUNDS = 2


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
        rotations); each finer level divides the spacing by ``refine_factor`` over a ball
        just covering one cell of the previous grid.
    refine_factor : int
        How much finer each level's grid is than the previous one's. 2 (the default) scores
        27 rotations per seed and level, 3 scored 81: halving thrice (0.06 → 0.0075 rad) costs
        81 slices where dividing by 3 twice (0.06 → 0.0067 rad) cost 162, and 4 coarse seeds
        make the first fine level count 4 times (docs/benchmarks.md measures both).
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
        holds nothing finer); see :meth:`band_limit`.
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
        From ``CLASSIFY_MIN_PARTICLES`` particles on, the back-projected default is one group
        per ``CLASSIFY_PER_GROUP`` particles (at most ``MAX_AUTO_GROUPS``): see :meth:`groups`.
    classify_rounds : int, optional
        Rounds of classification of the back-projected groups (:mod:`.classification`): each
        particle moves to the group whose map fits it best at its current pose. Default 2 from
        ``CLASSIFY_MIN_PARTICLES`` particles on, else 0 (K-means of the latents alone). Measured
        on AdK, 20 000 particles, poses 3.5° off: one search reached 0.0560 rad with 10
        classified groups against 0.0627 with 4 K-means groups and 0.0634 with 10.
    keep_coarse : int
        Best coarse poses refined at the next level (the posterior can have several basins).
    information_fraction : float
        The band is further cut where the references hold this fraction of what a slice says
        about the pose (:func:`~.grids.information_band`); 1 scores the whole band. A map
        back-projected from poses a few degrees off has almost nothing beyond its resolution,
        and those coefficients cost as much to interpolate as any other.
    """

    radius_rad: float = 0.36
    coarse_step_rad: Optional[float] = None
    refine_factor: int = 2
    fine_levels: Optional[int] = None
    final_step_rad: float = 0.0075
    shift_radius_px: float = 3.0
    coarse_shift_step_px: Optional[float] = None
    max_frequency: Optional[float] = None
    prior_sigma_rad: Optional[float] = None
    reference: str = "backprojection"
    n_references: Optional[int] = None
    classify_rounds: Optional[int] = None
    keep_coarse: int = 4
    information_fraction: float = INFORMATION_FRACTION

    def __post_init__(self) -> None:
        if not 0 < self.radius_rad <= math.pi:
            raise ValueError(f"radius_rad must be in (0, π], got {self.radius_rad}")
        if self.coarse_step_rad is not None and not 0 < self.coarse_step_rad <= self.radius_rad:
            raise ValueError("need 0 < coarse_step_rad <= radius_rad")
        if self.coarse_shift_step_px is not None and not 0 < self.coarse_shift_step_px:
            raise ValueError("coarse_shift_step_px must be > 0")
        if self.refine_factor < 2:
            raise ValueError(f"refine_factor must be an integer >= 2, got {self.refine_factor}")
        if self.final_step_rad <= 0 or (self.fine_levels is not None and self.fine_levels < 0):
            raise ValueError("final_step_rad must be > 0 and fine_levels >= 0")
        if self.shift_radius_px < 0 or (self.n_references is not None and self.n_references < 1) \
                or self.keep_coarse < 1:
            raise ValueError("shift_radius_px must be >= 0, n_references and keep_coarse >= 1")
        if self.classify_rounds is not None and self.classify_rounds < 0:
            raise ValueError(f"classify_rounds must be >= 0, got {self.classify_rounds}")
        if self.reference not in REFERENCE_KINDS:
            raise ValueError(f"reference must be one of {REFERENCE_KINDS}, got {self.reference!r}")
        if not 0 < self.information_fraction <= 1:
            raise ValueError(f"information_fraction must be in (0, 1], got {self.information_fraction}")
        if self.prior_sigma_rad is not None and self.prior_sigma_rad < 0:
            raise ValueError("prior_sigma_rad must be >= 0 (0: no prior) or None (fitted)")

    @classmethod
    def from_degrees(cls, radius_deg: float, prior_sigma_deg: Optional[float] = None,
                     **options) -> "PoseSearchConfig":
        """The config of the user-facing options: search radius and prior width in degrees
        (None: the prior is fitted), the other fields (``reference``, ``n_references``, …) as
        keyword arguments. The one place where the search's degrees become radians."""
        prior = None if prior_sigma_deg is None else math.radians(prior_sigma_deg)
        return cls(radius_rad=math.radians(radius_deg), prior_sigma_rad=prior, **options)

    def groups(self, n_particles: int = 0) -> int:
        """K-means groups of the latents: ``n_references``, else the reference kind's default
        for ``n_particles`` particles (16 for the model's maps; 4 back-projected, or one per
        ``CLASSIFY_PER_GROUP`` particles up to ``MAX_AUTO_GROUPS`` from ``CLASSIFY_MIN_PARTICLES``
        on)."""
        if self.n_references:
            return self.n_references
        if self.reference == "model":
            return 16
        if n_particles >= CLASSIFY_MIN_PARTICLES:
            return max(4, min(MAX_AUTO_GROUPS, n_particles // CLASSIFY_PER_GROUP))
        return 4

    def classification_rounds(self, n_particles: int) -> int:
        """Rounds of classification of back-projected groups (``classify_rounds``, else 2 from
        ``CLASSIFY_MIN_PARTICLES`` particles on, 0 below); always 0 for the model's maps."""
        if self.reference != "backprojection":
            return 0
        if self.classify_rounds is not None:
            return self.classify_rounds
        return CLASSIFY_ROUNDS if n_particles >= CLASSIFY_MIN_PARTICLES else 0

    def band_limit(self, box_size: int, model_box_size: Optional[int] = None) -> float:
        """Highest frequency scored (cycles/px of the particles' box ``box_size``):
        ``max_frequency``, else the Nyquist of the box the model trains at (``model_box_size``)
        for the model's maps, else the particles' Nyquist (0.5)."""
        if self.max_frequency:
            return self.max_frequency
        if self.reference == "model" and model_box_size is not None:
            return 0.5 * model_box_size / box_size
        return 0.5

    def rotation_steps(self) -> list[float]:
        """Rotation grid spacing (rad) of each level, coarse first."""
        steps = [self.coarse_step_rad or self.radius_rad / 6]
        if self.fine_levels is not None:
            steps += [steps[0] / self.refine_factor ** (i + 1) for i in range(self.fine_levels)]
        else:
            while steps[-1] > self.final_step_rad * (1 + 1e-9):
                steps.append(steps[-1] / self.refine_factor)
        return steps
