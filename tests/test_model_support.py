"""The support mask: where it comes from, and that restricting the head changes nothing inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.analysis.attention_maps import flex_score
from cryoformer.model import CryoFormer
from cryoformer.model.coordinates import sphere_voxel_index
from cryoformer.model.renderer import CanonicalGridRenderer
from cryoformer.model.support import support_from_volumes, support_index

from test_trainer_helpers import tiny_model_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _grid(d):
    c = torch.arange(d, dtype=torch.float32) - d // 2
    return torch.meshgrid(c, c, c, indexing="ij")  # z, y, x


def test_support_of_a_gaussian_blob_is_its_threshold_ball_plus_margin():
    d = 24
    zz, yy, xx = _grid(d)
    r2 = (xx - 3) ** 2 + yy ** 2 + zz ** 2
    blob = torch.exp(-r2 / (2 * 2.0 ** 2))  # σ = 2 px, centred at x = +3
    mask = support_from_volumes(blob[None], threshold=0.05, margin_px=2, smooth_px=0)
    inside = blob > 0.05
    assert mask[inside].all()  # every voxel above the threshold
    # the margin: a cube of half-width 2 around the thresholded ball, nothing farther
    r_thr = np.sqrt(-2 * 4.0 * np.log(0.05))  # radius where the blob falls to 5 %
    far = r2.sqrt() > r_thr + 2 * np.sqrt(3) + 1e-3
    assert not mask[far].any()
    assert mask[d // 2, d // 2, d // 2 + 3 + int(r_thr) + 2]  # margin along +x is present
    # latent-wise maximum: a second state's blob elsewhere is added, not averaged away
    other = torch.exp(-((xx + 5) ** 2 + yy ** 2 + zz ** 2) / 8.0)
    both = support_from_volumes(torch.stack([blob, other]), 0.05, 2, smooth_px=0)
    assert both[d // 2, d // 2, d // 2 - 5] and not mask[d // 2, d // 2, d // 2 - 5]


def test_untrained_corners_do_not_set_the_threshold():
    """A first decode covers the whole cube, but only the sphere was ever rendered: a large
    value in a corner must neither raise the threshold nor enter the mask."""
    d = 24
    zz, yy, xx = _grid(d)
    blob = torch.exp(-((xx - 3) ** 2 + yy ** 2 + zz ** 2) / 8.0)
    ref = support_from_volumes(blob[None], 0.05, 2)
    spoiled = blob.clone()
    spoiled[0, 0, 0] = 100.0  # outside the sphere of radius D/2 + 2
    torch.testing.assert_close(support_from_volumes(spoiled[None], 0.05, 2), ref)
    # a negative molecule (wrong contrast) is found as well
    torch.testing.assert_close(support_from_volumes(-blob[None], 0.05, 2), ref)


def test_support_never_empty_and_inside_the_sphere():
    d = 16
    flat = torch.zeros(2, d, d, d)
    mask = support_from_volumes(flat, 0.05, 1)
    sphere = torch.zeros(d ** 3, dtype=torch.bool)
    sphere[sphere_voxel_index(d, d / 2 + 2)] = True
    assert torch.equal(mask.reshape(-1), sphere)  # untrained flat map: the whole sphere
    with pytest.raises(ValueError):
        support_from_volumes(flat, 1.5, 1)


def test_support_index_resampling():
    d = 16
    zz, yy, xx = _grid(d)
    mask = (xx ** 2 + yy ** 2 + zz ** 2) <= 16
    idx = support_index(mask, d)
    assert torch.equal(idx, torch.nonzero(mask.reshape(-1)).squeeze(1))
    # on a grid twice as fine, every voxel whose centre falls in a mask voxel is kept
    fine = torch.zeros(32 ** 3, dtype=torch.bool)
    fine[support_index(mask, 32)] = True
    c = (torch.arange(32, dtype=torch.float32) - 16) / 2
    fz, fy, fx = torch.meshgrid(c, c, c, indexing="ij")
    covered = mask[(torch.round(fz) + 8).long().clamp(0, 15), (torch.round(fy) + 8).long().clamp(0, 15),
                   (torch.round(fx) + 8).long().clamp(0, 15)]
    assert fine.reshape(32, 32, 32)[covered].all()


def _canonical_volumes(model, table):
    """The canonical renderer's per-image volumes, its sites restricted to the support."""
    sites = model.field.restrict(model.renderer.sites(None))
    return model.renderer.volumes(model.field(model.density_head, table, sites), sites)


@pytest.mark.parametrize("get_query", ["trilinear", "block"])
def test_restricted_head_equals_masked_full_volume(get_query):
    """The renderer's volumes with a support equal the unrestricted volumes times the mask
    (the bounding-box GetQuery and the voxel selection change no value), and decoding too."""
    torch.manual_seed(0)
    model = CryoFormer(tiny_model_config(box=16, get_query=get_query, zdim=2)).eval()
    model.chunk_points = 16 * 16 * 3  # several z-slabs: offsets > 0 and slabs with no voxel
    renderer = model.renderer
    assert isinstance(renderer, CanonicalGridRenderer)
    z = torch.randn(3, 2)
    with torch.no_grad():
        table = model.query_table(z)
        full = _canonical_volumes(model, table)
        dec_full = model.decode_volume(z)
        dec_full_32 = model.decode_volume(z, D=32)
    zz, yy, xx = _grid(16)
    mask = ((xx - 2) ** 2 + yy ** 2 + (zz + 1) ** 2) <= 25  # off-centre ball
    model.set_support(mask)
    with torch.no_grad():
        restricted = _canonical_volumes(model, model.query_table(z))
        dec = model.decode_volume(z)
        dec_32 = model.decode_volume(z, D=32)
    torch.testing.assert_close(restricted, full * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dec, dec_full * mask, rtol=1e-5, atol=1e-6)
    keep = torch.zeros(32 ** 3, dtype=torch.bool)
    keep[support_index(mask, 32)] = True
    torch.testing.assert_close(dec_32, dec_full_32 * keep.reshape(32, 32, 32), rtol=1e-5, atol=1e-6)
    # no density outside, hence no attention and no flexibility there
    _, w = model.attention_volumes(z[0])
    assert (w[~mask] == 0).all() and (w[mask] > 0).any()
    flex = flex_score(model, z.numpy(), method="queries")
    assert (flex[~mask.numpy()] == 0).all() and flex.max() == pytest.approx(1.0)
    # gradients still flow through the restricted head
    model.train()
    images = torch.randn(2, 16, 16)
    out = model(images, torch.eye(3).expand(2, 3, 3), torch.zeros(2, 2), None, pose_source="given")
    out["pred_images"].square().mean().backward()
    assert model.density_head is not None
    params = [*model.structure_queries.parameters(), *model.density_head.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.set_support(None)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().decode_volume(z), dec_full)
