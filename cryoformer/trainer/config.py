"""Training configuration: one frozen dataclass, validated on construction.

:class:`TrainConfig` holds what the data, the optimiser and the schedule need; the network is
described by a separate :class:`~cryoformer.model.ModelConfig`. Both are saved as plain dicts
in ``RUN/config.yaml`` and in every checkpoint, so a run directory fully describes itself.

Units are in the names: ``*_px`` pixels, ``*_angstrom`` Å, ``max_minutes`` minutes of wall
clock. Paths are stored absolute, so a run directory can be analysed from anywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from cryoformer.errors import InputError
from cryoformer.model import ModelConfig, model_config_from_preset

DEVICES = ("auto", "cpu", "cuda")

# Fields that change the result of training: a resumed run must agree on them with the
# checkpoint it continues (the others — schedule length, time budget, device, workers — may
# change between the pieces of a run).
RESUME_MUST_MATCH = (
    "particles", "poses", "ctf", "ind", "datadir", "box_size", "invert_data", "batch_size",
    "lr", "weight_decay", "seed", "refine_poses", "pose_pretrain_epochs", "pose_weight",
    "kl_weight", "pose_search", "pose_search_start", "pose_search_radius_deg", "pose_search_prior_deg",
    "pose_search_reference", "pose_search_groups",
)

# What ``--pose-search`` can match the particles against (:mod:`.references`).
POSE_SEARCH_REFERENCES = ("backprojection", "model")

# What a run saved before these options existed did, when it searched poses (matched against
# the model's maps at 16 K-means centres): a resume must not silently switch it to the new
# defaults.
LEGACY_VALUES = {"pose_search_reference": "model", "pose_search_groups": None}


def with_legacy_values(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the options it predates filled in as it behaved."""
    if not saved.get("pose_search"):
        return dict(saved)
    return {**LEGACY_VALUES, **saved}


