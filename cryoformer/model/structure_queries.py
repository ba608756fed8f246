"""Structure queries and deformation tokens (paper §3.4).

* **Deformation tokens** ``F_D ∈ R^{M×C}``: a linear map of the latent ``z``
  (:class:`DeformationTokens`). They live on the decoder side: decoding a volume needs only
  ``z`` (paper §3.2 footnote).
* **Structure queries** ``Q ∈ R^{N×C}``, ``N = n³``, randomly initialised and learned; query
  ``i`` owns block ``i`` of the uniform ``n×n×n`` partition of the box (flat index
  ``z·n² + y·n + x``, :mod:`.get_query`). :class:`StructureQueries` conditions them on
  ``F_D`` through the deformation-aware decoder blocks (:mod:`.decoder_block`), or the no-DDB
  ablation, and a final LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder_block import ConcatConditioner, DeformationAwareDecoderBlock


class DeformationTokens(nn.Module):
    """Linear map from the latent ``z`` to the deformation feature ``F_D`` (M tokens × C)."""

    def __init__(self, zdim: int, n_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.linear = nn.Linear(zdim, n_tokens * token_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` [B, zdim] → ``F_D`` [B, M, C]."""
        return self.linear(z).reshape(z.shape[0], self.n_tokens, self.token_dim)


class StructureQueries(nn.Module):
    """The ``N`` learned structure queries and their conditioning on ``F_D``.

    Parameters
    ----------
    config : ModelConfig
        Uses ``blocks_per_axis``, ``token_dim``, ``use_ddb``, ``n_decoder_blocks``,
        ``n_heads``, ``ffn_multiplier``, ``literal_paper_attention``,
        ``n_deformation_tokens``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.token_dim
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

    def forward(self, f_d: torch.Tensor) -> torch.Tensor:
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
