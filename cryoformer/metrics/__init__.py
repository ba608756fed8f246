"""cryoformer.metrics: FSC, resolution, AU-FSC and pose errors (docs/conventions.md, "Metrics")."""

from cryoformer.metrics.fsc import FscResult, au_fsc, fsc, plot_fsc, resolution_at, soft_spherical_mask
from cryoformer.metrics.heterogeneity import difference_map_correlation, lowpass_gaussian, motion_mask
from cryoformer.metrics.pose_error import (
    global_alignment,
    pose_error_summary,
    rotation_errors,
    shift_errors,
)

__all__ = [
    "FscResult",
    "au_fsc",
    "fsc",
    "plot_fsc",
    "resolution_at",
    "soft_spherical_mask",
    "difference_map_correlation",
    "lowpass_gaussian",
    "motion_mask",
    "global_alignment",
    "pose_error_summary",
    "rotation_errors",
    "shift_errors",
]
