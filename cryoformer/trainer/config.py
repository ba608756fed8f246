"""Training configuration: frozen option groups, each option declared once.

:class:`TrainConfig` holds what the data, the optimiser and the schedule need, as nested
groups; the network is described by a separate :class:`~cryoformer.model.ModelConfig`, of
which ``cryoformer train`` exposes a few fields (:class:`ModelOptions`). Every option is a
field made with :func:`cryoformer.options.option`: its flag, help, unit and resume policy are
declared there and nowhere else — the ``train`` command's flags, the resume checks and the
saved form are derived from them. Each group validates itself on construction
(``InputError(None, "--flag", message)``); :class:`TrainConfig` checks what spans groups.

Saved form: ``RUN/config.yaml`` and every checkpoint hold :meth:`TrainConfig.to_dict`, the
flat ``{option: value}`` dict; :meth:`TrainConfig.from_dict` reads it or the nested form
(``{"data": {...}, ...}``), filling in the options a saved config predates as it behaved.

Units are in the names: ``*_px`` pixels, ``*_deg`` degrees, ``max_minutes`` minutes of wall
clock. Paths are stored absolute, so a run directory can be analysed from anywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from cryoformer import options
from cryoformer.errors import InputError
from cryoformer.model import PRESETS, ModelConfig, model_config_from_preset
from cryoformer.model.get_query import GET_QUERY_MODES
from cryoformer.options import FROM_RUN, MUST_MATCH, option, option_group
from cryoformer.refinement import REFERENCE_KINDS

DEVICES = ("auto", "cpu", "cuda")

# ModelConfig's GetQuery modes, the default first (as the help lists them).


def _abs(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(os.fspath(path))


def _bad(flag: str, message: str) -> InputError:
    return InputError(None, flag, message)


@dataclass(frozen=True)
class DataOptions:
    """What is read, and where the run is written (paths made absolute).

    ``poses``/``ctf`` None: taken from ``particles`` when it is a ``.star``/``.cs`` (else an
    error for the poses, no CTF for the CTF). ``gt_poses`` are only reported against, never
    trained on. ``invert_data``: RELION/cryoSPARC particles are contrast-inverted relative to
    the model's ``projection ⊛ CTF`` (docs/conventions.md, "Contrast"); ``check_contrast``
    refuses, before a new run, an ``invert_data`` the images contradict
    (:func:`.data.check_contrast`). ``cs_class``: the class ``K`` whose
    ``alignments_class_K`` poses a cryoSPARC ``.cs`` supplies
    (:func:`cryoformer.io.cryosparc.poses_from_cs`).
    """

    particles: str = option(
        "particles", nargs="?", resume=MUST_MATCH,
        help="particles: .mrcs/.mrc stack, .txt list of stacks, RELION .star or cryoSPARC .cs "
             "(optional with --resume)")
    outdir: str = option("-o", "--outdir", required=True, help="run directory to write")
    poses: Optional[str] = option(
        "--poses", default=None, resume=MUST_MATCH,
        help="poses .pkl (cryoDRGN)/.star/.cs; shifts in px (default: PARTICLES if .star/.cs)")
    ctf: Optional[str] = option(
        "--ctf", default=None, resume=MUST_MATCH,
        help="CTF .pkl/.star/.cs (default: PARTICLES if .star/.cs, else no CTF)")
    datadir: Optional[str] = option(
        "--datadir", default=None, resume=MUST_MATCH,
        help="directory of the stacks named in a .txt/.star/.cs")
    ind: Optional[str] = option(
        "--ind", default=None, resume=MUST_MATCH,
        help="subset: .npy/.pkl of 0-based particle indices")
    cs_class: Optional[int] = option(
        "--cs-class", default=None, metavar="K", resume=MUST_MATCH, legacy=None,
        help="cryoSPARC class whose poses to read from a .cs with per-class alignments "
             "(alignments_class_K/*, from ab-initio or heterogeneous refinement); required when "
             "such a file has several classes and no alignments3D")
    gt_poses: Optional[str] = option(
        "--gt-poses", default=None,
        help="ground-truth poses (.pkl/.star/.cs) to log rotation (rad) and shift (px) errors "
             "per epoch; never used for training")
    box_size: Optional[int] = option(
        "--box", default=None, unit="px", resume=MUST_MATCH,
        help="train at this box size in px (even, <= D), Fourier-cropping on the fly; shifts and "
             "the CTF pixel size (Å/px) are rescaled (default: the stack's D)")
    invert_data: bool = option(
        "--uninvert-data", default=True, switch="store_false", resume=MUST_MATCH,
        help="do not multiply images by -1. By default images are inverted, as RELION/cryoSPARC "
             "particles (and `cryoformer simulate --contrast relion`) are -(projection*CTF); "
             "use this flag for cryoDRGN-convention data (+projection*CTF) and for CTF-free "
             "images with positive (white) density")
    check_contrast: bool = option(
        "--no-contrast-check", default=True, switch="store_false",
        help="skip the check that the images' contrast (read from the lowest Fourier rings "
             "of up to 2000 phase-flipped images) agrees with --uninvert-data; for stacks "
             "the check cannot read, e.g. images already phase-flipped")

    def __post_init__(self) -> None:
        for name in ("particles", "outdir", "poses", "ctf", "datadir", "ind", "gt_poses"):
            object.__setattr__(self, name, _abs(getattr(self, name)))
        if self.box_size is not None and (self.box_size < 8 or self.box_size % 2):
            raise _bad("--box", f"must be even and >= 8, got {self.box_size}")
        if self.cs_class is not None and self.cs_class < 0:
            raise _bad("--cs-class", f"must be a class number >= 0, got {self.cs_class}")


@dataclass(frozen=True)
class OptimisationOptions:
    """The objective and its optimiser: epochs of the image loss (the pose pre-training of
    ``refine_poses`` comes on top), global batch (split across DDP ranks), AdamW, the KL weight
    (per image, divided by ``D²`` like the per-pixel MSE; variational models only) and the
    seed of the initialisation, the data order and every random draw."""

    epochs: int = option("-n", "--epochs", default=20, help="training epochs (default {default})")
    batch_size: int = option(
        "-b", "--batch-size", default=16, unit="images", resume=MUST_MATCH,
        help="global batch size in images, split over DDP processes (default {default})")
    lr: float = option("--lr", default=2e-3, resume=MUST_MATCH,
                       help="AdamW learning rate (default {default:g})")
    weight_decay: float = option("--weight-decay", default=0.0, resume=MUST_MATCH,
                                 help="AdamW weight decay (default {default:g})")
    kl_weight: float = option(
        "--kl-weight", default=1.0, resume=MUST_MATCH,
        help="KL weight (per image / D² px) for --variational models (default {default:g})")
    seed: int = option("--seed", default=0, resume=MUST_MATCH, help="random seed (default {default})")
    # A new run's starting point, kept in the run's record; a resumed run restores its own
    # last.pt instead, so the saved value stays (FROM_RUN).
    load: Optional[str] = option(
        "--load", default=None, metavar="CKPT", resume=FROM_RUN, legacy=None,
        help="start a new run in -o from the model weights and optimiser state (Adam moments) "
             "of checkpoint CKPT (RUN/checkpoints/epoch_XXX.pt or last.pt of another run), as "
             "cryoDRGN's --load; the architecture is the checkpoint's (model options, if "
             "given, must match it), epochs count from 1, --lr and --weight-decay are this "
             "run's. To continue the run in -o itself, use --resume")

    def __post_init__(self) -> None:
        object.__setattr__(self, "load", _abs(self.load))
        if self.epochs < 0:
            raise _bad("--epochs", f"must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise _bad("--batch-size", f"must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise _bad("--lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.kl_weight < 0:
            raise _bad("--weight-decay/--kl-weight/--pose-weight", "weights must be >= 0")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how long the run computes; none of it changes the result.

    ``max_minutes``: the wall time of the whole run. Training stops cleanly at the first step
    that leaves less than the held-out pass needs (its measured time, else an upper estimate,
    at most half the budget), then writes a checkpoint, the latents of the partial epoch and
    its held-out score. ``num_workers`` None: 0 on CPU (the cores are busy
    training), 4 on CUDA. ``log_every_steps``: ``log.csv`` rows every this many optimiser steps
    (and at epoch end). ``amp``: bf16 autocast on CUDA (never on CPU: slower, less accurate).
    ``slab_tuning``: the CPU slab size of the density head chosen from timed steps
    (:mod:`.slab_tuning`).
    """

    max_minutes: Optional[float] = option(
        "--max-minutes", default=None, unit="min",
        help="wall-clock budget in minutes for the whole run: training stops in time to score the "
             "held-out images and write a checkpoint and latents within it")
    device: str = option("--device", default="auto", choices=DEVICES,
                         help="auto (default): CUDA when available")
    num_workers: Optional[int] = option(
        "--num-workers", default=None, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    log_every_steps: int = option(default=20, unit="steps")
    amp: bool = option("--no-amp", default=True, switch="store_false",
                       help="no bf16 autocast on CUDA (never used on CPU)")
    slab_tuning: bool = option(
        "--no-slab-tuning", default=True, switch="store_false",
        help="on CPU, keep the default slab of the density head (2^17/batch voxels) instead of "
             "timing 4 slab sizes on the first steps of the run (and again when the support "
             "mask shrinks) and keeping the fastest; the results are the same either way")

    def __post_init__(self) -> None:
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise _bad("--max-minutes", f"must be > 0, got {self.max_minutes}")
        if self.device not in DEVICES:
            raise _bad("--device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise _bad("--num-workers", f"must be >= 0, got {self.num_workers}")
        if self.log_every_steps < 1:
            raise _bad("log_every_steps", "must be >= 1")


# Measured on the hinged molecule, 2000 particles (docs/benchmarks.md, "Pose refinement").
WARMUP_EPOCHS = 3
POSE_LR_SCALE = 0.1


@dataclass(frozen=True)
class PoseRefinementOptions:
    """Training the orientation encoder (paper §3.2): ``pose_pretrain_epochs`` passes of
    pose-only pre-training (cheap: no rendering), then joint training with the loss
    ``MSE + pose_weight · L_pose`` (paper eq. 2 with per-image mean), rendering at the
    predicted poses."""

    refine_poses: bool = option(
        "--refine-poses", default=False, switch="store_true", resume=MUST_MATCH,
        help="learn poses with the orientation encoder: pose-only pre-training, then image "
             "loss + λ·pose loss; refined poses go to RUN/poses/epoch_XXX.pkl")
    pose_pretrain_epochs: int = option(
        "--pose-pretrain-epochs", default=50, resume=MUST_MATCH,
        help="passes of pose-only pre-training, the learning rate decaying from --lr to 0 over "
             "them (default {default})")
    pose_weight: float = option("--pose-weight", default=1.0, resume=MUST_MATCH,
                                help="λ, weight of the pose loss (default {default:g})")
    pose_warmup_epochs: int = option(
        "--pose-warmup-epochs", default=WARMUP_EPOCHS, resume=MUST_MATCH,
        help="training epochs that render at the input poses, the encoder resting, before the "
             "image loss reaches it: a map still being formed would pull the poses anywhere "
             "(default {default})")
    pose_lr_scale: float = option(
        "--pose-lr-scale", default=POSE_LR_SCALE, resume=MUST_MATCH,
        help="the orientation encoder's learning rate in the joint phase, as a fraction of --lr "
             "(default {default:g})")

    def __post_init__(self) -> None:
        if self.pose_weight < 0:
            raise _bad("--weight-decay/--kl-weight/--pose-weight", "weights must be >= 0")
        if self.pose_pretrain_epochs < 0:
            raise _bad("--pose-pretrain-epochs", f"must be >= 0, got {self.pose_pretrain_epochs}")
        if self.pose_warmup_epochs < 0:
            raise _bad("--pose-warmup-epochs", f"must be >= 0, got {self.pose_warmup_epochs}")
        if not 0 <= self.pose_lr_scale <= 1:
            raise _bad("--pose-lr-scale", f"must be in [0, 1], got {self.pose_lr_scale:g}")


@dataclass(frozen=True)
class PoseSearchOptions:
    """Local projection matching after each epoch from ``pose_search_start`` on
    (:mod:`cryoformer.refinement`, which takes these in radians); training then uses the
    refined poses.

    ``pose_search_prior_deg`` None fits the prior's width to the data at every search
    (empirical Bayes). ``pose_search_groups`` None: 16 references for ``"model"``; for
    ``"backprojection"`` 4, or one per 2000 particles (at most 16) from 10 000 particles on. A run saved before ``pose_search_reference``/``pose_search_groups``
    existed matched against the model's maps at 16 groups: their legacy values.
    ``pose_search_classify`` None: 2 rounds from 10 000 particles on, else 0; it may change
    when a run is resumed. cryoformer before these defaults used 4 groups and no rounds at
    any size; a run of 10 000 particles or more that it saved resumes with the new defaults
    (``--pose-search-classify 0`` keeps it from classifying).
    """

    pose_search: bool = option(
        "--pose-search", default=False, switch="store_true", resume=MUST_MATCH,
        help="refine poses by projection matching after each epoch, against references "
             "chosen by --pose-search-reference: Fourier-slice projections at the particles' "
             "full box, coarse-to-fine local search of rotations and shifts, MAP with a prior on the distance to the "
             "input pose whose width is fitted to the data; training continues at the "
             "refined poses (RUN/poses/epoch_XXX.pkl). Works on a CPU budget, unlike the "
             "orientation encoder. With --refine-poses too, the searched poses become the ones "
             "the encoder's pose loss pulls towards, and RUN/poses holds the encoder's")
    pose_search_start: int = option(
        "--pose-search-start", default=2, unit="epoch", resume=MUST_MATCH,
        help="first epoch after which --pose-search runs (default {default})")
    pose_search_radius_deg: float = option(
        "--pose-search-radius", default=20.0, unit="deg", metavar="DEG", resume=MUST_MATCH,
        help="search rotations within this many degrees of the current ones, about 3x the "
             "input poses' typical error (default {default:g})")
    pose_search_prior_deg: Optional[float] = option(
        "--pose-search-prior", default=None, unit="deg", metavar="DEG", resume=MUST_MATCH,
        help="fix the width of the prior on the angle to the input rotation (degrees; 0: "
             "none, maximum likelihood); default: fitted to the data at each search")
    pose_search_reference: str = option(
        "--pose-search-reference", default="backprojection", choices=REFERENCE_KINDS,
        resume=MUST_MATCH, legacy="model", legacy_if="pose_search",
        help="what --pose-search matches the particles against: 'backprojection' (default), "
             "gold-standard half maps reconstructed from the particles at their current poses "
             "at the full box; 'model', the model's own maps (limited by --box)")
    pose_search_groups: Optional[int] = option(
        "--pose-search-groups", default=None, metavar="K", resume=MUST_MATCH, legacy=None,
        legacy_if="pose_search",
        help="references per search: K-means groups of the latents, one map each (default 16 "
             "for model; for backprojection 4, or one per 2000 particles (at most 16) from 10 000 "
             "particles on); more groups follow the heterogeneity, fewer give less noisy maps")
    pose_search_classify: Optional[int] = option(
        "--pose-search-classify", default=None, metavar="ROUNDS",
        help="rounds in which every particle moves to the back-projected group whose map fits "
             "its image best at its current pose, before each search (default 2 from 10 000 "
             "particles on, else 0)")

    def __post_init__(self) -> None:
        if self.pose_search_start < 1:
            raise _bad("--pose-search-start", f"must be >= 1, got {self.pose_search_start}")
        if not 0 < self.pose_search_radius_deg <= 180:
            raise _bad("--pose-search-radius",
                       f"must be in (0, 180] degrees, got {self.pose_search_radius_deg}")
        if self.pose_search_prior_deg is not None and self.pose_search_prior_deg < 0:
            raise _bad("--pose-search-prior",
                       f"must be >= 0 degrees (0: no prior), got {self.pose_search_prior_deg}")
        if self.pose_search_groups is not None and self.pose_search_groups < 1:
            raise _bad("--pose-search-groups", f"must be >= 1, got {self.pose_search_groups}")
        if self.pose_search_classify is not None and self.pose_search_classify < 0:
            raise _bad("--pose-search-classify", f"must be >= 0, got {self.pose_search_classify}")
        if self.pose_search_reference not in REFERENCE_KINDS:
            raise _bad("--pose-search-reference", f"must be one of {', '.join(REFERENCE_KINDS)}, "
                       f"got {self.pose_search_reference!r}")


@dataclass(frozen=True)
class HeldoutOptions:
    """Images held out of training to score, after every epoch, how well the model predicts
    images it never trained on (:mod:`cryoformer.trainer.validation`); analysis loads the
    epoch where that loss is lowest. Fewer than 20 held-out images means none. The split is
    part of the run: a resumed run keeps its own (one saved before it existed held none out).
    """

    heldout_fraction: float = option(
        "--heldout-fraction", default=0.05, resume=FROM_RUN, legacy=0.0,
        help="fraction of the particles held out of training to measure, after each epoch, "
             "how well the model predicts images it never saw (RUN/validation.json); "
             "analysis then uses the epoch where that loss is lowest, before the model fits "
             "the noise. 0 disables (default {default:g}, at most --heldout-max images)")
    heldout_max: int = option("--heldout-max", default=2000, unit="images", resume=FROM_RUN,
                              help="at most this many held-out images (default {default})")
    early_stop_epochs: Optional[int] = option(
        "--early-stop", default=None, unit="epochs", metavar="EPOCHS",
        help="stop when the held-out loss has not improved for EPOCHS epochs (default: never)")

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise _bad("--heldout-fraction", f"must be in [0, 1), got {self.heldout_fraction}")
        if self.heldout_max < 1:
            raise _bad("--heldout-max", f"must be >= 1, got {self.heldout_max}")
        if self.early_stop_epochs is not None:
            if self.early_stop_epochs < 1:
                raise _bad("--early-stop", f"must be >= 1 epochs, got {self.early_stop_epochs}")
            if self.heldout_fraction == 0:
                raise _bad("--early-stop", "needs held-out images (--heldout-fraction > 0)")


@dataclass(frozen=True)
class SupportOptions:
    """The density restricted to a mask around the molecule (:mod:`cryoformer.model.support`),
    canonical renderer only: the first mask is made after ``support_after_images`` images of
    epoch 1 (or at the start of epoch 2 on a smaller set), then again at the start of each
    epoch, from the model at that point (peak fraction ``support_threshold``, dilated by
    ``support_margin_px`` px of the training box). Part of the run: a resumed run keeps its
    settings (one saved before the mask existed trains without; one saved before the first
    mask could come within epoch 1 keeps it at epoch 2)."""

    support_mask: bool = option(
        "--no-support-mask", default=True, switch="store_false", resume=FROM_RUN, legacy=False,
        help="evaluate the density on the whole sphere in every epoch. By default, after "
             "--support-after images (or from epoch 2 on) the density is restricted to a "
             "mask around the molecule (from the model's own maps, dilated by "
             "--support-margin px): the per-image head runs only there (faster) and noise "
             "outside the molecule is not fitted (better maps, docs/benchmarks.md); the mask "
             "is saved with the model and applied when decoding. A resumed run keeps the "
             "setting it was started with")
    support_threshold: float = option(
        "--support-threshold", default=0.05, resume=FROM_RUN,
        help="fraction of the peak density that counts as molecule (default {default:g})")
    support_margin_px: int = option(
        "--support-margin", default=3, unit="px", resume=FROM_RUN,
        help="dilation of the mask in px of the training box (default {default})")
    support_after_images: int = option(
        "--support-after", default=2000, unit="images", resume=FROM_RUN, legacy=0,
        help="make the first mask once this many images of epoch 1 are trained, when that "
             "comes before epoch 2: on a large set the first epoch then runs mostly at the "
             "mask's speed (default {default}; 0: first mask at the start of epoch 2)")

    def __post_init__(self) -> None:
        if not 0 < self.support_threshold < 1:
            raise _bad("--support-threshold", f"must be in (0, 1), got {self.support_threshold}")
        if self.support_margin_px < 0:
            raise _bad("--support-margin", f"must be >= 0 px, got {self.support_margin_px}")
        if self.support_after_images < 0:
            raise _bad("--support-after", f"must be >= 0 images, got {self.support_after_images}")


@dataclass(frozen=True)
class TrainConfig:
    """What ``cryoformer train`` does, apart from the network architecture.

    Build it with :meth:`from_flat` (``TrainConfig.from_flat(particles=..., outdir=...,
    epochs=3)``) or from its groups; read options through them (``config.optimisation.lr``).
    """

    data: DataOptions = option_group(DataOptions)
    optimisation: OptimisationOptions = option_group(OptimisationOptions, "optimisation")
    runtime: RuntimeOptions = option_group(RuntimeOptions, "runtime")
    refinement: PoseRefinementOptions = option_group(PoseRefinementOptions, "pose refinement (paper §3.2)")
    search: PoseSearchOptions = option_group(PoseSearchOptions, "pose search (projection matching)")
    heldout: HeldoutOptions = option_group(HeldoutOptions, "held-out validation")
    support: SupportOptions = option_group(SupportOptions, "support mask")

    def __post_init__(self) -> None:
        refine = self.refinement
        if self.optimisation.epochs == 0 and not (refine.refine_poses and refine.pose_pretrain_epochs > 0):
            # Nothing would be trained and no epoch written: a run directory nobody can use.
            raise _bad("--epochs", "must be >= 1 (0 is only meaningful with --refine-poses, "
                       "whose pose pre-training is then the whole run)")

    @classmethod
    def from_flat(cls, **values: Any) -> "TrainConfig":
        """From flat option names (``particles=..., outdir=..., lr=...``); the rest default."""
        return options.from_flat(cls, values)

    def replace(self, **values: Any) -> "TrainConfig":
        """A copy with the given flat options changed (validated again)."""
        return options.from_flat(TrainConfig, {**self.to_dict(), **values})

    def to_dict(self) -> dict[str, Any]:
        """The flat ``{option: value}`` dict saved in config.yaml and checkpoints."""
        return options.to_flat(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainConfig":
        """From a saved config, flat or nested; options it predates as it behaved."""
        flat = options.nested_to_flat(TrainConfig, saved)
        return options.from_flat(cls, options.with_legacy_values(TrainConfig, flat))

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Names of result-changing options that differ from a checkpoint's saved config."""
        return options.resume_mismatches(TrainConfig, self.to_dict(), options.nested_to_flat(TrainConfig, saved))

    def resumed_from(self, saved: dict[str, Any]) -> "TrainConfig":
        """This config with the options that belong to the run (held-out split, support mask)
        taken from the saved config of the run being resumed."""
        return self.replace(**options.kept_from_run(TrainConfig, options.nested_to_flat(TrainConfig, saved)))


def _model_default(name: str) -> Any:
    """The default of a :class:`ModelConfig` field (declared there, not here)."""
    return next(f.default for f in dataclasses.fields(ModelConfig) if f.name == name)


@dataclass(frozen=True)
class ModelOptions:
    """The few architecture options ``cryoformer train`` takes, mapped onto
    :class:`ModelConfig` fields (whose defaults are the network the trainer builds)."""

    # None: ModelConfig's own defaults, which are the n512 preset (its deltas are empty).
    preset: Optional[str] = option("--preset", default=None, choices=tuple(sorted(PRESETS)),
                                   help="architecture preset (default n512)")
    zdim: int = option("--zdim", default=_model_default("zdim"), help="latent dimension (default {default})")
    feature_grid: Optional[int] = option(
        "--feature-grid", default=None, unit="px", metavar="G",
        help="evaluate the spatial features F_S on a G³ grid (px of the training box) and "
             "upsample; smaller is faster (default: the training box, every voxel)")
    get_query: Optional[str] = option(
        "--get-query", default=None, choices=GET_QUERY_MODES,
        help="how a point reads the structure queries: trilinear blend of the neighbouring "
             "blocks' queries (default; smoother maps) or the query of its block (the paper)")
    variational: bool = option(
        "--variational", default=False, switch="store_true",
        help="variational latent (KL term, as cryoDRGN) instead of a deterministic one")

    def model_config(self, box_size: int, refine_poses: bool) -> ModelConfig:
        """The :class:`ModelConfig` these options describe for a training box of ``box_size`` px."""
        fields: dict[str, Any] = {"zdim": self.zdim}
        if self.feature_grid is not None:
            fields["feature_grid_resolution"] = self.feature_grid
        if self.get_query is not None:
            fields["get_query"] = self.get_query
        if self.variational:
            fields["variational"] = True
        return default_model_config(box_size, preset=self.preset, refine_poses=refine_poses, **fields)


def default_model_config(box_size: int, *, preset: Optional[str] = None, refine_poses: bool = False,
                         **fields: Any) -> ModelConfig:
    """The :class:`ModelConfig` the trainer builds for a training box of ``box_size`` px.

    ModelConfig's defaults, then the deltas of ``preset`` (a key of
    :data:`cryoformer.model.PRESETS`; None = none), then ``fields``; the orientation encoder
    is present exactly when poses are refined.

    Raises
    ------
    InputError
        An unknown preset or field, or a field value ModelConfig refuses.
    """
    fields = {**fields, "use_orientation_encoder": refine_poses}
    try:
        if preset is None:
            return ModelConfig(box_size=box_size, **fields)
        return model_config_from_preset(preset, box_size, **fields)
    except (ValueError, TypeError) as exc:
        raise InputError(None, "--preset/model options", str(exc)) from None
