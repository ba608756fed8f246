"""Public decoding API: decode_volume, attention_volumes, and the feature-grid cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.physics import projector
from cryoformer.physics.rotations import random_rotations


# Tiny tensors: one thread avoids OpenMP stalls on a loaded 2-core box (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


D = 16


def make_model(**kw) -> CryoFormer:
    torch.manual_seed(0)
    base = dict(box_size=D, zdim=3, blocks_per_axis=4, n_spatial_tokens=4, encoder_hidden=16,
                encoder_layers=1, density_head_hidden=16, get_query="block", hash_backend="torch",
                hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4))
    base.update(kw)
    model = CryoFormer(ModelConfig(**base))
    with torch.no_grad():
        model.field.feature_volume.encoding.params.uniform_(-0.5, 0.5)
    return model


class CountCalls:
    """Counts feature-volume evaluations through a forward hook."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


def uncached_decode(model, z, r=D):
    """Reference: evaluate the grid with gradients on, which bypasses the cache."""
    with torch.enable_grad():
        table = model.query_table(z[None])
        return model.field.on_grid(model.density_head, table, r)[0].detach().reshape(r, r, r)


@pytest.mark.parametrize("kw", [dict(), dict(get_query="trilinear", feature_grid_resolution=8)])
def test_decode_cached_equals_uncached(kw):
    model = make_model(**kw)
    calls = CountCalls(model.field.feature_volume)
    z1, z2 = torch.randn(3), torch.randn(3)
    v1 = model.decode_volume(z1)
    assert v1.shape == (D, D, D) and v1.dtype == torch.float32
    assert calls.n == 1
    v2 = model.decode_volume(z2)  # new latent: only the per-latent head runs
    assert calls.n == 1
    assert torch.allclose(v1, uncached_decode(model, z1), atol=1e-6)
    assert torch.allclose(v2, uncached_decode(model, z2), atol=1e-6)
    assert not torch.allclose(v1, v2)
    model.invalidate_cache()
    assert torch.equal(model.decode_volume(z1), v1)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5),
    lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),  # does not bump Tensor._version
], ids=["sgd", "adam-fused"])
def test_cache_invalidated_by_optimiser_step_and_load_state_dict(make_opt):
    model = make_model()
    z = torch.randn(3)
    before = model.decode_volume(z)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(model.field.feature_volume.parameters())
    model.field.feature_volume(torch.rand(50, 3)).sum().backward()
    opt.step()
    after = model.decode_volume(z)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, uncached_decode(model, z), atol=1e-6)
    model.load_state_dict(state)
    assert torch.allclose(model.decode_volume(z), before, atol=1e-6)
    with torch.no_grad():  # a write behind autograd's back is caught by the fingerprint
        model.field.feature_volume.mlp[2].bias.data.add_(0.1)
    assert not torch.allclose(model.decode_volume(z), before)


def test_decode_batch_numpy_and_errors():
    model = make_model()
    zs = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    batch = model.decode_volume(zs)
    assert batch.shape == (2, D, D, D)
    assert torch.allclose(batch[1], model.decode_volume(zs[1]), atol=1e-6)
    with pytest.raises(ValueError, match="zdim"):
        model.decode_volume(torch.zeros(5))


def test_decode_other_sizes_span_the_same_box():
    model = make_model(get_query="trilinear")
    z = torch.randn(3)
    fine = model.decode_volume(z, D=2 * D)
    assert fine.shape == (2 * D,) * 3
    # voxel i of the D-grid and voxel 2i of the 2D-grid sit at the same point
    coarse = model.decode_volume(z)
    assert torch.allclose(fine[::2, ::2, ::2], coarse, atol=1e-5)


def test_canonical_render_is_projection_of_decoded_volume():
    model = make_model()
    imgs = torch.randn(2, D, D)
    rot = random_rotations(2, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        out = model(imgs, rot)
        vols = model.decode_volume(out["z"])
    assert torch.allclose(out["pred_images"], projector.project(vols, rot), atol=1e-6)


def test_attention_volumes():
    model = make_model()
    z = torch.randn(3)
    queries, weights = model.attention_volumes(z)
    assert queries.shape == (4, 4, 4, 8)
    assert weights.shape == (D, D, D, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(D, D, D), atol=1e-5)
    cq = model.conditioned_queries(z[None])[0]
    # block (z=1, y=2, x=3) holds query 1·16 + 2·4 + 3
    assert torch.allclose(queries[1, 2, 3], cq[1 * 16 + 2 * 4 + 3])
    qb, wb = model.attention_volumes(torch.stack([z, z]))
    assert qb.shape == (2, 4, 4, 4, 8) and wb.shape == (2, D, D, D, 4)
    _, none = make_model(use_rsca=False).attention_volumes(z)
    assert none is None
