"""Model configuration: one frozen dataclass and the named presets.

Every architectural choice of paper §3 (and every ablation of its Table 3) is a field of
:class:`ModelConfig`, so a checkpoint's config fully determines the network that loads it.
Its defaults are the network ``cryoformer train`` builds (the ``n512`` preset with a 32-wide
density head and the trilinear GetQuery, tuned on CPU: docs/benchmarks.md); the presets are
deltas from them.

Notation (paper §3.4, docs/conventions.md, "The model"): ``D`` box size (px), ``C`` token width, ``K`` spatial tokens
per point (``F_S(x) ∈ R^{K×C}``), ``M`` deformation tokens (``F_D ∈ R^{M×C}``), ``N = n³``
structure queries, one per block of a uniform ``n×n×n`` partition of the box.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .get_query import GET_QUERY_MODES
from .hash_grid import HashGridConfig
from .mlp import IMAGE_NORMALISATIONS
from .renderer import RENDERERS


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a :class:`~cryoformer.model.CryoFormer`.

    Parameters
    ----------
    box_size : int
        Image / volume edge ``D`` in pixels (even).
    zdim : int
        Latent dimension of the deformation encoder (paper: 8).
    token_dim : int
        ``C``, width of structure queries, spatial and deformation tokens.
    n_spatial_tokens : int
        ``K``, number of tokens in ``F_S(x)`` (keys/values of eq. 5).
    n_deformation_tokens : int
        ``M``, number of tokens in ``F_D``. Must equal ``N`` when
        ``literal_paper_attention`` (values of ``Attention(Q, F_D, Q)`` are the ``N`` queries).
    blocks_per_axis : int
        ``n``; ``N = n³`` structure queries.
    n_decoder_blocks : int
        Deformation-aware decoder blocks (paper: 3).
    n_heads : int
        Heads of the decoder blocks' attention (``C`` must be divisible by it). The region-wise
        spatial cross-attention is single-head, as eq. 5 writes it.
    ffn_multiplier : int
        Hidden width of the decoder-block FFNs is ``ffn_multiplier · C``.
    density_head_hidden : int
        Hidden width of the FFN mapping the attended query to density.
    encoder_hidden, encoder_layers : int
        Width and number of hidden layers of both image-encoder MLPs (paper: 128 × 10).
    feature_mlp_hidden : int
        Hidden width of the one-hidden-layer MLP after the hash grid (paper: 64).
    hash_grid : HashGridConfig
        Hash-grid hyper-parameters; ``finest_resolution=None`` means ``D``.
    hash_backend : str
        Backend for :class:`HashGridEncoding` (``"auto"``, ``"torch"``, ...).
    variational : bool
        Deformation encoder outputs ``(mu, logvar)`` and samples ``z`` (cryoDRGN style, KL
        term); else ``z`` is deterministic, as the paper describes ``F_D``.
    get_query : {"block", "trilinear"}
        ``GetQuery(x)`` of eq. 5: the query of the block holding ``x`` (paper) or a trilinear
        blend of the queries of the neighbouring block centres.
    use_ddb : bool
        Deformation-aware decoder blocks; ``False`` is the Table-3 ablation: each query is
        concatenated with the flattened ``F_D`` and mapped by an MLP.
    use_rsca : bool
        Region-wise spatial cross-attention; ``False`` is the Table-3 ablation: the density
        MLP sees the concatenation of ``GetQuery(x)`` and the flattened ``F_S(x)``.
    literal_paper_attention : bool
        Decoder cross-attention computed literally as ``Attention(Q, F_D, Q)`` (keys from
        ``F_D``, values from ``Q``); default (docs/conventions.md, "The model") takes the values from ``F_D``.
    use_orientation_encoder : bool
        Build the orientation encoder (pose refinement). Off when poses are trusted.
    renderer : {"canonical", "direct"}
        Image formation used by ``forward`` (docs/conventions.md, "The model").
    feature_grid_resolution : int or None
        Resolution ``G`` of the canonical grid on which ``F_S`` is evaluated before trilinear
        upsampling to ``D`` (paper: "downsample F_S to an affordable resolution"); None = ``D``.
    image_normalisation : {"per_image", "none"}
        What the encoders do to the (circularly masked) image; see
        :func:`cryoformer.model.mlp.prepare_encoder_input`.
    """

    box_size: int
    zdim: int = 8
    token_dim: int = 8
    n_spatial_tokens: int = 8
    n_deformation_tokens: int = 8
    blocks_per_axis: int = 8
    n_decoder_blocks: int = 3
    n_heads: int = 1
    ffn_multiplier: int = 4
    # 32 wide, not 64: the head runs per image on every voxel, so its width sets the training
    # cost; 32 trains 1.8x faster at D = 64 on CPU (docs/benchmarks.md).
    density_head_hidden: int = 32
    encoder_hidden: int = 128
    encoder_layers: int = 10
    feature_mlp_hidden: int = 64
    hash_grid: HashGridConfig = field(default_factory=HashGridConfig)
    hash_backend: str = "auto"
    variational: bool = False
    # The trilinear blend, not the paper's block lookup (docs/conventions.md, "The model",
    # leaves the choice to FSC): on the AdK benchmark (SNR 0.1, box 32) four minutes of
    # training reached a mean FSC-0.5 of 6.8 Å against the truth with the blend and ~19 Å
    # with blocks, whose jumps at block faces the field cannot smooth away
    # (docs/benchmarks.md).
    get_query: str = "trilinear"
    use_ddb: bool = True
    use_rsca: bool = True
    literal_paper_attention: bool = False
    use_orientation_encoder: bool = False
    renderer: str = "canonical"
    feature_grid_resolution: int | None = None
    image_normalisation: str = "per_image"

    def __post_init__(self) -> None:
        if self.box_size < 2 or self.box_size % 2:
            raise ValueError(f"box_size must be even and >= 2, got {self.box_size}")
        for name in ("zdim", "token_dim", "n_spatial_tokens", "n_deformation_tokens",
                     "blocks_per_axis", "n_heads", "ffn_multiplier", "density_head_hidden",
                     "encoder_hidden", "encoder_layers", "feature_mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_decoder_blocks < 0:
            raise ValueError("n_decoder_blocks must be >= 0")
        if self.token_dim % self.n_heads:
            raise ValueError(f"token_dim {self.token_dim} not divisible by n_heads {self.n_heads}")
        if self.get_query not in GET_QUERY_MODES:
            raise ValueError(f"get_query must be one of {GET_QUERY_MODES}, got {self.get_query!r}")
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, got {self.renderer!r}")
        if self.image_normalisation not in IMAGE_NORMALISATIONS:
            raise ValueError(f"image_normalisation must be one of {IMAGE_NORMALISATIONS}")
        if self.literal_paper_attention and self.n_deformation_tokens != self.n_queries:
            raise ValueError(
                "literal_paper_attention needs n_deformation_tokens == n_queries "
                f"({self.n_deformation_tokens} != {self.n_queries}): softmax(Q F_Dᵀ) is N×M "
                "and its values are the N queries")
        g = self.feature_grid_resolution
        if g is not None and not 2 <= g <= self.box_size:
            raise ValueError(f"feature_grid_resolution must be in [2, D], got {g}")

    @property
    def n_queries(self) -> int:
        """``N = n³``, the number of structure queries."""
        return self.blocks_per_axis ** 3

    @property
    def grid_resolution(self) -> int:
        """``G``: resolution of the canonical feature grid (``D`` unless coarser)."""
        return self.feature_grid_resolution or self.box_size

    def hash_grid_for_box(self) -> HashGridConfig:
        """Hash-grid config with ``finest_resolution`` filled in (default ``D``, docs/conventions.md, "The model").

        For boxes smaller than ``base_resolution`` the finest resolution is the base one
        (a single-resolution grid), since tcnn's growth factor must be ``≥ 1``.
        """
        if self.hash_grid.finest_resolution is not None:
            return self.hash_grid
        finest = max(self.box_size, self.hash_grid.base_resolution)
        return dataclasses.replace(self.hash_grid, finest_resolution=finest)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints); inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        hg = d.pop("hash_grid", None)
        if isinstance(hg, dict):
            hg = HashGridConfig(**hg)
        return cls(**d, **({"hash_grid": hg} if hg is not None else {}))


