"""The CryoFormer network (paper Fig. 1): encoders, feature volume, transformer, renderer.

Training forward pass (images → predicted images)::

    z        = DeformationEncoder(image)                  # [B, zdim]       §3.2
    F_D      = DeformationTokens(z)                       # [B, M, C]
    Q'       = DeformationTransformer.condition(F_D)      # [B, N, C]       §3.4 (DDB)
    σ̂(x)     = head(GetQuery_{Q'}(x), F_S(x))            # eq. 5, F_S = V_Θ(x) (eq. 3)
    Î        = CTF ⋆ shift(Σ_z σ̂(R̂ᵀ p))                  # eq. 6

Decoding needs only ``z`` (paper §3.2 footnote): :meth:`CryoFormer.decode_volume`. ``F_S`` on
the decoding grid does not depend on ``z`` and is cached, so decoding many latents runs only
the decoder blocks (``N`` queries) and the per-voxel head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .deformation_transformer import DeformationTransformer
from .encoders import DeformationEncoder, DeformationTokens, OrientationEncoder
from .feature_volume import FeatureVolume
from .renderer import make_renderer
from .sampling import (grid_points_unit, grid_unit_coords, interpolation_matrix,
                       pixel_to_unit, resolution_ratio_grid, sample_block_volume,
                       separable_resample)
from .support import support_index


class CryoFormer(nn.Module):
    """CryoFormer model; also the density *field* its renderers evaluate.

    Parameters
    ----------
    config : ModelConfig
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.box_size = config.box_size
        self.feature_volume = FeatureVolume(config.hash_grid_for_box(), config.n_spatial_tokens,
                                            config.token_dim, config.feature_mlp_hidden,
                                            backend=config.hash_backend)
        self.deformation_encoder = DeformationEncoder(
            config.box_size, config.zdim, config.encoder_hidden, config.encoder_layers,
            config.variational, config.image_normalisation)
        self.orientation_encoder = (
            OrientationEncoder(config.box_size, config.encoder_hidden, config.encoder_layers,
                               config.image_normalisation)
            if config.use_orientation_encoder else None)
        self.deformation_tokens = DeformationTokens(config.zdim, config.n_deformation_tokens,
                                                    config.token_dim)
        self.transformer = DeformationTransformer(config)
        self.renderer = make_renderer(config.renderer, config.box_size)
        self._feature_cache: dict[str, Any] = {}
        # Voxels per chunk of the grid evaluator (bounds temporary memory); None picks 2^18
        # on CPU (cache-sized) and 2^22 on GPUs (a 128³ decode in two launches' worth).
        self.chunk_points: int | None = None
        # Support mask [D, D, D] bool on the training grid (cryoformer.model.support), or None
        # for the whole sphere. Not in the state dict: checkpoints store it beside the weights.
        self.register_buffer("support_mask", None, persistent=False)
        self._support_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ support
    def set_support(self, mask: torch.Tensor | None) -> None:
        """Restrict the density to ``mask`` ([D, D, D] bool, training grid; None = no limit).

        The canonical renderer then runs the per-image head only on the mask's voxels, and
        :meth:`decode_volume` returns zero outside it (resampled to the decoding grid)."""
        if mask is not None:
            d = self.box_size
            if tuple(mask.shape) != (d, d, d):
                raise ValueError(f"support mask must be [{d}, {d}, {d}], got {tuple(mask.shape)}")
            mask = mask.to(device=next(self.parameters()).device, dtype=torch.bool)
        self.support_mask = mask
        self._support_cache = {}

    def _support_index(self, resolution: int) -> torch.Tensor | None:
        if self.support_mask is None:
            return None
        key = resolution
        if key not in self._support_cache or self._support_cache[key].device != self.support_mask.device:
            self._support_cache[key] = support_index(self.support_mask, resolution)
        return self._support_cache[key]

    def support_at(self, resolution: int) -> torch.Tensor | None:
        """The support as a ``[r, r, r]`` bool grid at ``resolution`` (None without one)."""
        sup = self._support_index(resolution)
        if sup is None:
            return None
        keep = torch.zeros(resolution ** 3, dtype=torch.bool, device=sup.device)
        keep[sup] = True
        return keep.reshape(resolution, resolution, resolution)

    def restrict_voxel_index(self, voxel_index: torch.Tensor, resolution: int) -> torch.Tensor:
        """``voxel_index`` (sorted flat indices) ∩ the support at ``resolution`` (renderer hook)."""
        keep = self.support_at(resolution)
        if keep is None:
            return voxel_index
        return voxel_index[keep.reshape(-1).to(voxel_index.device)[voxel_index]]

    # ------------------------------------------------------------------ conditioning
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Deformation encoding: images [B, D, D] → dict(z, mu, logvar), each [B, zdim]."""
        return self.deformation_encoder(images)

    def conditioned_queries(self, z: torch.Tensor) -> torch.Tensor:
        """Structure queries after the decoder blocks: z [B, zdim] → [B, N, C]."""
        return self.transformer.condition(self.deformation_tokens(z))

    def query_table(self, z: torch.Tensor) -> torch.Tensor:
        """Per-block table read by ``GetQuery``: z [B, zdim] → [B, n, n, n, T]."""
        return self.transformer.query_table(self.conditioned_queries(z))

    # ------------------------------------------------------------------ field protocol
    def density_at_points(self, points_px: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Density at arbitrary points (direct renderer).

        Parameters
        ----------
        points_px : Tensor [B, P, 3]
            ``(x, y, z)`` in pixels relative to the box centre.
        table : Tensor [B, n, n, n, T]
            From :meth:`query_table`.

        Returns
        -------
        Tensor [B, P]
        """
        u = pixel_to_unit(points_px, self.box_size)  # [B, P, 3]
        feats = self.feature_volume(u)  # [B, P, K, C]
        q = sample_block_volume(table, u, self.config.get_query)  # [B, P, T]
        return self.transformer.density(q, feats)[0]

    def density_on_grid(self, table: torch.Tensor, resolution: int,
                        voxel_index: torch.Tensor | None = None) -> torch.Tensor:
        """Density on the voxels of a ``resolution³`` grid spanning the box (canonical renderer).

        Returns
        -------
        Tensor [B, S] (``S`` = ``len(voxel_index)`` or ``resolution³``)
        """
        return self._grid_eval(table, resolution, voxel_index, want_weights=False)[0]

    # ------------------------------------------------------------------ grid evaluation
    def feature_grid(self, resolution: int, use_cache: bool) -> torch.Tensor:
        """``F_S`` on a ``resolution³`` grid, ``[G, G, G, K·C]``; cached when ``use_cache``.

        The cache key is :meth:`FeatureVolume.parameter_version` (storage pointers, version
        counters and a fingerprint of the values), so an optimiser step (fused ones
        included), ``load_state_dict`` or ``.to()`` invalidates it; ``train()``/``eval()``
        and :meth:`invalidate_cache` clear it too. One resolution is cached at a time.
        """
        chunk = self._chunk(next(self.parameters()).device)
        if not use_cache:
            return self.feature_volume.on_grid(resolution, chunk).flatten(-2)
        key = (resolution, self.feature_volume.parameter_version())
        if self._feature_cache.get("key") != key:
            with torch.no_grad():
                grid = self.feature_volume.on_grid(resolution, chunk).flatten(-2)
            self._feature_cache = {"key": key, "grid": grid}
        return self._feature_cache["grid"]

    def _chunk(self, device: torch.device, batch: int | None = None) -> int:
        """Voxels per slab: ``chunk_points`` if set; else 2^22 on GPUs; on CPU 2^18 without
        ``batch`` (decoding), and 2^17 / ``batch`` while training (≈ 8k voxels for a batch
        of 16: the best of 2^12…2^15 measured at D = 64, where one slab's [B, P, H] head
        tensors stay in cache between its forward and backward passes)."""
        if self.chunk_points:
            return self.chunk_points
        if device.type == "cuda":
            return 1 << 22
        return 1 << 18 if batch is None else max(1 << 11, (1 << 17) // max(1, batch))

    def invalidate_cache(self) -> None:
        """Drop the cached feature grid (frees its memory; the next decode rebuilds it)."""
        self._feature_cache = {}

    def train(self, mode: bool = True) -> "CryoFormer":
        self.invalidate_cache()
        return super().train(mode)

    def _grid_eval(self, table: torch.Tensor, resolution: int,
                   voxel_index: torch.Tensor | None, want_weights: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head on grid voxels, in z-slabs; returns density [B, S] and weights [B, S, K].

        Training (gradients on) differs from decoding, for speed on CPU (docs/benchmarks.md,
        "Where the time goes"): ``F_S`` is evaluated only on the requested voxels, not the
        whole grid; the slabs are small (:meth:`_chunk`); and each slab's activations are
        recomputed in its backward pass — by the fused head
        (:mod:`~cryoformer.model.fused_head`), or by activation checkpointing for a head
        without one — so a slab's backward runs right after its forward while its
        ``[B, P, H]`` tensors are in cache, instead of all slabs' activations going
        through memory.
        """
        cfg = self.config
        b, n = table.shape[0], table.shape[1]
        r = resolution
        g = resolution_ratio_grid(cfg.box_size, r, cfg.grid_resolution)
        device = table.device
        training = torch.is_grad_enabled()
        slab = max(1, self._chunk(device, b if training else None) // (r * r))
        # Slabs of z-planes, and the requested voxels in each (flat ids local to the slab).
        slabs: list[tuple[int, int, torch.Tensor | None]] = []
        for z0 in range(0, r, slab):
            z1 = min(r, z0 + slab)
            local = None
            if voxel_index is not None:
                lo, hi = torch.searchsorted(voxel_index, torch.tensor(
                    [z0 * r * r, z1 * r * r], device=voxel_index.device)).tolist()
                if hi == lo:
                    continue
                local = voxel_index[lo:hi] - z0 * r * r
            slabs.append((z0, z1, local))
        if not slabs:  # no voxel requested (an empty support at a coarse decoding grid)
            return table.new_zeros(b, 0), None

        u = grid_unit_coords(r, device=device)
        if g == r and training:
            # F_S at the requested voxels only, computed once and shared by the batch; split
            # (not sliced) per slab, so its backward is one concatenation rather than one
            # full-size zero tensor per slab.
            pts = grid_points_unit(r, device=device)
            if voxel_index is not None:
                pts = pts[voxel_index]
            sizes = [(z1 - z0) * r * r if local is None else local.numel()
                     for z0, z1, local in slabs]
            feats = self.feature_volume(pts, chunk_size=self._chunk(device)).flatten(-2)
            slab_feats: list[torch.Tensor] | None = list(feats.split(sizes))  # [P_slab, K·C]
            m_feat = None
        else:
            # F_S on the whole G³ grid (cached across latents when decoding), upsampled
            # per slab when G < r.
            feats = self.feature_grid(g, use_cache=not training)  # [G, G, G, K·C]
            m_feat = None if g == r else interpolation_matrix(u, g, "trilinear", centred=False)
            slab_feats = None
        if cfg.get_query == "block":
            m_query = interpolation_matrix(u, n, "block", centred=True)  # one-hot [r, n]
        else:
            m_query = interpolation_matrix(u, n, "trilinear", centred=True)  # [r, n]
        recomputes = self.transformer.head.recomputes_in_backward(device)
        checkpointed = training and device.type == "cpu" and len(slabs) > 1 and not recomputes
        fused = training and not want_weights and recomputes
        if fused:
            # The fused head works voxel-major; GetQuery on a table with the batch folded
            # into the channels ([n, n, n, B·T]) produces that layout without a transpose.
            t = table.shape[-1]
            table = table.permute(1, 2, 3, 0, 4).reshape(n, n, n, b * t)

        dens_out, w_out = [], []
        for i, (z0, z1, local) in enumerate(slabs):
            if slab_feats is not None:
                f = slab_feats[i]
            elif m_feat is None:
                f = feats[z0:z1].reshape(-1, feats.shape[-1])
                f = f if local is None else f[local]
            else:  # trilinearly upsampled from G < r
                f = separable_resample(feats, m_feat[z0:z1], m_feat, m_feat)
                f = f.reshape(-1, feats.shape[-1])
                f = f if local is None else f[local]
            args = (table, f, m_query, z0, z1, local, want_weights, b if fused else None)
            if checkpointed:
                d, w = checkpoint(self._slab_density, *args, use_reentrant=False)
            else:
                d, w = self._slab_density(*args)
            dens_out.append(d)
            if want_weights and w is not None:
                w_out.append(w)
        dens = torch.cat(dens_out, dim=1)
        return dens, (torch.cat(w_out, dim=1) if w_out else None)

    def _slab_density(self, table: torch.Tensor, f: torch.Tensor, m_query: torch.Tensor,
                      z0: int, z1: int, local: torch.Tensor | None, want_weights: bool,
                      fused_batch: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head on the voxels of z-planes ``z0:z1`` (all, or ``local`` flat ids in the slab).

        ``table`` [B, n, n, n, T], or [n, n, n, B·T] for the fused head (``fused_batch`` =
        B); ``f`` [P, K·C], the slab's spatial features; ``m_query`` [r, n], GetQuery's 1-D
        weights (one-hot for "block"). Returns density [B, P] and weights [B, P, K] (None
        for the no-RSCA head and the fused path).
        """
        r = m_query.shape[0]
        my, mx, sub = m_query, m_query, None
        if local is not None:
            # GetQuery on the bounding box of the slab's voxels only (a compact support is
            # far smaller than the slab), then pick the voxels.
            zz, rest = local // (r * r), local % (r * r)
            yy, xx = rest // r, rest % r
            y0, y1 = int(yy.min()), int(yy.max()) + 1
            x0, x1 = int(xx.min()), int(xx.max()) + 1
            my, mx = m_query[y0:y1], m_query[x0:x1]
            sub = (zz * (y1 - y0) + (yy - y0)) * (x1 - x0) + (xx - x0)
        q = separable_resample(table, m_query[z0:z1], my, mx)
        f = f.reshape(f.shape[0], self.config.n_spatial_tokens, -1)  # [P, K, C]
        # index_select, not [sub]: its backward is an index_add, not a sorting
        # accumulate-put (≈ 3× faster on CPU).
        if fused_batch is not None:
            q = q.reshape(-1, fused_batch, q.shape[-1] // fused_batch)  # [P_box, B, T]
            q = q if sub is None else q.index_select(0, sub)  # [P, B, T]
            return self.transformer.head.fused_density(q, f), None
        b, t = table.shape[0], table.shape[-1]
        q = q.reshape(b, -1, t)
        q = q if sub is None else q.index_select(1, sub)  # [B, P, T]
        return self.transformer.density(q, f)

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor, rotations: torch.Tensor | None = None,
                shifts_px: torch.Tensor | None = None, ctf: torch.Tensor | None = None,
                pose_source: str = "auto") -> dict[str, torch.Tensor | None]:
        """Encode images and render their predictions (paper eq. 6).

        Parameters
        ----------
        images : Tensor [B, D, D]
            Observed particle images.
        rotations : Tensor [B, 3, 3] or None
            Given (initial) rotations ``R₀`` (docs/conventions.md convention).
        shifts_px : Tensor [B, 2] or None
            Given shifts ``t₀`` in pixels (None = no shift).
        ctf : Tensor [B, 9] or [B, D, D] or None
            cryoDRGN CTF rows or CTF images; None = no CTF.
        pose_source : {"auto", "given", "predicted"}
            Pose used for rendering. ``"auto"``: the orientation encoder's prediction when it
            exists (paper §3.2: the image loss refines it; regularise with
            :func:`~cryoformer.model.encoders.pose_loss` against the given pose), else the
            given pose.

        Returns
        -------
        dict
            ``pred_images`` [B, D, D]; ``z``, ``mu`` [B, zdim]; ``logvar`` [B, zdim] or None;
            ``rotations`` [B, 3, 3] and ``shifts_px`` [B, 2] or None (pose used);
            ``pred_rotations`` [B, 3, 3], ``pred_shifts_px`` [B, 2] (None without encoder).
        """
        enc = self.encode(images)
        pred_r = pred_t = None
        if self.orientation_encoder is not None and pose_source != "given":
            pred_r, pred_t = self.orientation_encoder(images)
        if pose_source == "predicted" or (pose_source == "auto" and pred_r is not None):
            if pred_r is None:
                raise ValueError("pose_source='predicted' needs use_orientation_encoder=True")
            rot, shifts = pred_r, pred_t
        elif pose_source in ("auto", "given"):
            if rotations is None:
                raise ValueError("rotations are required without an orientation encoder")
            rot, shifts = rotations, shifts_px
        else:
            raise ValueError(f"unknown pose_source {pose_source!r}")
        table = self.query_table(enc["z"])
        pred = self.renderer(self, table, rot, shifts, ctf)
        return {"pred_images": pred, "z": enc["z"], "mu": enc["mu"], "logvar": enc["logvar"],
                "rotations": rot, "shifts_px": shifts,
                "pred_rotations": pred_r, "pred_shifts_px": pred_t}

    # ------------------------------------------------------------------ decoding API
    def _as_latent(self, z: Any) -> tuple[torch.Tensor, bool]:
        dev = next(self.parameters()).device
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not torch.is_tensor(z) else z)
        z = z.to(device=dev, dtype=torch.float32)
        single = z.dim() == 1
        z = z.unsqueeze(0) if single else z
        if z.dim() != 2 or z.shape[1] != self.config.zdim:
            raise ValueError(f"z must be [zdim] or [B, zdim] with zdim={self.config.zdim}, "
                             f"got shape {tuple(z.shape)}")
        return z, single

    @torch.no_grad()
    def decode_volume(self, z: Any, D: int | None = None) -> torch.Tensor:
        """Density volume at a latent, without any image (paper §3.2 footnote).

        Parameters
        ----------
        z : array-like [zdim] or [B, zdim]
        D : int, optional
            Output edge in voxels (even); default the training box size. The volume always
            spans the training box, so its voxel size is ``box_size / D`` training pixels.

        Returns
        -------
        Tensor [D, D, D] or [B, D, D, D], float32, axes ``[z, y, x]``, on the model's device.
        """
        z, single = self._as_latent(z)
        r = int(D or self.box_size)
        sup = self._support_index(r)
        dens, _ = self._grid_eval(self.query_table(z), r, sup, want_weights=False)
        if sup is not None:  # zero outside the support, as in training
            full = dens.new_zeros(z.shape[0], r ** 3)
            dens = full.index_copy(1, sup, dens)
        vol = dens.reshape(z.shape[0], r, r, r)
        return vol[0] if single else vol

    @torch.no_grad()
    def attention_volumes(self, z: Any, D: int | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """3-D attention maps (paper §4.4) at a latent.

        Parameters
        ----------
        z : array-like [zdim] or [B, zdim]
        D : int, optional
            Edge of the weight volume; default the box size.

        Returns
        -------
        queries_volume : Tensor [n, n, n, C] (or [B, ...])
            Conditioned structure queries arranged as their blocks (axes z, y, x).
        attention_weights : Tensor [D, D, D, K] (or [B, ...]) or None
            Per-voxel softmax weights of eq. 5 over the ``K`` spatial tokens; None for the
            no-RSCA ablation, which has no attention.
        """
        z, single = self._as_latent(z)
        r = int(D or self.box_size)
        n = self.config.blocks_per_axis
        q = self.conditioned_queries(z)  # [B, N, C]
        _, w = self._grid_eval(self.transformer.query_table(q), r, None, want_weights=True)
        qv = q.reshape(z.shape[0], n, n, n, -1)
        wv = None if w is None else w.reshape(z.shape[0], r, r, r, -1)
        keep = self.support_at(r)
        if wv is not None and keep is not None:  # no density (hence no attention) outside
            wv = wv * keep[..., None].to(wv.dtype)
        if single:
            return qv[0], (None if wv is None else wv[0])
        return qv, wv
