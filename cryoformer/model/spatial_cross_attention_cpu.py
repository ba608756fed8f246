"""The region-wise spatial cross-attention head's CPU implementation: a hand-written backward.

Training evaluates the density head (eq. 5 with the folded projections of
:class:`~cryoformer.model.spatial_cross_attention.RegionWiseSpatialHead`) at every voxel of
every image, with small widths (``K = C = 8``, hidden ``H = 32``). Under autograd that is a
chain of thin matrix products, each writing and re-reading a ``[B·P, ·]`` tensor; on a CPU
the step is bound by that memory traffic, by an outer product autograd computes as a rank-1
matrix product (slow in BLAS), and by the layout copies between ``[P, K, B]`` batched products
and ``[B·P, C]`` row-wise ones.

:func:`region_wise_density` computes the same function for features shared by the batch
(``F_S`` on the canonical grid) with one layout, ``[P, B, ·]`` (voxel-major), throughout:

* forward saves only its inputs (``8 + 8`` channels per point and image, plus the shared
  features) and the backward pass recomputes the activations of the chunk it is given, while
  they are in cache — the density field calls it per slab of a few thousand voxels;
* the output layer's input gradient is a broadcast product (autograd makes it a rank-1
  matrix product), and ReLU's mask is aten's ``threshold_backward``, one pass.

The result and the gradients equal autograd's through the module (tested in float64 with
``torch.autograd.gradcheck`` and against the module); parameters stay those of the module, so
checkpoints and the decoding path are unchanged.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _forward(qk: torch.Tensor, q: torch.Tensor, feats: torch.Tensor, wv: torch.Tensor,
             bv: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor):
    """Activations in voxel-major layout.

    qk, q : [P, B, C]; feats : [P, K, C]. Returns attn [P, K, B], pooled [P, B, C],
    h [P·B, C], r [P·B, H] (post-ReLU).
    """
    p, b, c = q.shape
    # Softmax over K with the batch innermost ([P, K, B]): over a last axis of only K = 8 it
    # runs ~5× slower on CPU (too short to vectorise).
    attn = torch.softmax(torch.bmm(feats, qk.transpose(1, 2)), dim=1)  # [P, K, B]
    pooled = torch.bmm(attn.transpose(1, 2), feats)  # [P, B, C]
    h = torch.addmm(bv, pooled.reshape(p * b, c), wv.t())  # [P·B, C]
    h.view(p, b, c).add_(q)  # the residual; q is a strided view, added without a copy
    r = torch.addmm(b1, h, w1.t()).relu_()  # [P·B, H]
    return attn, pooled, h, r


class _RegionWiseDensity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table_vm, feats, wv, bv, w1, b1, w2, b2):
        p, b, t = table_vm.shape
        c = t // 2
        tab = table_vm.contiguous()  # [P, B, 2C] voxel-major
        q, qk = tab[..., :c], tab[..., c:]
        _, _, _, r = _forward(qk, q, feats, wv, bv, w1, b1)
        dens = torch.addmm(b2, r, w2.t()).reshape(p, b).t().contiguous()  # [B, P]
        ctx.save_for_backward(tab, feats, wv, bv, w1, b1, w2, b2)
        return dens

    @staticmethod
    @once_differentiable  # the recomputation is not itself differentiated (no double backward)
    def backward(ctx, grad_dens):
        tab, feats, wv, bv, w1, b1, w2, b2 = ctx.saved_tensors
        p, b, t = tab.shape
        c = t // 2
        q, qk = tab[..., :c], tab[..., c:]
        attn, pooled, h, r = _forward(qk, q, feats, wv, bv, w1, b1)
        g = grad_dens.t().reshape(p * b, 1)  # [P·B, 1]
        # Operand orders below are the fast ones on CPU (measured): products whose long
        # axis is the left operand's inner axis, e.g. hᵀ·g_a rather than g_aᵀ·h, which
        # makes BLAS copy a transposed [P·B, H] operand first.
        g_w2 = (g.t() @ r)  # [1, H]
        g_b2 = g.sum(0)
        # Through the output layer and ReLU (r = relu(a), so r > 0 ⇔ a > 0).
        g_a = torch.ops.aten.threshold_backward(g * w2, r, 0.0)  # [P·B, H]
        g_w1 = (h.t() @ g_a).t()  # [H, C]
        g_b1 = g_a.sum(0)
        g_h_t = w1.t() @ g_a.t()  # [C, P·B]; g_h is also the gradient of the residual q
        g_wv = g_h_t @ pooled.reshape(p * b, c)  # [C, C]
        g_bv = g_h_t.sum(1)
        g_pooled = (wv.t() @ g_h_t).t().reshape(p, b, c)  # [P, B, C]
        g_attn = torch.bmm(feats, g_pooled.transpose(1, 2))  # [P, K, B]
        g_logits = attn * (g_attn - (g_attn * attn).sum(1, keepdim=True))  # softmax backward
        g_qk = torch.bmm(g_logits.transpose(1, 2), feats)  # [P, B, C]
        g_feats = torch.bmm(attn, g_pooled)  # [P, K, C]
        g_feats.baddbmm_(g_logits, qk)
        g_tab = torch.cat([g_h_t.t().reshape(p, b, c), g_qk], dim=-1)  # [P, B, 2C]
        return g_tab, g_feats, g_wv, g_bv, g_w1, g_b1, g_w2, g_b2


def region_wise_density(table_vm: torch.Tensor, feats: torch.Tensor, wv: torch.Tensor,
                        bv: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                        b2: torch.Tensor) -> torch.Tensor:
    """Density of eq. 5 (folded form) at points, features shared by the batch.

    Parameters
    ----------
    table_vm : Tensor [P, B, 2C]
        ``[q, q̃]`` read by GetQuery at each point (see ``RegionWiseSpatialHead.table``),
        voxel-major: the density field builds it in this layout; any other view is
        copied into it.
    feats : Tensor [P, K, C]
        ``F_S`` at the points, the same for every image.
    wv, bv : Tensor [C, C], [C]
        The folded value/output projection.
    w1, b1, w2, b2 : Tensor [H, C], [H], [1, H], [1]
        The FFN.

    Returns
    -------
    Tensor [B, P]
    """
    return _RegionWiseDensity.apply(table_vm, feats, wv, bv, w1, b1, w2, b2)
