"""cryoformer.model — the CryoFormer network (paper §3, docs/conventions.md, "The model").

Public API
----------
ModelConfig, PRESETS, model_config_from_preset
    Configuration (frozen dataclass; its defaults are the network ``cryoformer train``
    builds) and named presets ("paper-eccv", "n512", "n64-c64").
CryoFormer
    The model: ``forward(images, rotations, shifts_px, ctf)`` for training,
    ``decode_volume(z, D)`` and ``attention_volumes(z)`` for analysis (no image needed).
FeatureVolume, HashGridConfig, HashGridEncoding
    The implicit feature volume ``V_Θ`` and its hash grid.
OrientationEncoder, DeformationEncoder, pose_loss, kl_divergence, prepare_encoder_input
    Image encoders and their loss terms.
DeformationTokens, StructureQueries
    ``F_D`` and the structure queries with their deformation-aware decoder blocks.
RegionWiseSpatialHead, ConcatDensityHead
    The region-wise spatial cross-attention head (eq. 5) and its no-RSCA ablation.
get_query_at_points, get_query_on_grid
    GetQuery, point form and grid form.
DensityField
    ``F_S``, the support and the execution policy; densities at a renderer's sites.
DirectRenderer, CanonicalGridRenderer, PointSites, GridSites, form_image
    Image formation from densities (projection, shift, CTF).
"""

from .config import PRESETS, ModelConfig, model_config_from_preset
from .cryoformer_model import CryoFormer
from .deformation_encoder import DeformationEncoder
from .density_field import DensityField
from .feature_volume import FeatureVolume
from .get_query import get_query_at_points, get_query_on_grid
from .hash_grid import HashGridConfig, HashGridEncoding
from .mlp import prepare_encoder_input
from .orientation_encoder import OrientationEncoder
from .pose_loss import kl_divergence, pose_loss
from .renderer import CanonicalGridRenderer, DirectRenderer, form_image
from .sites import GridSites, PointSites
from .spatial_cross_attention import ConcatDensityHead, RegionWiseSpatialHead
from .structure_queries import DeformationTokens, StructureQueries

__all__ = [
    "CanonicalGridRenderer",
    "ConcatDensityHead",
    "CryoFormer",
    "DeformationEncoder",
    "DeformationTokens",
    "DensityField",
    "DirectRenderer",
    "FeatureVolume",
    "GridSites",
    "HashGridConfig",
    "HashGridEncoding",
    "ModelConfig",
    "OrientationEncoder",
    "PRESETS",
    "PointSites",
    "RegionWiseSpatialHead",
    "StructureQueries",
    "form_image",
    "get_query_at_points",
    "get_query_on_grid",
    "kl_divergence",
    "model_config_from_preset",
    "pose_loss",
    "prepare_encoder_input",
]
