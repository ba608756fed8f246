"""Query-based deformation transformer (paper §3.4).

* **Structure queries** ``Q ∈ R^{N×C}``, ``N = n³``; query ``i`` owns block ``i`` of the uniform
  ``n×n×n`` partition of the box (flat index ``z·n² + y·n + x``, see :mod:`.sampling`).
* **Deformation-aware decoder blocks** (×3): pre-norm residual self-attention
  ``Attention(Q, Q, Q)``, cross-attention to ``F_D``, FFN. The paper writes the cross-attention
  as ``Attention(Q, F_D, Q)``; by default (docs/conventions.md, "The model") the values come from ``F_D`` so the
  deformation *content* reaches the queries, not only attention weights; the literal form is
  ``literal_paper_attention``. Ablation (Table 3, no DDB): each query is concatenated with the
  flattened ``F_D`` and mapped by an MLP.
* **Region-wise spatial cross-attention** (eq. 5): at a point ``x``,
  ``σ̂(x) = FFN(q + Attention(GetQuery(x), F_S(x), F_S(x)))`` with ``q = GetQuery(x)``.
  The residual ``q +`` is ours (the usual decoder-layer form): without it the density sees
  only a convex mix of ``F_S`` tokens, and the conditioned query — the deformation — would
  reach it only through the attention weights. Ablation (no RSCA):
  ``σ̂(x) = MLP([GetQuery(x), flatten F_S(x)])``.

Cost: the spatial attention runs once per point (``D³`` per image), so the per-point work is
kept to two ``K×C`` contractions, one ``C×C`` map and a small FFN. The key projection is
folded into the query side (``q·W_k f = (W_kᵀ q)·f``) and applied per *block* (``N`` per
image), not per point; the value and output projections are folded into one ``C×C`` map
applied after pooling (``Σ a_k W_o W_v f_k = W_o W_v Σ a_k f_k``). The function class is that
of standard single-head attention, and ``F_S`` itself is what gets cached. Training on CPU
runs the same head through :mod:`.fused_head` (hand-written backward, same values and
gradients), which is faster there than autograd through these modules (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fused_head import region_wise_density


def small_output_init(layer: nn.Linear, scale: float = 1e-2) -> None:
    """Shrink a density output layer so the initial volume is ≈ 0.

    A projection sums ``D`` voxels, so a default-initialised head (output ~0.3 per voxel)
    starts with images far larger than normalised data and the first hundreds of steps only
    remove that offset. Small, not zero, weights keep every upstream gradient non-zero.
    """
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.zero_()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention (paper eq. 4) with ``n_heads`` heads of width ``C/h``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query`` [B, Nq, C], ``key``/``value`` [B, Nk, C] → [B, Nq, C]."""
        b, nq, c = query.shape
        h = self.n_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, n, C] -> [B, h, n, C/h]
            return x.reshape(b, x.shape[1], h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)),
                                             heads(self.v(value)))  # [B, h, Nq, C/h]
        return self.out(out.transpose(1, 2).reshape(b, nq, c))


class DeformationAwareDecoderBlock(nn.Module):
    """Self-attention over queries, cross-attention to ``F_D``, FFN; pre-norm residual.

    Parameters
    ----------
    dim : int
        ``C``.
    n_heads : int
    ffn_multiplier : int
        FFN hidden width is ``ffn_multiplier · C``.
    literal : bool
        Cross-attention as printed, ``Attention(Q, F_D, Q)`` (values = queries; needs M = N).
    """

    def __init__(self, dim: int, n_heads: int, ffn_multiplier: int = 4,
                 literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, n_heads)
        self.norm_cross = nn.LayerNorm(dim)
        # F_D is not normalised: it is a linear map of z, and a LayerNorm on it discards the
        # latent's scale and one direction per token. Measured on the two-state overfit
        # problem (tests/test_model_overfit.py): with it, 1 of 3 seeds collapsed to a
        # z-independent volume; without it, 3 of 3 separated the states.
        self.cross_attn = MultiHeadAttention(dim, n_heads)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_multiplier * dim), nn.GELU(),
                                 nn.Linear(ffn_multiplier * dim, dim))

    def forward(self, q: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        """``q`` [B, N, C], ``f_d`` [B, M, C] → conditioned queries [B, N, C]."""
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, x)  # inter-query Attention(Q, Q, Q)
        x = self.norm_cross(q)
        q = q + self.cross_attn(x, f_d, x if self.literal else f_d)
        return q + self.ffn(self.norm_ffn(q))


