"""Shapes, hand-checked values and gradient flow of the model's building blocks."""

from __future__ import annotations

import math

import pytest
import torch

from cryoformer.model import (CryoFormer, DeformationEncoder, FeatureVolume, ModelConfig,
                              OrientationEncoder, kl_divergence, pose_loss, prepare_encoder_input)
from cryoformer.model.coordinates import grid_unit_coords, pixel_to_unit
from cryoformer.model.cryoformer_model import remap_legacy_keys
from cryoformer.model.get_query import (block_index, get_query_at_points, get_query_on_grid,
                                        interpolation_matrix, separable_resample)
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.model.mlp import circular_mask
from cryoformer.physics.rotations import random_rotations


# Tiny tensors: one thread avoids OpenMP stalls on a loaded 2-core box (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


D = 16
SMALL_GRID = HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4)


def small_config(**kw) -> ModelConfig:
    base = dict(box_size=D, zdim=4, token_dim=8, n_spatial_tokens=4, n_deformation_tokens=4,
                blocks_per_axis=4, encoder_hidden=32, encoder_layers=2, density_head_hidden=16,
                get_query="block", hash_grid=SMALL_GRID, hash_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- GetQuery
def test_pixel_to_unit_centre_and_edges():
    pts = torch.tensor([[0.0, 0.0, 0.0], [-D / 2, 0, 0], [D / 2, 0, 0], [100.0, 0, 0]])
    u = pixel_to_unit(pts, D)
    assert torch.allclose(u[0], torch.full((3,), 0.5))
    assert u[1, 0] == 0.0 and u[2, 0] == 1.0 and u[3, 0] == 1.0  # clamped


def test_block_index_hand_values():
    n = 4
    u = torch.tensor([[0.0, 0.0, 0.0],      # first block
                      [0.999, 0.0, 0.0],    # last block along x -> 3
                      [0.0, 0.26, 0.0],     # y block 1 -> 4
                      [0.0, 0.0, 0.5],      # z block 2 -> 32
                      [1.0, 1.0, 1.0]])     # u = 1 clamps to the last block -> 63
    assert block_index(u, n).tolist() == [0, 3, 4, 32, 63]


@pytest.mark.parametrize("mode", ["block", "trilinear"])
def test_separable_resample_matches_pointwise_sampling(mode):
    torch.manual_seed(0)
    n, r, f = 4, 12, 3
    vol = torch.randn(2, n, n, n, f)
    u1 = grid_unit_coords(r)
    m = interpolation_matrix(u1, n, mode, centred=True)
    assert torch.allclose(m.sum(1), torch.ones(r))
    grid = separable_resample(vol, m, m, m).reshape(2, -1, f)  # [2, r³, f]
    zz, yy, xx = torch.meshgrid(u1, u1, u1, indexing="ij")
    u = torch.stack([xx, yy, zz], -1).reshape(1, -1, 3).expand(2, -1, -1)
    pointwise = get_query_at_points(vol, u, mode)
    assert torch.allclose(grid, pointwise, atol=1e-5)
    assert torch.equal(get_query_on_grid(vol, r, mode).reshape(2, -1, f), grid)


def test_voxel_grid_interpolation_is_exact_on_linear_function():
    g, r = 8, 16
    u = grid_unit_coords(r)
    m = interpolation_matrix(u, g, "trilinear", centred=False)  # coarse voxel j at u = j/g
    coarse = torch.arange(g, dtype=torch.float32) / g  # the function u itself
    fine = m @ coarse
    inside = u <= (g - 1) / g
    assert torch.allclose(fine[inside], u[inside], atol=1e-6)


# ----------------------------------------------------------------------------- feature volume
def test_feature_volume_shapes_grid_and_grad():
    fv = FeatureVolume(SMALL_GRID.with_box_size(D), n_tokens=4, token_dim=8, hidden=64,
                       backend="torch")
    with torch.no_grad():
        fv.encoding.params.uniform_(-1, 1)
    u = torch.rand(2, 5, 3, requires_grad=True)
    out = fv(u)
    assert out.shape == (2, 5, 4, 8)
    grid = fv.on_grid(6)
    assert grid.shape == (6, 6, 6, 4, 8)
    # voxel (z=1, y=2, x=3) of the grid is the point u = (3, 2, 1) / 6
    point = fv(torch.tensor([[3.0, 2.0, 1.0]]) / 6)[0]
    assert torch.allclose(grid[1, 2, 3], point, atol=1e-5)
    out.square().sum().backward()
    for name, p in fv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_parameter_version_changes_on_update():
    fv = FeatureVolume(SMALL_GRID.with_box_size(D), 4, 8, backend="torch")
    v0 = fv.parameter_version()
    assert fv.parameter_version() == v0
    with torch.no_grad():
        fv.mlp[0].bias.add_(1.0)
    assert fv.parameter_version() != v0


# ----------------------------------------------------------------------------- encoders
def test_prepare_encoder_input_masks_and_normalises():
    torch.manual_seed(0)
    imgs = torch.randn(3, D, D) * 5 + 2
    mask = circular_mask(D)
    x = prepare_encoder_input(imgs, mask).reshape(3, D, D)
    assert (x[:, mask == 0] == 0).all()
    inside = x[:, mask > 0]
    assert torch.allclose(inside.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(inside.pow(2).mean(1), torch.ones(3), atol=1e-4)
    # affine grey-level changes (gain, offset) do not change what the encoders see
    y = prepare_encoder_input(imgs * 3.0 - 7.0, mask).reshape(3, D, D)
    assert torch.allclose(x, y, atol=1e-4)
    raw = prepare_encoder_input(imgs, mask, "none").reshape(3, D, D)
    assert torch.allclose(raw, imgs * mask)


def test_orientation_encoder_outputs_rotations():
    enc = OrientationEncoder(D, hidden=32, n_hidden=3)
    rot, shift = enc(torch.randn(5, D, D))
    assert rot.shape == (5, 3, 3) and shift.shape == (5, 2)
    eye = torch.eye(3).expand(5, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(5), atol=1e-5)
    assert len([m for m in enc.net.modules() if isinstance(m, torch.nn.Linear)]) == 4  # 3 hidden + out


def test_pose_loss_hand_values():
    eye = torch.eye(3).unsqueeze(0)
    rz180 = torch.diag(torch.tensor([-1.0, -1.0, 1.0])).unsqueeze(0)
    zero = torch.zeros(1, 2)
    # ‖R̂ − R₀‖_F = sqrt(4 + 4) = 2√2, not squared (paper eq. 2), times 1/9
    assert pose_loss(rz180, zero, eye, zero).item() == pytest.approx(2 * math.sqrt(2) / 9, rel=1e-5)
    # ‖t̂ − t₀‖₁ = 1 + 2 = 3, times 1/2
    t = torch.tensor([[1.0, -2.0]])
    assert pose_loss(eye, t, eye, zero).item() == pytest.approx(1.5, abs=1e-3)
    both = pose_loss(torch.cat([rz180, eye]), torch.cat([zero, t]), eye.expand(2, 3, 3),
                     torch.zeros(2, 2), reduction="none")
    assert both.shape == (2,)
    assert pose_loss(torch.cat([rz180, eye]), torch.cat([zero, t]), eye.expand(2, 3, 3),
                     torch.zeros(2, 2), reduction="sum").item() == pytest.approx(
        both.sum().item())


def test_deformation_encoder_deterministic_and_variational():
    imgs = torch.randn(4, D, D)
    det = DeformationEncoder(D, zdim=3, hidden=32, n_hidden=2)
    out = det(imgs)
    assert out["z"].shape == (4, 3) and out["logvar"] is None
    var = DeformationEncoder(D, zdim=3, hidden=32, n_hidden=2, variational=True)
    var.train()
    out = var(imgs)
    assert out["logvar"].shape == (4, 3)
    assert not torch.allclose(out["z"], out["mu"])  # sampled in training
    var.eval()
    out = var(imgs)
    assert torch.equal(out["z"], out["mu"])
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert kl_divergence(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(1.5)


# ----------------------------------------------------------------------------- transformer
@pytest.mark.parametrize("kw", [dict(), dict(use_ddb=False), dict(use_rsca=False),
                                dict(literal_paper_attention=True, n_deformation_tokens=64)])
def test_transformer_shapes(kw):
    model = CryoFormer(small_config(**kw))
    z = torch.randn(3, 4)
    q = model.conditioned_queries(z)
    assert q.shape == (3, 64, 8)
    table = model.query_table(z)
    t = 16 if model.config.use_rsca else 8
    assert table.shape == (3, 4, 4, 4, t)
    dens = model.field.at_points(model.density_head, table, torch.randn(3, 10, 3) * 4)
    assert dens.shape == (3, 10)
    # conditioning depends on z (the decoder is not constant in the latent)
    assert not torch.allclose(q[0], q[1])


GRAD_CASES = {
    "canonical-block": dict(),
    "direct-block": dict(renderer="direct"),
    "canonical-trilinear-coarse-grid": dict(get_query="trilinear", feature_grid_resolution=8),
    "direct-trilinear": dict(renderer="direct", get_query="trilinear"),
    "no-ddb": dict(use_ddb=False),
    "no-rsca": dict(use_rsca=False),
    "literal": dict(literal_paper_attention=True, n_deformation_tokens=64),
    "variational+pose": dict(variational=True, use_orientation_encoder=True, n_heads=2),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_every_parameter_gets_gradient(case):
    torch.manual_seed(0)
    model = CryoFormer(small_config(**GRAD_CASES[case]))
    b = 3
    imgs = torch.randn(b, D, D)
    rot = random_rotations(b, generator=torch.Generator().manual_seed(1))
    shifts = torch.randn(b, 2)
    out = model(imgs, rot, shifts)
    assert out["pred_images"].shape == (b, D, D)
    loss = (out["pred_images"] - imgs).square().mean()
    if out["pred_rotations"] is not None:
        assert out["rotations"] is out["pred_rotations"]  # rendering uses the prediction
        loss = loss + pose_loss(out["pred_rotations"], out["pred_shifts_px"], rot, shifts)
    if out["logvar"] is not None:
        loss = loss + kl_divergence(out["mu"], out["logvar"])
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_pose_source_options():
    model = CryoFormer(small_config(use_orientation_encoder=True))
    imgs, rot = torch.randn(2, D, D), random_rotations(2)
    given = model(imgs, rot, pose_source="given")
    assert given["rotations"] is rot and given["pred_rotations"] is None
    with pytest.raises(ValueError):
        CryoFormer(small_config())(imgs)  # no poses and no orientation encoder


# ----------------------------------------------------------------------------- checkpoints
def _legacy_name(key: str) -> str:
    """A parameter's name in the layout before the density field owned ``F_S``."""
    for new, old in (("field.feature_volume.", "feature_volume."),
                     ("density_head.", "transformer.head."),
                     ("structure_queries.", "transformer.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


@pytest.mark.parametrize("kw", [dict(), dict(use_rsca=False, use_ddb=False),
                                dict(use_orientation_encoder=True)])
def test_legacy_state_dict_loads_and_parameter_order_is_kept(kw):
    torch.manual_seed(0)
    src = CryoFormer(small_config(**kw))
    legacy = {_legacy_name(k): v for k, v in src.state_dict().items()}
    assert any(k.startswith("transformer.head.") for k in legacy)
    torch.manual_seed(1)
    dst = CryoFormer(small_config(**kw))
    dst.load_state_dict(legacy)  # strict: every old key maps to a current one
    for (name, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), name
    # parameter order as before (optimiser states are indexed by it): F_S first, head last
    names = [_legacy_name(k) for k, _ in src.named_parameters()]
    assert names[0].startswith("feature_volume.") and names[-1].startswith("transformer.head.")
    # and under a parent module's prefix (a DDP-style wrapper)
    wrapped = {"module." + k: v for k, v in legacy.items()}
    remap_legacy_keys(wrapped, "module.")
    assert set(wrapped) == {"module." + k for k in src.state_dict()}
