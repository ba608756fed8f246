"""Region-wise spatial cross-attention (paper eq. 5) and its no-RSCA ablation.

At a point ``x``, with ``q = GetQuery(x)`` (:mod:`.get_query`) and ``F_S(x)`` the ``K``
spatial tokens of the feature volume (:mod:`.feature_volume`)::

    σ̂(x) = FFN(q + Attention(q, F_S(x), F_S(x)))

The residual ``q +`` is ours (the usual decoder-layer form): without it the density sees only
a convex mix of ``F_S`` tokens, and the conditioned query — the deformation — would reach it
only through the attention weights. Ablation (Table 3, no RSCA, :class:`ConcatDensityHead`):
``σ̂(x) = MLP([GetQuery(x), flatten F_S(x)])``.

Cost: the spatial attention runs once per point (``D³`` per image), so the per-point work is
kept to two ``K×C`` contractions, one ``C×C`` map and a small FFN. The key projection is
folded into the query side (``q·W_k f = (W_kᵀ q)·f``) and applied per *block* (``N`` per
image, :meth:`RegionWiseSpatialHead.table`), not per point; the value and output projections
are folded into one ``C×C`` map applied after pooling (``Σ a_k W_o W_v f_k = W_o W_v Σ a_k
f_k``). The function class is that of standard single-head attention, and ``F_S`` itself is
what gets cached.

Two implementations of the same function: :meth:`RegionWiseSpatialHead.forward` (autograd;
returns the attention weights too) and :meth:`RegionWiseSpatialHead.fused_density`, the CPU
kernel of :mod:`.spatial_cross_attention_cpu` (hand-written backward, same values and
gradients, faster there; docs/benchmarks.md). Which one runs is the density field's
execution policy (:func:`~cryoformer.model.density_field.execution_policy`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .spatial_cross_attention_cpu import region_wise_density


def small_output_init(layer: nn.Linear, scale: float = 1e-2) -> None:
    """Shrink a density output layer so the initial volume is ≈ 0.

    A projection sums ``D`` voxels, so a default-initialised head (output ~0.3 per voxel)
    starts with images far larger than normalised data and the first hundreds of steps only
    remove that offset. Small, not zero, weights keep every upstream gradient non-zero.
    """
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.zero_()


class RegionWiseSpatialHead(nn.Module):
    """Density from eq. 5 with folded projections (see the module docstring).

    The per-block table it reads at each point holds ``[q, q̃]`` (``2C`` channels): the
    conditioned query ``q`` (residual path) and its key-space image ``q̃ = W q / √C``.

    Parameters
    ----------
    dim : int
        ``C``.
    hidden : int
        Hidden width of the density FFN.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.query_proj = nn.Linear(dim, dim)   # = W_kᵀ W_q (folded)
        self.value_proj = nn.Linear(dim, dim)   # = W_o W_v (folded)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        small_output_init(self.ffn[-1])

    @property
    def table_dim(self) -> int:
        """``T = 2C`` channels per block of :meth:`table`."""
        return 2 * self.dim

    def table(self, q: torch.Tensor) -> torch.Tensor:
        """Conditioned queries [B, N, C] → per-block table [B, N, 2C]."""
        return torch.cat([q, self.query_proj(q) / math.sqrt(self.dim)], dim=-1)

    def fused_density(self, table_vm: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Density by the fused CPU kernel, table in voxel-major layout (no weights).

        Parameters
        ----------
        table_vm : Tensor [P, B, 2C]
        features : Tensor [P, K, C], shared by the batch

        Returns
        -------
        Tensor [B, P]
        """
        ffn_in, ffn_out = self.ffn[0], self.ffn[2]
        return region_wise_density(table_vm, features, self.value_proj.weight,
                                   self.value_proj.bias, ffn_in.weight, ffn_in.bias,
                                   ffn_out.weight, ffn_out.bias)

    def forward(self, table_at_points: torch.Tensor,
                features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density and attention weights at points (autograd path).

        Parameters
        ----------
        table_at_points : Tensor [B, P, 2C]
            ``GetQuery(x)`` read from :meth:`table` at each point.
        features : Tensor [P, K, C] (shared across the batch) or [B, P, K, C]
            ``F_S(x)``.

        Returns
        -------
        density : Tensor [B, P]
        weights : Tensor [B, P, K]
            Softmax attention of each point's query over its ``K`` spatial tokens.
        """
        q, qk = table_at_points.split(self.dim, dim=-1)  # [B, P, C] each
        b, p, c = q.shape
        # Batched [K×C]·[C×·] products per point, written as bmm with the point as batch
        # index so the (large) features are read in their stored layout, never copied;
        # ~2× faster than the equivalent einsum on CPU.
        if features.dim() == 3:  # shared by the batch: one [K, C] block per point
            logits = torch.bmm(features, qk.permute(1, 2, 0))  # [P, K, B]
            weights = torch.softmax(logits, dim=1)
            pooled = torch.bmm(features.transpose(1, 2), weights).permute(2, 0, 1)  # [B, P, C]
            weights = weights.permute(2, 0, 1)  # [B, P, K]
        else:  # per image: [B, P, K, C]
            f = features.reshape(b * p, -1, c)  # [B·P, K, C]
            weights = torch.softmax(torch.bmm(f, qk.reshape(b * p, c, 1)), dim=1)  # [B·P, K, 1]
            pooled = torch.bmm(f.transpose(1, 2), weights).reshape(b, p, c)
            weights = weights.reshape(b, p, -1)
        h = q + self.value_proj(pooled)  # residual, [B, P, C]
        return self.ffn(h).squeeze(-1), weights


class ConcatDensityHead(nn.Module):
    """No-RSCA ablation: ``σ̂(x) = MLP([GetQuery(x), flatten F_S(x)])`` (no fused kernel).

    Parameters
    ----------
    dim : int
        ``C``.
    n_tokens : int
        ``K``.
    hidden : int
        Hidden width of the MLP.
    """

    def __init__(self, dim: int, n_tokens: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.from_query = nn.Linear(dim, hidden)
        self.from_features = nn.Linear(n_tokens * dim, hidden, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 1))
        small_output_init(self.out[-1])

    @property
    def table_dim(self) -> int:
        """``T = C``: the table is the conditioned queries themselves."""
        return self.dim

    def table(self, q: torch.Tensor) -> torch.Tensor:
        """Conditioned queries [B, N, C] → per-block table [B, N, C] (unchanged)."""
        return q

    def forward(self, table_at_points: torch.Tensor,
                features: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Same contract as :meth:`RegionWiseSpatialHead.forward`; weights are None."""
        # The first layer of an MLP on a concatenation is a sum of two linear maps; the
        # feature half is computed once when F_S is shared across the batch.
        f = self.from_features(features.flatten(-2))  # [P, H] or [B, P, H]
        h = self.from_query(table_at_points) + f
        return self.out(h).squeeze(-1), None


def make_density_head(use_rsca: bool, dim: int, n_tokens: int,
                      hidden: int) -> RegionWiseSpatialHead | ConcatDensityHead:
    """The eq.-5 head (``use_rsca``) or the no-RSCA ablation head."""
    if use_rsca:
        return RegionWiseSpatialHead(dim, hidden)
    return ConcatDensityHead(dim, n_tokens, hidden)