def _abs(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(os.fspath(path))


@dataclass(frozen=True)
class TrainConfig:
    """What ``cryoformer train`` does, apart from the network architecture.

    Parameters
    ----------
    particles : str
        Particle images: ``.mrcs``/``.mrc`` stack, ``.txt`` list of stacks, RELION ``.star`` or
        cryoSPARC ``.cs``.
    outdir : str
        Run directory (see :mod:`cryoformer.trainer.run_dir` for its layout).
    poses : str or None
        Poses (``.pkl``/``.star``/``.cs``); None = taken from ``particles`` when it is a
        ``.star``/``.cs``, else an error.
    ctf : str or None
        CTF parameters (``.pkl``/``.star``/``.cs``); None = from ``particles`` when it is a
        ``.star``/``.cs``, else no CTF is applied.
    datadir : str or None
        Directory the stacks named in a ``.txt``/``.star``/``.cs`` are relative to.
    ind : str or None
        ``.npy`` or ``.pkl`` array of particle indices (0-based, into the full stack) to train on.
    gt_poses : str or None
        Ground-truth poses, only to report pose errors per epoch (never used for training).
    box_size : int or None
        Train at this box (px, even, ≤ the stack's ``D``), Fourier-cropping images on the fly;
        None = the stack's box.
    invert_data : bool
        Multiply images by −1 before training (default True): RELION/cryoSPARC particles are
        contrast-inverted relative to the model's ``projection ⊛ CTF`` (docs/conventions.md,
        "Contrast"). False (``--uninvert-data``) for data already in cryoDRGN's convention.
    check_contrast : bool
        Before a new run, read the contrast convention from the images and refuse a
        ``invert_data`` that contradicts it (default True; :func:`.data.check_contrast`).
    epochs : int
        Training epochs (passes over the particles with the image loss); the pose
        pre-training of ``refine_poses`` comes on top.
    batch_size : int
        Global batch size in images (split across DDP ranks; must be divisible by their number).
    lr : float
        AdamW learning rate.
    weight_decay : float
        AdamW decoupled weight decay.
    kl_weight : float
        Weight of the KL term (per image, divided by ``D²`` like the per-pixel MSE); only used
        when the model is variational.
    seed : int
        Seeds the model initialisation, the data order and every random draw.
    max_minutes : float or None
        Wall-clock budget; training stops cleanly at the first step past it, writing a
        checkpoint (and the latents of the partial epoch). None = no budget.
    device : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when available.
    num_workers : int or None
        DataLoader worker processes; None = 0 on CPU (the cores are busy training), 4 on CUDA.
    refine_poses : bool
        Train the orientation encoder (paper §3.2): pose-only pre-training, then joint training
        with image loss + ``pose_weight`` · pose loss, rendering at the predicted poses.
    pose_pretrain_epochs : int
        Passes of pose-only pre-training (cheap: no rendering).
    pose_weight : float
        ``λ`` of the joint loss ``MSE + λ · L_pose`` (paper eq. 2 with per-image mean).
    pose_search : bool
        Refine poses by local projection matching after each epoch from ``pose_search_start``
        on (:mod:`cryoformer.trainer.pose_search`); training then uses the refined poses.
        Exclusive with ``refine_poses``.
    pose_search_start : int
        First epoch after which the search runs (the volume must be roughly right first).
    pose_search_radius_deg : float
        Rotations are searched within this angle (degrees) of the current ones; about 3× the
        typical error of the input poses.
    pose_search_prior_deg : float or None
        Width (degrees) of the Gaussian prior on the angle between a refined and its input
        rotation; None fits it to the data at every search (empirical Bayes).
    pose_search_reference : str
        What the poses are matched against (:mod:`cryoformer.trainer.references`):
        ``"backprojection"`` (default), gold-standard half maps reconstructed from the
        particles at their current poses at the full box; ``"model"``, the model's own maps.
    pose_search_groups : int or None
        References per search: K-means groups of the latents, one pair of half maps (or one
        decoded map) each; None: 4 for ``"backprojection"``, 16 for ``"model"``.
    log_every_steps : int
        Rows of ``log.csv`` are written every this many optimiser steps (and at epoch end).
    amp : bool
        bf16 autocast on CUDA (never on CPU, where it is slower and less accurate).
    heldout_fraction : float
        Fraction of the particles held out of training (at most ``heldout_max`` images) to
        measure, after every epoch, how well the model predicts images it never trained on
        (:mod:`cryoformer.trainer.validation`); the epoch where that loss is lowest is the one
        analysis loads by default. 0 disables it. Held-out particles still get latents. Fewer
        than 20 held-out images (small runs) means none. A resumed run keeps its own split.
    heldout_max : int
        Upper bound on the number of held-out images (keeps the check cheap on 500k stacks).
    early_stop_epochs : int or None
        Stop when the held-out loss has not improved for this many epochs (needs
        ``heldout_fraction`` > 0); None = train for ``epochs`` / ``max_minutes``.
    support_mask : bool
        Restrict the density to a mask around the molecule (default; ``--no-support-mask``)
        (:mod:`cryoformer.model.support`): the per-image head then runs only there, which is
        most of a training step. Saved with the model and applied when decoding. Only with the
        canonical renderer. A resumed run keeps its setting. The first epoch trains without a
        mask; each later one under a mask made from the model at its start.
    support_threshold : float
        Fraction of the peak (smoothed, over a few latents) above which a voxel is molecule.
    support_margin_px : int
        Dilation of the mask, in pixels of the training box (how far density may grow per epoch).
    """

    particles: str
    outdir: str
    poses: Optional[str] = None
    ctf: Optional[str] = None
    datadir: Optional[str] = None
    ind: Optional[str] = None
    gt_poses: Optional[str] = None
    box_size: Optional[int] = None
    invert_data: bool = True
    check_contrast: bool = True
    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    seed: int = 0
    max_minutes: Optional[float] = None
    device: str = "auto"
    num_workers: Optional[int] = None
    refine_poses: bool = False
    pose_pretrain_epochs: int = 50
    pose_weight: float = 1.0
    pose_search: bool = False
    pose_search_start: int = 2
    pose_search_radius_deg: float = 20.0
    pose_search_prior_deg: Optional[float] = None
    pose_search_reference: str = "backprojection"
    pose_search_groups: Optional[int] = None
    log_every_steps: int = 20
    amp: bool = True
    heldout_fraction: float = 0.05
    heldout_max: int = 2000
    early_stop_epochs: Optional[int] = None
    support_mask: bool = True
    support_threshold: float = 0.05
    support_margin_px: int = 3

    def __post_init__(self) -> None:
        for name in ("particles", "outdir", "poses", "ctf", "datadir", "ind", "gt_poses"):
            object.__setattr__(self, name, _abs(getattr(self, name)))

        def bad(option: str, message: str) -> InputError:
            return InputError(None, option, message)

        if self.epochs < 0:
            raise bad("--epochs", f"must be >= 0, got {self.epochs}")
        if self.epochs == 0 and not (self.refine_poses and self.pose_pretrain_epochs > 0):
            # Nothing would be trained and no epoch written: a run directory nobody can use.
            raise bad("--epochs", "must be >= 1 (0 is only meaningful with --refine-poses, "
                      "whose pose pre-training is then the whole run)")
        if self.batch_size < 1:
            raise bad("--batch-size", f"must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise bad("--lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.kl_weight < 0 or self.pose_weight < 0:
            raise bad("--weight-decay/--kl-weight/--pose-weight", "weights must be >= 0")
        if self.box_size is not None and (self.box_size < 8 or self.box_size % 2):
            raise bad("--box", f"must be even and >= 8, got {self.box_size}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise bad("--max-minutes", f"must be > 0, got {self.max_minutes}")
        if self.device not in DEVICES:
            raise bad("--device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise bad("--num-workers", f"must be >= 0, got {self.num_workers}")
        if self.pose_pretrain_epochs < 0:
            raise bad("--pose-pretrain-epochs", f"must be >= 0, got {self.pose_pretrain_epochs}")
        if self.refine_poses and self.pose_search:
            raise bad("--pose-search", "choose one of --refine-poses (orientation encoder) and "
                      "--pose-search (local projection matching)")
        if self.pose_search_start < 1:
            raise bad("--pose-search-start", f"must be >= 1, got {self.pose_search_start}")
        if not 0 < self.pose_search_radius_deg <= 180:
            raise bad("--pose-search-radius", f"must be in (0, 180] degrees, got {self.pose_search_radius_deg}")
        if self.pose_search_prior_deg is not None and self.pose_search_prior_deg < 0:
            raise bad("--pose-search-prior", f"must be >= 0 degrees (0: no prior), got {self.pose_search_prior_deg}")
        if self.pose_search_groups is not None and self.pose_search_groups < 1:
            raise bad("--pose-search-groups", f"must be >= 1, got {self.pose_search_groups}")
        if self.pose_search_reference not in POSE_SEARCH_REFERENCES:
            raise bad("--pose-search-reference",
                      f"must be one of {', '.join(POSE_SEARCH_REFERENCES)}, got {self.pose_search_reference!r}")
        if not 0 <= self.heldout_fraction < 1:
            raise bad("--heldout-fraction", f"must be in [0, 1), got {self.heldout_fraction}")
        if self.heldout_max < 1:
            raise bad("--heldout-max", f"must be >= 1, got {self.heldout_max}")
        if self.early_stop_epochs is not None:
            if self.early_stop_epochs < 1:
                raise bad("--early-stop", f"must be >= 1 epochs, got {self.early_stop_epochs}")
            if self.heldout_fraction == 0:
                raise bad("--early-stop", "needs held-out images (--heldout-fraction > 0)")
        if not 0 < self.support_threshold < 1:
            raise bad("--support-threshold", f"must be in (0, 1), got {self.support_threshold}")
        if self.support_margin_px < 0:
            raise bad("--support-margin", f"must be >= 0 px, got {self.support_margin_px}")
        if self.log_every_steps < 1:
            raise bad("log_every_steps", "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / checkpoint); inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in with_legacy_values(d).items() if k in known})

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Names of result-changing fields that differ from a checkpoint's saved config."""
        mine = self.to_dict()
        saved = with_legacy_values(saved)
        return [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != mine[k]]


# Architecture used when the caller gives none (tuned on CPU, see docs/benchmarks.md).
DEFAULT_PRESET = "n512"
# A 32-wide density head instead of 64: the head runs per image on every voxel, so its width
# sets the training cost; 32 trains 1.8x faster at D = 64 on CPU (docs/benchmarks.md).
# GetQuery by trilinear blend of the neighbouring block queries instead of the paper's block
# lookup (docs/conventions.md, "The model", leaves the choice to FSC): on the AdK benchmark (SNR 0.1, box 32) four minutes
# of training reached a mean FSC-0.5 of 6.8 Å against the truth with the blend and ~19 Å with
# blocks, whose jumps at block faces the field cannot smooth away (docs/benchmarks.md).
DEFAULT_MODEL_OVERRIDES: dict[str, Any] = {"density_head_hidden": 32, "get_query": "trilinear"}


def default_model_config(box_size: int, preset: str = DEFAULT_PRESET, zdim: int = 8,
                         refine_poses: bool = False, **overrides: Any) -> ModelConfig:
    """The trainer's default :class:`ModelConfig` for a training box of ``box_size`` px.

    ``preset`` is a key of :data:`cryoformer.model.PRESETS`; ``overrides`` replace any field
    (after :data:`DEFAULT_MODEL_OVERRIDES`).
    """
    kwargs = {**DEFAULT_MODEL_OVERRIDES, **overrides, "zdim": zdim,
              "use_orientation_encoder": refine_poses}
    try:
        return model_config_from_preset(preset, box_size, **kwargs)
    except (ValueError, TypeError) as exc:
        raise InputError(None, "--preset/model options", str(exc)) from None
