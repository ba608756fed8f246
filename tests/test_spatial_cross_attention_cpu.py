"""The CPU training fast paths: the fused head's backward, the slab loop, the allocator."""

from __future__ import annotations

import dataclasses
import platform

import pytest
import torch

from cryoformer.model import CryoFormer, GridSites, ModelConfig, density_field
from cryoformer.model.coordinates import sphere_voxel_index
from cryoformer.model.density_field import execution_policy, slab_voxels
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.model.spatial_cross_attention import ConcatDensityHead, RegionWiseSpatialHead
from cryoformer.model.spatial_cross_attention_cpu import region_wise_density
from cryoformer.trainer import allocator

pytestmark = pytest.mark.usefixtures("single_thread")


def _head_inputs(b, p, k, c, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = RegionWiseSpatialHead(c, h).to(dtype)
    with torch.no_grad():  # weights of order one, so every term matters in the comparison
        for prm in head.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=dtype))
    table = torch.randn(b, p, 2 * c, generator=g, dtype=dtype, requires_grad=True)
    feats = torch.randn(p, k, c, generator=g, dtype=dtype, requires_grad=True)
    return head, table, feats


def test_fused_kernel_gradcheck():
    head, table, feats = _head_inputs(3, 5, 4, 4, 6, torch.float64)
    params = (head.value_proj.weight, head.value_proj.bias, head.ffn[0].weight,
              head.ffn[0].bias, head.ffn[2].weight, head.ffn[2].bias)
    # the table in voxel-major layout, once contiguous and once as a transposed view
    assert torch.autograd.gradcheck(region_wise_density,
                                    (table.detach().transpose(0, 1).contiguous().requires_grad_(),
                                     feats) + params)
    assert torch.autograd.gradcheck(lambda t, *rest: region_wise_density(t.transpose(0, 1), *rest),
                                    (table, feats) + params)


@pytest.mark.parametrize("shape", [(2, 7, 3, 4, 5), (16, 300, 8, 8, 32)])
def test_fused_kernel_equals_module(shape):
    """Same density and gradients as autograd through the module's own forward."""
    b, p, k, c, h = shape
    head, table, feats = _head_inputs(b, p, k, c, h, torch.float32, seed=1)
    upstream = torch.randn(b, p, generator=torch.Generator().manual_seed(2))

    # query_proj is not among them: it builds the table (RegionWiseSpatialHead.table)
    inputs = (table, feats, *head.value_proj.parameters(), *head.ffn.parameters())

    def run(fused):
        for t in inputs:
            t.grad = None
        dens = head.fused_density(table.transpose(0, 1), feats) if fused else head(table, feats)[0]
        (dens * upstream).sum().backward()
        return dens.detach(), [t.grad.clone() for t in inputs]

    d_ref, g_ref = run(False)
    d_fused, g_fused = run(True)
    assert torch.allclose(d_fused, d_ref, atol=1e-5 * d_ref.abs().max().item())
    for a, r in zip(g_fused, g_ref):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def _model(get_query):
    torch.manual_seed(0)
    cfg = ModelConfig(box_size=16, zdim=4, blocks_per_axis=4, n_spatial_tokens=4, token_dim=8,
                      encoder_hidden=16, encoder_layers=1, density_head_hidden=16,
                      get_query=get_query, hash_backend="torch",
                      hash_grid=HashGridConfig(n_levels=3, base_resolution=4,
                                               finest_resolution=16))
    model = CryoFormer(cfg)
    with torch.no_grad():
        model.field.feature_volume.encoding.params.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("get_query", ["block", "trilinear"])
