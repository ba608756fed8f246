"""cryoformer.model — the CryoFormer network (paper §3, docs/conventions.md, "The model").

Public API
----------
ModelConfig, PRESETS, model_config_from_preset
    Configuration (frozen dataclass) and named presets ("paper-eccv", "n512", "n64-c64").
CryoFormer
    The model: ``forward(images, rotations, shifts_px, ctf)`` for training,
    ``decode_volume(z, D)`` and ``attention_volumes(z)`` for analysis (no image needed).
FeatureVolume, HashGridConfig, HashGridEncoding
    The implicit feature volume ``V_Θ`` and its hash grid.
OrientationEncoder, DeformationEncoder, pose_loss, kl_divergence
    Image encoders and their loss terms.
DeformationTransformer
    Structure queries, deformation-aware decoder blocks, region-wise spatial cross-attention.
DirectRenderer, CanonicalGridRenderer, form_image
    Image formation (projection, shift, CTF).
"""

from .config import PRESETS, ModelConfig, model_config_from_preset
from .cryoformer_model import CryoFormer
from .deformation_transformer import DeformationTransformer
from .encoders import (DeformationEncoder, DeformationTokens, OrientationEncoder, kl_divergence,
                       pose_loss, prepare_encoder_input)
from .feature_volume import FeatureVolume
from .hash_grid import HashGridConfig, HashGridEncoding
from .renderer import CanonicalGridRenderer, DirectRenderer, form_image

__all__ = [
    "CanonicalGridRenderer",
    "CryoFormer",
    "DeformationEncoder",
    "DeformationTokens",
    "DeformationTransformer",
    "DirectRenderer",
    "FeatureVolume",
    "HashGridConfig",
    "HashGridEncoding",
    "ModelConfig",
    "OrientationEncoder",
    "PRESETS",
    "form_image",
    "kl_divergence",
    "model_config_from_preset",
    "pose_loss",
    "prepare_encoder_input",
]
