"""The density field: ``σ̂`` at the sites a renderer asks for (paper eq. 5 over the volume).

:class:`DensityField` owns the image-independent half of the density — the feature volume
``F_S = V_Θ(x)`` (eq. 3), its cached grid, and the support mask (:mod:`.support`) — and
evaluates the per-image half, a density head of :mod:`.spatial_cross_attention` reading the
per-block query table by GetQuery (:mod:`.get_query`), at

* arbitrary points (:class:`~cryoformer.model.sites.PointSites`, direct renderer): GetQuery's
  point form and ``F_S`` at the points themselves;
* voxels of a grid (:class:`~cryoformer.model.sites.GridSites`, canonical renderer,
  decoding, attention maps): GetQuery's separable grid form, in z-slabs.

How the grid evaluation runs is an explicit :class:`ExecutionPolicy`
(:func:`execution_policy`), chosen from the device and grad mode; every choice computes the
same function and gradients (tested). Training on CPU (docs/benchmarks.md, "Where the time
goes"): ``F_S`` only on the requested voxels, not the whole grid; small slabs
(:func:`slab_voxels`); each slab's activations recomputed in its backward pass — by the fused
kernel of the eq.-5 head, or by activation checkpointing for a head without one — so a
slab's backward runs right after its forward while its ``[B, P, H]`` tensors are in cache.
Decoding and GPUs: plain autograd (or none), ``F_S`` on the whole grid, large slabs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .coordinates import grid_points_unit, grid_unit_coords, pixel_to_unit, resolution_ratio_grid
from .feature_volume import FeatureVolume
from .get_query import get_query_at_points, interpolation_matrix, query_matrix, separable_resample
from .spatial_cross_attention import RegionWiseSpatialHead
from .sites import GridSites, PointSites
from .support import support_index

def slab_voxels(device: torch.device, batch: int | None = None,
                override: int | None = None, training: int | None = None,
                inference_batch: int | None = None) -> int:
    """Voxels per slab of the grid evaluation.

    ``override`` if set; else, with ``batch`` (training), ``training`` if set (the trainer
    times slab sizes on the machine: :mod:`cryoformer.trainer.slab_tuning`); else 2^22 on GPUs
    (a 128³ decode in two launches' worth); on CPU 2^17 / ``batch`` while training (≈ 8k voxels
    for a batch of 16: the best of 2^12…2^15 measured at D = 64 on an AMD EPYC, where one
    slab's [B, P, H] head tensors stay in cache between its forward and backward passes), and
    without ``batch`` (no gradients) 2^18, or 2^20 / ``inference_batch`` when that is smaller:
    a slab of 2^18 voxels for each of 32 held-out images at D = 128 peaked at 4.4 GB, 8 images
    at 1.9 GB in the same time (docs/benchmarks.md).
    """
    if override:
        return override
    if batch is not None and training:
        return training
    if device.type == "cuda":
        return 1 << 22
    if batch is None:
        return min(1 << 18, max(1 << 11, (1 << 20) // max(1, inference_batch or 1)))
    return max(1 << 11, (1 << 17) // max(1, batch))


@dataclass(frozen=True)
class ExecutionPolicy:
    """How :meth:`DensityField.on_grid` runs.

    Attributes
    ----------
    slab_voxels : int
        Voxels per z-slab (whole z-planes, at least one).
    mode : {"autograd", "checkpointed", "fused"}
        Per slab: plain autograd; activation checkpointing (when there is more than one slab);
        or the eq.-5 head's fused CPU kernel (voxel-major table, no attention weights).
    features_on_request : bool
        ``F_S`` evaluated at the requested voxels only (training), not on the cached grid.
    """

    slab_voxels: int
    mode: str
    features_on_request: bool


def execution_policy(device: torch.device, grad_enabled: bool, head: nn.Module,
                     want_weights: bool, batch: int,
                     chunk_points: int | None = None, training_slab: int | None = None) -> ExecutionPolicy:
    """The grid evaluation's policy for ``head`` on ``device`` (see the module docstring).

    Gradients on a CPU: the fused kernel for the eq.-5 head unless attention weights are
    wanted (the kernel does not return them), activation checkpointing for a head without a
    fused kernel. Otherwise (no gradients, or a GPU): plain autograd.
    """
    mode = "autograd"
    if grad_enabled and device.type == "cpu":
        if not isinstance(head, RegionWiseSpatialHead):
            mode = "checkpointed"
        elif not want_weights:
            mode = "fused"
    slab = (slab_voxels(device, batch, chunk_points, training_slab) if grad_enabled
            else slab_voxels(device, None, chunk_points, inference_batch=batch))
    return ExecutionPolicy(slab, mode, features_on_request=grad_enabled)


def z_slabs(resolution: int, planes: int, voxel_index: torch.Tensor | None,
            ) -> list[tuple[int, int, torch.Tensor | None]]:
    """Slabs of ``planes`` z-planes holding requested voxels.

    Returns
    -------
    list of (z0, z1, local)
        Planes ``z0:z1``; ``local`` [P] the requested voxels' flat ids within the slab
        (None = all of it). Slabs without a requested voxel are left out.
    """
    r = resolution
    slabs: list[tuple[int, int, torch.Tensor | None]] = []
    for z0 in range(0, r, planes):
        z1 = min(r, z0 + planes)
        local = None
        if voxel_index is not None:
            lo, hi = torch.searchsorted(voxel_index, torch.tensor(
                [z0 * r * r, z1 * r * r], device=voxel_index.device)).tolist()
            if hi == lo:
                continue
            local = voxel_index[lo:hi] - z0 * r * r
        slabs.append((z0, z1, local))
    return slabs


@dataclass(frozen=True)
class _SlabFeatures:
    """``F_S`` for each slab: split from per-voxel features, sliced from a grid of the same
    resolution, or trilinearly upsampled from a coarser grid (``upsample`` [r, G])."""

    per_slab: list[torch.Tensor] | None = None
    grid: torch.Tensor | None = None
    upsample: torch.Tensor | None = None

    def of(self, i: int, z0: int, z1: int, local: torch.Tensor | None) -> torch.Tensor:
        """``F_S`` at slab ``i``'s requested voxels, ``[P, K·C]``."""
        if self.per_slab is not None:
            return self.per_slab[i]
        feats = self.grid  # [G, G, G, K·C]
        if self.upsample is None:
            f = feats[z0:z1].reshape(-1, feats.shape[-1])
        else:
            m = self.upsample
            f = separable_resample(feats, m[z0:z1], m, m).reshape(-1, feats.shape[-1])
        return f if local is None else f[local]


def _slab_density(head: nn.Module, n_tokens: int, table: torch.Tensor, f: torch.Tensor,
                  m_query: torch.Tensor, z0: int, z1: int, local: torch.Tensor | None,
                  fused_batch: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head on the voxels of z-planes ``z0:z1`` (all, or ``local`` flat ids in the slab).

    ``table`` [B, n, n, n, T], or [n, n, n, B·T] for the fused kernel (``fused_batch`` = B);
    ``f`` [P, K·C], the slab's spatial features; ``m_query`` [r, n], GetQuery's 1-D weights
    (one-hot for "block"). Returns density [B, P] and weights [B, P, K] (None for the no-RSCA
    head and the fused kernel).
    """
    r = m_query.shape[0]
    my, mx, sub = m_query, m_query, None
    if local is not None:
        # GetQuery on the bounding box of the slab's voxels only (a compact support is far
        # smaller than the slab), then pick the voxels.
        zz, rest = local // (r * r), local % (r * r)
        yy, xx = rest // r, rest % r
        y0, y1 = int(yy.min()), int(yy.max()) + 1
        x0, x1 = int(xx.min()), int(xx.max()) + 1
        my, mx = m_query[y0:y1], m_query[x0:x1]
        sub = (zz * (y1 - y0) + (yy - y0)) * (x1 - x0) + (xx - x0)
    q = separable_resample(table, m_query[z0:z1], my, mx)
    f = f.reshape(f.shape[0], n_tokens, -1)  # [P, K, C]
    # index_select, not [sub]: its backward is an index_add, not a sorting accumulate-put
    # (≈ 3× faster on CPU).
    if fused_batch is not None:
        # The batch is folded into the table's channels, so GetQuery's output is voxel-major.
        q = q.reshape(-1, fused_batch, q.shape[-1] // fused_batch)  # [P_box, B, T]
        q = q if sub is None else q.index_select(0, sub)  # [P, B, T]
        return head.fused_density(q, f), None
    b, t = table.shape[0], table.shape[-1]
    q = q.reshape(b, -1, t)
    q = q if sub is None else q.index_select(1, sub)  # [B, P, T]
    return head(q, f)


class DensityField(nn.Module):
    """``F_S``, the support, the feature cache and the execution policy; densities at sites.

    Parameters
    ----------
    config : ModelConfig

    Attributes
    ----------
    feature_volume : FeatureVolume
        ``F_S = V_Θ(x)``.
    chunk_points : int or None
        Voxels per slab, overriding :func:`slab_voxels` (bounds temporary memory).
    training_slab_voxels : int or None
        Voxels per slab of steps with gradients when ``chunk_points`` is None (the trainer
        sets it from timed steps); None: :func:`slab_voxels`'s default.
    support_mask : BoolTensor [D, D, D] or None
        The support on the training grid (None = the whole sphere). Not in the state dict:
        checkpoints store it beside the weights.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.box_size = config.box_size
        self.feature_volume = FeatureVolume(config.hash_grid_for_box(), config.n_spatial_tokens,
                                            config.token_dim, config.feature_mlp_hidden,
                                            backend=config.hash_backend)
        self.chunk_points: int | None = None
        self.training_slab_voxels: int | None = None
        self.register_buffer("support_mask", None, persistent=False)
        self._support_cache: dict[int, torch.Tensor] = {}
        self._feature_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ support
    def set_support(self, mask: torch.Tensor | None) -> None:
        """Restrict the density to ``mask`` ([D, D, D] bool, training grid; None = no limit)."""
        if mask is not None:
            d = self.box_size
            if tuple(mask.shape) != (d, d, d):
                raise ValueError(f"support mask must be [{d}, {d}, {d}], got {tuple(mask.shape)}")
            mask = mask.to(device=next(self.parameters()).device, dtype=torch.bool)
        self.support_mask = mask
        self._support_cache = {}

    def support_index(self, resolution: int) -> torch.Tensor | None:
        """Sorted flat ids of the support's voxels at ``resolution`` (None without one)."""
        if self.support_mask is None:
            return None
        cached = self._support_cache.get(resolution)
        if cached is None or cached.device != self.support_mask.device:
            self._support_cache[resolution] = support_index(self.support_mask, resolution)
        return self._support_cache[resolution]

    def support_at(self, resolution: int) -> torch.Tensor | None:
        """The support as a ``[r, r, r]`` bool grid at ``resolution`` (None without one)."""
        sup = self.support_index(resolution)
        if sup is None:
            return None
        keep = torch.zeros(resolution ** 3, dtype=torch.bool, device=sup.device)
        keep[sup] = True
        return keep.reshape(resolution, resolution, resolution)

    def restrict(self, sites: PointSites | GridSites) -> PointSites | GridSites:
        """Grid sites ∩ the support (density is zero outside it); points are unchanged."""
        if not isinstance(sites, GridSites) or self.support_mask is None:
            return sites
        r, index = sites.resolution, sites.voxel_index
        if index is None:
            return GridSites(r, self.support_index(r))
        keep = self.support_at(r).reshape(-1).to(index.device)
        return GridSites(r, index[keep[index]])

    # ------------------------------------------------------------------ F_S cache
    def feature_grid(self, resolution: int, use_cache: bool) -> torch.Tensor:
        """``F_S`` on a ``resolution³`` grid, ``[G, G, G, K·C]``; cached when ``use_cache``.

        The cache key is :meth:`FeatureVolume.parameter_version` (storage pointers, version
        counters and a fingerprint of the values), so an optimiser step (fused ones
        included), ``load_state_dict`` or ``.to()`` invalidates it; ``train()``/``eval()``
        and :meth:`invalidate_cache` clear it too. One resolution is cached at a time.
        """
        chunk = slab_voxels(next(self.parameters()).device, None, self.chunk_points)
        if not use_cache:
            return self.feature_volume.on_grid(resolution, chunk).flatten(-2)
        key = (resolution, self.feature_volume.parameter_version())
        if self._feature_cache.get("key") != key:
            with torch.no_grad():
                grid = self.feature_volume.on_grid(resolution, chunk).flatten(-2)
            self._feature_cache = {"key": key, "grid": grid}
        return self._feature_cache["grid"]

    def invalidate_cache(self) -> None:
        """Drop the cached feature grid (frees its memory; the next decode rebuilds it)."""
        self._feature_cache = {}

    def train(self, mode: bool = True) -> "DensityField":
        self.invalidate_cache()
        return super().train(mode)

    # ------------------------------------------------------------------ evaluation
    def forward(self, head: nn.Module, table: torch.Tensor,
                sites: PointSites | GridSites) -> torch.Tensor:
        """Density at a renderer's sites.

        Parameters
        ----------
        head : RegionWiseSpatialHead or ConcatDensityHead
        table : Tensor [B, n, n, n, T]
            Per-block table of the conditioned queries (``head.table``), read by GetQuery.
        sites : PointSites or GridSites

        Returns
        -------
        Tensor [B, S]
        """
        if isinstance(sites, PointSites):
            return self.at_points(head, table, sites.points_px)
        return self.on_grid(head, table, sites.resolution, sites.voxel_index)[0]

    def at_points(self, head: nn.Module, table: torch.Tensor,
                  points_px: torch.Tensor) -> torch.Tensor:
        """Density [B, P] at arbitrary points ``points_px`` [B, P, 3] (px from the centre)."""
        u = pixel_to_unit(points_px, self.box_size)  # [B, P, 3]
        feats = self.feature_volume(u)  # [B, P, K, C]
        q = get_query_at_points(table, u, self.config.get_query)  # [B, P, T]
        return head(q, feats)[0]

    def on_grid(self, head: nn.Module, table: torch.Tensor, resolution: int,
                voxel_index: torch.Tensor | None = None, want_weights: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head on voxels of a ``resolution³`` grid spanning the box, in z-slabs.

        Parameters
        ----------
        head, table : see :meth:`forward`.
        resolution : int
        voxel_index : LongTensor [S] or None
            Sorted flat voxel ids (None = all ``resolution³``).
        want_weights : bool
            Also return the attention weights (never by the fused kernel).

        Returns
        -------
        density : Tensor [B, S]
        weights : Tensor [B, S, K] or None
            None for the no-RSCA head or when not wanted in training on CPU.
        """
        b, n, t = table.shape[0], table.shape[1], table.shape[-1]
        r = resolution
        policy = execution_policy(table.device, torch.is_grad_enabled(), head, want_weights,
                                  b, self.chunk_points, self.training_slab_voxels)
        slabs = z_slabs(r, max(1, policy.slab_voxels // (r * r)), voxel_index)
        if not slabs:  # no voxel requested (an empty support at a coarse decoding grid)
            return table.new_zeros(b, 0), None
        features = self._slab_features(r, slabs, voxel_index, policy.features_on_request,
                                       table.device)
        m_query = query_matrix(r, n, self.config.get_query, device=table.device)  # [r, n]
        fused = policy.mode == "fused"
        checkpointed = policy.mode == "checkpointed" and len(slabs) > 1
        if fused:
            # The fused kernel works voxel-major; GetQuery on a table with the batch folded
            # into the channels ([n, n, n, B·T]) produces that layout without a transpose.
            table = table.permute(1, 2, 3, 0, 4).reshape(n, n, n, b * t)
        k = self.config.n_spatial_tokens
        dens_out, w_out = [], []
        for i, (z0, z1, local) in enumerate(slabs):
            args = (head, k, table, features.of(i, z0, z1, local), m_query, z0, z1, local,
                    b if fused else None)
            if checkpointed:
                d, w = checkpoint(_slab_density, *args, use_reentrant=False)
            else:
                d, w = _slab_density(*args)
            dens_out.append(d)
            if want_weights and w is not None:
                w_out.append(w)
        dens = torch.cat(dens_out, dim=1)
        return dens, (torch.cat(w_out, dim=1) if w_out else None)

    def _slab_features(self, resolution: int, slabs: list, voxel_index: torch.Tensor | None,
                       on_request: bool, device: torch.device) -> _SlabFeatures:
        """``F_S`` for the slabs: at the requested voxels (``on_request``, grid at ``D``'s
        ratio equal to ``resolution``), else from the (cached when decoding) ``G³`` grid."""
        r = resolution
        g = resolution_ratio_grid(self.box_size, r, self.config.grid_resolution)
        if g == r and on_request:
            # F_S at the requested voxels only, computed once and shared by the batch; split
            # (not sliced) per slab, so its backward is one concatenation rather than one
            # full-size zero tensor per slab.
            pts = grid_points_unit(r, device=device)
            if voxel_index is not None:
                pts = pts[voxel_index]
            sizes = [(z1 - z0) * r * r if local is None else local.numel()
                     for z0, z1, local in slabs]
            chunk = slab_voxels(device, None, self.chunk_points)
            feats = self.feature_volume(pts, chunk_size=chunk).flatten(-2)
            return _SlabFeatures(per_slab=list(feats.split(sizes)))  # [P_slab, K·C] each
        grid = self.feature_grid(g, use_cache=not on_request)  # [G, G, G, K·C]
        if g == r:
            return _SlabFeatures(grid=grid)
        u = grid_unit_coords(r, device=device)
        return _SlabFeatures(grid=grid, upsample=interpolation_matrix(u, g, "trilinear",
                                                                      centred=False))

    def volume(self, head: nn.Module, table: torch.Tensor, resolution: int) -> torch.Tensor:
        """Density volumes ``[B, r, r, r]`` on a ``resolution³`` grid, zero outside the support."""
        b, r = table.shape[0], resolution
        sup = self.support_index(r)
        dens, _ = self.on_grid(head, table, r, sup)
        if sup is not None:
            dens = dens.new_zeros(b, r ** 3).index_copy(1, sup, dens)
        return dens.reshape(b, r, r, r)

    def attention_weights(self, head: nn.Module, table: torch.Tensor,
                          resolution: int) -> torch.Tensor | None:
        """Eq.-5 weights ``[B, r, r, r, K]`` (zero outside the support; None without RSCA)."""
        b, r = table.shape[0], resolution
        _, w = self.on_grid(head, table, r, None, want_weights=True)
        if w is None:
            return None
        w = w.reshape(b, r, r, r, -1)
        keep = self.support_at(r)
        if keep is not None:  # no density (hence no attention) outside
            w = w * keep[..., None].to(w.dtype)
        return w