# Named presets (docs/conventions.md, "The model"), as deltas from the defaults. ``K`` and ``M``
# are ours (the paper does not give them): K·C = 64 keeps the tiny MLP's output at its hidden
# width for the paper preset.
PRESETS: dict[str, dict[str, Any]] = {
    # ECCV paper, §4.2: N = 4096 queries (n = 16), C = 8.
    "paper-eccv": dict(blocks_per_axis=16),
    # Table 3's best ablation row: N = 512 (n = 8), C = 8 — the defaults.
    "n512": dict(),
    # First (arXiv) version's default: N = 64, C = 64.
    "n64-c64": dict(blocks_per_axis=4, token_dim=64, n_spatial_tokens=4, n_heads=4),
}


def model_config_from_preset(name: str, box_size: int, **overrides: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a named preset.

    Parameters
    ----------
    name : str
        A key of :data:`PRESETS`.
    box_size : int
        ``D`` in pixels.
    **overrides
        Any :class:`ModelConfig` field. With ``literal_paper_attention=True`` and no explicit
        ``n_deformation_tokens``, ``M`` is set to ``N`` (required by that form).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    if overrides.get("literal_paper_attention") and "n_deformation_tokens" not in overrides:
        n = kwargs.get("blocks_per_axis", ModelConfig.__dataclass_fields__["blocks_per_axis"].default)
        kwargs["n_deformation_tokens"] = n ** 3
    return ModelConfig(box_size=box_size, **kwargs)
