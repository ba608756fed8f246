"""3-D attention maps and the flexible-region score (paper §4.4, docs/conventions.md).

Attention maps
--------------
The paper reshapes the *conditioned structure queries* ``Q' = DDB(Q, F_D(z))`` (``[N, C]``,
query ``i`` owning block ``i`` of the ``n×n×n`` partition) into an ``n³`` volume with ``C``
channels; channels light up on flexible domains. The region-wise spatial cross-attention adds
per-voxel softmax weights over the ``K`` spatial tokens (eq. 5). :func:`attention_stack` puts
both on the decoding grid in one multi-channel volume ``[C + K, D, D, D]``:

* channels ``0 … C−1``: ``GetQuery_{Q'}(x)`` — the query each voxel actually reads (the block's
  query for ``get_query="block"``, the trilinear blend of block centres otherwise), so the map
  shows exactly what the density head sees;
* channels ``C … C+K−1``: the attention weights ``softmax(q·F_S(x)ᵀ/√C)`` (absent for the
  no-RSCA ablation, which has no attention).

Flexible-region score (``flex_score.mrc``)
------------------------------------------
The default method, ``"density"``, is not read from the attention maps: it is the density
head's response to the latent (:mod:`cryoformer.analysis.flexible_regions`), which finds moving
domains better than the query channels do (docs/benchmarks.md). The two attention-map scores
stay available for comparison.

Method ``"queries"``: for latents ``z_1 … z_M`` of the particles
(a seeded random subset of at most 2048), the conditioned queries ``q_{m,b,c}`` are computed
(cheap: only the decoder blocks run, never the volume). Each channel is scaled by its standard
deviation over all blocks and latents, so no channel dominates by scale; a block's score is the
summed variance across latents of its scaled channels::

    s_b = Σ_c Var_m(q_{m,b,c}) / Var_{m,b}(q_{m,b,c})

``s`` (``[n, n, n]``) is placed on the decoding grid by trilinear interpolation between block
centres and divided by its maximum, giving a ``[D, D, D]`` map in ``[0, 1]``. The idea is the
paper's: a block whose query changes with the deformation latent is a block whose structure
the model makes depend on the conformation.

Method ``"weights"`` (alternative, M ≤ 32 latents, each a full grid evaluation):
``Σ_k Var_m(w_{m,k}(x))``, the variance of the per-voxel attention weights, normalised to
``[0, 1]`` the same way.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cryoformer.analysis.flexible_regions import FlexRegionConfig, density_flex_score, subsample_latents
from cryoformer.model.get_query import get_query_on_grid

__all__ = ["attention_stack", "attention_channel_names", "flex_score", "FLEX_METHODS",
           "subsample_latents"]

FLEX_METHODS = ("density", "queries", "weights")


def attention_channel_names(model) -> List[str]:
    """Names of the channels of :func:`attention_stack` (``query_c0`` …, ``weight_k0`` …)."""
    cfg = model.config
    names = [f"query_c{c}" for c in range(cfg.token_dim)]
    if cfg.use_rsca:
        names += [f"weight_k{k}" for k in range(cfg.n_spatial_tokens)]
    return names


@torch.no_grad()
def attention_stack(model, z, D: Optional[int] = None) -> np.ndarray:
    """Attention volumes at one latent as a multi-channel map.

    Parameters
    ----------
    model : CryoFormer
    z : array-like ``[zdim]``
    D : int, optional
        Edge of the output grid (default the training box).

    Returns
    -------
    np.ndarray
        ``[C + K, D, D, D]`` float32 (``[C, D, D, D]`` without RSCA); channel ``i`` is named by
        :func:`attention_channel_names`. Write it with :func:`cryoformer.io.write_volume`.
    """
    D = int(D or model.box_size)
    queries, weights = model.attention_volumes(np.asarray(z, np.float32).reshape(-1), D)
    q_grid = get_query_on_grid(queries.float(), D, model.config.get_query)  # [D, D, D, C]
    parts = [q_grid] if weights is None else [q_grid, weights.float()]
    stack = torch.cat(parts, dim=-1).permute(3, 0, 1, 2)  # [C+K, D, D, D]
    return stack.cpu().numpy().astype(np.float32)


def _normalise_max(score: np.ndarray) -> np.ndarray:
    top = float(score.max()) if score.size else 0.0
    return (score / top if top > 0 else np.zeros_like(score)).astype(np.float32)


@torch.no_grad()
def flex_score(model, z: np.ndarray, D: Optional[int] = None, method: str = "density",
               max_latents: Optional[int] = None, seed: int = 0, batch_size: int = 256,
               progress: bool = False) -> np.ndarray:
    """Flexible-region score map (definition in the module docstring).

    Parameters
    ----------
    model : CryoFormer
    z : np.ndarray
        ``[N, zdim]`` particle latents (the distribution whose variability is scored).
    D : int, optional
        Output edge (default the training box).
    method : {"density", "queries", "weights"}
        ``"density"`` (default): the density head's response to the latent
        (:mod:`cryoformer.analysis.flexible_regions`); the other two read the attention maps.
    max_latents : int, optional
        Latents used (seeded subsample); default 256 for ``"density"``, 2048 for ``"queries"``,
        32 for ``"weights"``.
    seed : int
    batch_size : int
        Latents per forward pass of the decoder blocks (``"queries"``).
    progress : bool

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` float32 in ``[0, 1]``.
    """
    if method not in FLEX_METHODS:
        raise ValueError(f"method must be one of {FLEX_METHODS}, got {method!r}")
    D = int(D or model.box_size)
    if method == "density":
        cfg = FlexRegionConfig(seed=seed, **({"max_latents": max_latents} if max_latents else {}))
        return density_flex_score(model, z, D, cfg)
    default = 2048 if method == "queries" else 32
    zs = subsample_latents(z, max_latents or default, seed)  # [M, zdim]
    if len(zs) < 2:
        return np.zeros((D, D, D), dtype=np.float32)  # no variability without two latents
    if method == "weights" and not model.config.use_rsca:
        raise ValueError("method 'weights' needs a model with region-wise spatial cross-attention")
    if method == "queries":
        score = _query_variance(model, zs, D, batch_size, progress)
    else:
        score = _weight_variance(model, zs, D, progress)
    return _normalise_max(_in_support(model, score, D))


def _query_variance(model, zs: np.ndarray, D: int, batch_size: int, progress: bool) -> np.ndarray:
    """Method ``"queries"``: per-block scaled query variance over the latents ``zs`` ``[M, zdim]``,
    trilinear between block centres → ``[D, D, D]`` float32 (not normalised)."""
    dev = next(model.parameters()).device
    n = model.config.blocks_per_axis
    qs = []
    for start in tqdm(range(0, len(zs), batch_size), desc="flex score", disable=not progress,
                      leave=False):
        zb = torch.from_numpy(zs[start:start + batch_size]).to(dev)
        qs.append(model.conditioned_queries(zb).double().cpu())  # [b, N, C]
    q = torch.cat(qs)  # [M, N, C]
    scale = q.reshape(-1, q.shape[-1]).var(dim=0)  # [C] over latents and blocks
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    block = (q.var(dim=0) / scale).sum(dim=-1)  # [N]
    grid = get_query_on_grid(block.reshape(n, n, n, 1).float(), D, "trilinear")[..., 0]  # [D, D, D]
    return grid.numpy()


def _weight_variance(model, zs: np.ndarray, D: int, progress: bool) -> np.ndarray:
    """Method ``"weights"``: per-voxel attention-weight variance over the latents ``zs``, summed
    over the spatial tokens → ``[D, D, D]`` float64 (not normalised)."""
    # Streaming (Welford) variance over latents: one grid of weights in memory at a time.
    mean = m2 = None
    for i, zi in enumerate(tqdm(zs, desc="flex score", disable=not progress, leave=False)):
        _, w = model.attention_volumes(zi, D)
        w = w.double().cpu()  # [D, D, D, K]
        if mean is None:
            mean, m2 = w.clone(), torch.zeros_like(w)
            continue
        delta = w - mean
        mean += delta / (i + 1)
        m2 += delta * (w - mean)
    score = (m2 / (len(zs) - 1)).sum(dim=-1)  # [D, D, D]
    return score.numpy()


def _in_support(model, grid: np.ndarray, D: int) -> np.ndarray:
    """Zero outside a model's support mask (trained with --support-mask): no density there,
    so nothing can be flexible there."""
    keep = model.support_at(D) if hasattr(model, "support_at") else None
    return grid if keep is None else grid * keep.cpu().numpy()

