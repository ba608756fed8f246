"""ModelConfig validation, presets, and that every preset builds a working model."""

from __future__ import annotations

import pytest
import torch

import dataclasses

from cryoformer.model import PRESETS, CryoFormer, ModelConfig, model_config_from_preset
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.trainer.config import default_model_config


# Tiny tensors: one thread avoids OpenMP stalls on a loaded 2-core box (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name, n, c", [("paper-eccv", 16, 8), ("n512", 8, 8), ("n64-c64", 4, 64)])
def test_presets_construct_and_decode(name, n, c):
    cfg = model_config_from_preset(name, 16, encoder_layers=1, encoder_hidden=16,
                                   density_head_hidden=64, get_query="block")
    assert cfg.blocks_per_axis == n and cfg.token_dim == c
    assert cfg.n_queries == n ** 3
    model = CryoFormer(cfg)
    assert model.structure_queries.queries.shape == (n ** 3, c)
    vol = model.decode_volume(torch.zeros(cfg.zdim))
    assert vol.shape == (16, 16, 16) and vol.dtype == torch.float32
    assert torch.isfinite(vol).all()


def test_paper_preset_numbers():
    cfg = model_config_from_preset("paper-eccv", 128)
    assert cfg.n_queries == 4096 and cfg.token_dim == 8 and cfg.zdim == 8
    assert cfg.n_decoder_blocks == 3
    assert (cfg.encoder_hidden, cfg.encoder_layers, cfg.feature_mlp_hidden) == (128, 10, 64)
    hg = cfg.hash_grid_for_box()
    assert (hg.n_levels, hg.n_features_per_level, hg.log2_hashmap_size, hg.base_resolution) == (
        16, 2, 15, 16)
    assert hg.finest_resolution == 128  # finest resolution D (docs/conventions.md)


def test_small_box_keeps_valid_hash_grid():
    cfg = ModelConfig(box_size=8)
    assert cfg.hash_grid_for_box().finest_resolution == 16  # base resolution, not 8


def test_literal_attention_sets_m_to_n():
    cfg = model_config_from_preset("n64-c64", 16, literal_paper_attention=True)
    assert cfg.n_deformation_tokens == cfg.n_queries == 64
    # a preset that leaves blocks_per_axis at the default (n512: n = 8) gets M = 512
    cfg = model_config_from_preset("n512", 16, literal_paper_attention=True)
    assert cfg.n_deformation_tokens == cfg.n_queries == 512


@pytest.mark.parametrize("kwargs", [
    dict(box_size=15),
    dict(box_size=16, get_query="nearest"),
    dict(box_size=16, renderer="fourier"),
    dict(box_size=16, token_dim=8, n_heads=3),
    dict(box_size=16, literal_paper_attention=True),  # M = 8 != N = 512
    dict(box_size=16, feature_grid_resolution=32),
    dict(box_size=16, zdim=0),
])
def test_invalid_configs_raise(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        model_config_from_preset("huge", 64)
    assert set(PRESETS) == {"paper-eccv", "n512", "n64-c64"}


def test_dict_roundtrip():
    cfg = ModelConfig(box_size=32, hash_grid=HashGridConfig(n_levels=4), get_query="trilinear",
                      use_rsca=False, feature_grid_resolution=16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("box", [16, 64])
def test_defaults_are_the_trained_network(box):
    """``ModelConfig(D)`` is what ``cryoformer train`` builds; presets are deltas from it."""
    cfg = ModelConfig(box)
    assert cfg == default_model_config(box)
    assert (cfg.blocks_per_axis, cfg.token_dim, cfg.n_spatial_tokens, cfg.n_deformation_tokens,
            cfg.n_heads, cfg.density_head_hidden, cfg.get_query) == (8, 8, 8, 8, 1, 32,
                                                                     "trilinear")
    assert model_config_from_preset("n512", box) == cfg
    assert model_config_from_preset("paper-eccv", box) == dataclasses.replace(
        cfg, blocks_per_axis=16)
    for name in PRESETS:
        assert model_config_from_preset(name, box) == default_model_config(box, preset=name)
