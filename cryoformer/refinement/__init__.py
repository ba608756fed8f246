"""Pose refinement by projection matching, on :mod:`cryoformer.physics` alone (usable without a
trainer): the MAP local search (:mod:`.search`), its grids and prior (:mod:`.grids`), the
references it matches against (:mod:`.references`) and the particles it reads
(:mod:`.particles`). The trainer's ``--pose-search`` is one caller; the benchmarks are others.
"""

from .config import REFERENCE_KINDS, PoseSearchConfig
from .grids import fit_prior_sigma, rotation_ball
from .particles import ImageRows, Particles
from .references import backprojected_references, make_references, model_references, solvent_mask
from .search import PoseSearchResult, search_poses, search_with_references

__all__ = ["REFERENCE_KINDS", "PoseSearchConfig", "PoseSearchResult", "ImageRows", "Particles",
           "search_poses", "search_with_references", "make_references", "backprojected_references",
           "model_references", "solvent_mask", "fit_prior_sigma", "rotation_ball"]