@pytest.mark.parametrize("support", [False, True])
def test_training_grid_path_equals_decoding_and_plain_autograd(get_query, support, monkeypatch):
    """Training's slab loop (F_S only on the voxels, small slabs, fused head) gives the
    decoding path's density, and the gradients of one big autograd slab."""
    model = _model(get_query)
    d = model.box_size
    if support:  # a lopsided support: whole planes of the slab loop are empty
        mask = torch.zeros(d, d, d, dtype=torch.bool)
        mask[3:11, 2:12, 4:14] = True
        model.set_support(mask)
    index = model.field.restrict(GridSites(d, sphere_voxel_index(d, d / 2 + 2))).voxel_index
    table = model.query_table(torch.randn(3, 4)).detach().requires_grad_(True)
    upstream = torch.randn(3, index.numel(), generator=torch.Generator().manual_seed(3))

    def grads(chunk_points, fused):
        # the CPU policy, with the fused kernel switched on or off (off: checkpointing,
        # which is plain autograd when there is one slab)
        mode = "fused" if fused else "checkpointed"
        monkeypatch.setattr(density_field, "execution_policy", lambda *a: dataclasses.replace(
            execution_policy(*a), mode=mode))
        model.chunk_points = chunk_points
        model.zero_grad()
        table.grad = None
        dens = model.field.on_grid(model.density_head, table, d, index)[0]
        (dens * upstream).sum().backward()
        return dens.detach(), [table.grad.clone()] + [p.grad.clone() for p in model.parameters()
                                                      if p.grad is not None]

    with torch.no_grad():
        decoded = model.field.on_grid(model.density_head, table, d, index)[0]
    d_one, g_one = grads(1 << 20, False)  # one slab, plain autograd
    d_ckpt, g_ckpt = grads(2 * d * d, False)  # 8 slabs of 2 planes, checkpointed autograd
    d_fused, g_fused = grads(2 * d * d, True)  # 8 slabs, fused head (the CPU default)
    for dens in (d_one, d_ckpt, d_fused):
        assert torch.allclose(dens, decoded, atol=1e-5)
    assert len(g_one) == len(g_ckpt) == len(g_fused) > 10  # table, hash grid, MLPs, head
    for ref, a, b in zip(g_one, g_ckpt, g_fused):
        tol = 1e-4 * ref.abs().max().item() + 1e-7
        assert torch.allclose(a, ref, atol=tol) and torch.allclose(b, ref, atol=tol)


def test_cpu_training_defaults_to_small_slabs():
    model = _model("trilinear")
    cpu = torch.device("cpu")
    assert slab_voxels(cpu) == 1 << 18  # decoding
    assert slab_voxels(cpu, batch=16) == 8192  # training, 2^17 / B
    assert slab_voxels(cpu, batch=1 << 12) == 1 << 11  # floor
    assert slab_voxels(torch.device("cuda"), batch=16) == 1 << 22
    # without gradients a slab holds at most 2^20 voxel-images: a 32-image held-out batch at
    # D = 128 had peaked at 4.4 GB with 2^18 voxels each; decoding 4 maps keeps 2^18
    assert slab_voxels(cpu, inference_batch=4) == 1 << 18
    assert slab_voxels(cpu, inference_batch=32) == 1 << 15
    assert execution_policy(cpu, False, model.density_head, False, 64).slab_voxels == 1 << 14
    # a slab size the trainer timed applies to steps with gradients only
    assert slab_voxels(cpu, batch=16, training=4096) == 4096
    assert execution_policy(cpu, False, model.density_head, False, 4, training_slab=4096).slab_voxels == 1 << 18
    model.chunk_points = 123
    assert slab_voxels(cpu, batch=16, override=model.field.chunk_points) == 123
    head = model.density_head
    assert execution_policy(cpu, True, head, False, 16, model.chunk_points).slab_voxels == 123
    assert execution_policy(cpu, True, head, False, 16).slab_voxels == 8192
    assert execution_policy(cpu, False, head, False, 16).slab_voxels == 1 << 16  # 2^20 / 16 images


def test_execution_policy_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    rsca, concat = RegionWiseSpatialHead(8, 16), ConcatDensityHead(8, 4, 16)
    assert execution_policy(cpu, True, rsca, False, 4).mode == "fused"
    assert execution_policy(cpu, True, rsca, True, 4).mode == "autograd"  # weights wanted
    assert execution_policy(cpu, True, concat, False, 4).mode == "checkpointed"
    assert execution_policy(cuda, True, rsca, False, 4).mode == "autograd"
    assert execution_policy(cpu, False, rsca, False, 4).mode == "autograd"
    assert execution_policy(cpu, True, rsca, False, 4).features_on_request
    assert not execution_policy(cpu, False, rsca, False, 4).features_on_request


def test_allocator_tuning(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    applied = allocator.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    assert allocator.keep_freed_memory() is applied  # once per process
