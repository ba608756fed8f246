"""The deformation-aware decoder block (paper §3.4) and its no-DDB ablation.

Pre-norm residual self-attention ``Attention(Q, Q, Q)`` over the structure queries,
cross-attention to the deformation tokens ``F_D``, FFN. The paper writes the cross-attention
as ``Attention(Q, F_D, Q)``; by default (docs/conventions.md, "The model") the values come
from ``F_D`` so the deformation *content* reaches the queries, not only attention weights; the
literal form is ``literal_paper_attention``. Ablation (Table 3, no DDB,
:class:`ConcatConditioner`): each query is concatenated with the flattened ``F_D`` and mapped
by an MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