class ConcatConditioner(nn.Module):
    """No-DDB ablation: ``q_i ← q_i + MLP([q_i, flatten F_D])`` (Table 3, "concatenation")."""

    def __init__(self, dim: int, n_deform_tokens: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + n_deform_tokens * dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        """``q`` [B, N, C], ``f_d`` [B, M, C] → [B, N, C]."""
        flat = f_d.flatten(1).unsqueeze(1).expand(-1, q.shape[1], -1)  # [B, N, M·C]
        return q + self.net(torch.cat([q, flat], dim=-1))


class RegionWiseSpatialHead(nn.Module):
    """Density from eq. 5 with folded projections (see the module docstring).

    The per-block table it reads at each point holds ``[q, q̃]`` (``2C`` channels): the
    conditioned query ``q`` (residual path) and its key-space image ``q̃ = W q / √C``.
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
        return 2 * self.dim

    def table(self, q: torch.Tensor) -> torch.Tensor:
        """Conditioned queries [B, N, C] → per-block table [B, N, 2C]."""
        return torch.cat([q, self.query_proj(q) / math.sqrt(self.dim)], dim=-1)

    def recomputes_in_backward(self, device: torch.device) -> bool:
        """Whether training on ``device`` takes the fused path (:mod:`.fused_head`), whose
        backward recomputes the activations itself (no activation checkpointing needed)."""
        return device.type == "cpu"

    def fused_density(self, table_vm: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Density by the fused path, table in voxel-major layout.

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
        """Density and attention weights at points (autograd path; training on CPU uses
        :meth:`fused_density`, same values and gradients, no weights).

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
    """No-RSCA ablation: ``σ̂(x) = MLP([GetQuery(x), flatten F_S(x)])``."""

    def __init__(self, dim: int, n_tokens: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.from_query = nn.Linear(dim, hidden)
        self.from_features = nn.Linear(n_tokens * dim, hidden, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 1))
        small_output_init(self.out[-1])

    @property
    def table_dim(self) -> int:
        return self.dim

    def table(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def recomputes_in_backward(self, device: torch.device) -> bool:
        """No fused path: the renderer checkpoints this head's slabs on CPU instead."""
        return False

    def forward(self, table_at_points: torch.Tensor,
                features: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Same contract as :meth:`RegionWiseSpatialHead.forward`; weights are None."""
        # The first layer of an MLP on a concatenation is a sum of two linear maps; the
        # feature half is computed once when F_S is shared across the batch.
        f = self.from_features(features.flatten(-2))  # [P, H] or [B, P, H]
        h = self.from_query(table_at_points) + f
        return self.out(h).squeeze(-1), None


class DeformationTransformer(nn.Module):
    """Structure queries, their conditioning on ``F_D``, and the per-point density head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.token_dim
        self.n = config.blocks_per_axis
        self.get_query = config.get_query
        # Random init as the paper ("randomly initialized learnable structure queries").
        self.queries = nn.Parameter(torch.randn(config.n_queries, c))
        if config.use_ddb:
            self.blocks = nn.ModuleList(
                DeformationAwareDecoderBlock(c, config.n_heads, config.ffn_multiplier,
                                             config.literal_paper_attention)
                for _ in range(config.n_decoder_blocks))
            self.conditioner = None
        else:
            self.blocks = nn.ModuleList()
            self.conditioner = ConcatConditioner(c, config.n_deformation_tokens,
                                                 config.ffn_multiplier * c)
        self.final_norm = nn.LayerNorm(c)  # pre-norm stacks end with a norm
        if config.use_rsca:
            self.head: nn.Module = RegionWiseSpatialHead(c, config.density_head_hidden)
        else:
            self.head = ConcatDensityHead(c, config.n_spatial_tokens, config.density_head_hidden)

    def condition(self, f_d: torch.Tensor) -> torch.Tensor:
        """Structure queries conditioned on one image's (or latent's) deformation feature.

        Parameters
        ----------
        f_d : Tensor [B, M, C]

        Returns
        -------
        Tensor [B, N, C]
        """
        q = self.queries.unsqueeze(0).expand(f_d.shape[0], -1, -1)  # [B, N, C]
        if self.conditioner is not None:
            q = self.conditioner(q, f_d)
        for block in self.blocks:
            q = block(q, f_d)
        return self.final_norm(q)

    def query_table(self, conditioned: torch.Tensor) -> torch.Tensor:
        """Per-block table read by ``GetQuery``: [B, N, C] → [B, n, n, n, T] (axes z, y, x)."""
        t = self.head.table(conditioned)
        return t.reshape(t.shape[0], self.n, self.n, self.n, t.shape[-1])

    def density(self, table_at_points: torch.Tensor,
                features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-point density; see :meth:`RegionWiseSpatialHead.forward`."""
        return self.head(table_at_points, features)
