"""The CryoFormer network (paper Fig. 1): encoders → structure queries → field → renderer.

Training forward pass (images → predicted images), one way through the stages::

    z        = DeformationEncoder(image)                  # [B, zdim]       §3.2
    F_D      = DeformationTokens(z)                       # [B, M, C]
    Q'       = StructureQueries(F_D)                      # [B, N, C]       §3.4 (DDB)
    table    = density_head.table(Q')                     # [B, n, n, n, T] read by GetQuery
    sites    = renderer.sites(R)                          # points, or canonical-grid voxels
    σ̂        = DensityField(density_head, table, sites)   # eq. 5, F_S = V_Θ(x) (eq. 3)
    Î        = renderer(σ̂, sites, R, t, CTF)              # eq. 6: project, shift, CTF

Decoding needs only ``z`` (paper §3.2 footnote): :meth:`CryoFormer.decode_volume`. ``F_S`` on
the decoding grid does not depend on ``z`` and is cached by the field, so decoding many
latents runs only the decoder blocks (``N`` queries) and the per-voxel head.

Checkpoints written before the field owned ``F_S`` (keys ``feature_volume.*``,
``transformer.*``) load through :func:`remap_legacy_keys`; parameter order is unchanged, so
optimiser states load too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .deformation_encoder import DeformationEncoder
from .density_field import DensityField
from .orientation_encoder import OrientationEncoder
from .renderer import make_renderer
from .spatial_cross_attention import make_density_head
from .structure_queries import DeformationTokens, StructureQueries

# Old state-dict prefix → new, most specific first.
LEGACY_PREFIXES = (("transformer.head.", "density_head."),
                   ("transformer.", "structure_queries."),
                   ("feature_volume.", "field.feature_volume."))


def remap_legacy_keys(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, a CryoFormer state dict's keys from the layout before
    :class:`DensityField` (``feature_volume.*``, ``transformer.*``) to the current one."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in LEGACY_PREFIXES:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


class CryoFormer(nn.Module):
    """CryoFormer model.

    Parameters
    ----------
    config : ModelConfig

    Attributes
    ----------
    field : DensityField
        ``F_S``, the support mask, the feature cache, the execution policy.
    deformation_encoder, orientation_encoder (or None), deformation_tokens
    structure_queries : StructureQueries
        The ``N`` queries and the deformation-aware decoder blocks.
    density_head : RegionWiseSpatialHead or ConcatDensityHead
        Eq. 5 (or the no-RSCA ablation).
    renderer : CanonicalGridRenderer or DirectRenderer
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.box_size = config.box_size
        # Registration order = parameter order (optimiser states are indexed by it): the
        # order of the layout before the field, whose F_S came first and head last.
        self.field = DensityField(config)
        self.deformation_encoder = DeformationEncoder(
            config.box_size, config.zdim, config.encoder_hidden, config.encoder_layers,
            config.variational, config.image_normalisation)
        self.orientation_encoder = (
            OrientationEncoder(config.box_size, config.encoder_hidden, config.encoder_layers,
                               config.image_normalisation)
            if config.use_orientation_encoder else None)
        self.deformation_tokens = DeformationTokens(config.zdim, config.n_deformation_tokens,
                                                    config.token_dim)
        self.structure_queries = StructureQueries(config)
        self.density_head = make_density_head(config.use_rsca, config.token_dim,
                                              config.n_spatial_tokens,
                                              config.density_head_hidden)
        self.renderer = make_renderer(config.renderer, config.box_size)
        self.register_load_state_dict_pre_hook(self._remap_legacy_keys)

    @staticmethod
    def _remap_legacy_keys(module, state_dict, prefix, *args) -> None:
        remap_legacy_keys(state_dict, prefix)

    # ------------------------------------------------------------------ field settings
    @property
    def chunk_points(self) -> int | None:
        """Voxels per slab of the grid evaluation; None picks them by device and grad mode
        (:func:`~cryoformer.model.density_field.slab_voxels`)."""
        return self.field.chunk_points

    @chunk_points.setter
    def chunk_points(self, value: int | None) -> None:
        self.field.chunk_points = value

    @property
    def support_mask(self) -> torch.Tensor | None:
        """The support [D, D, D] bool on the training grid, or None (the whole sphere)."""
        return self.field.support_mask

    def set_support(self, mask: torch.Tensor | None) -> None:
        """Restrict the density to ``mask`` ([D, D, D] bool, training grid; None = no limit).

        The canonical renderer's voxels are then only the mask's, and :meth:`decode_volume`
        returns zero outside it (resampled to the decoding grid)."""
        self.field.set_support(mask)

    def support_at(self, resolution: int) -> torch.Tensor | None:
        """The support as a ``[r, r, r]`` bool grid at ``resolution`` (None without one)."""
        return self.field.support_at(resolution)

    def invalidate_cache(self) -> None:
        """Drop the cached feature grid (frees its memory; the next decode rebuilds it)."""
        self.field.invalidate_cache()

    # ------------------------------------------------------------------ conditioning
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Deformation encoding: images [B, D, D] → dict(z, mu, logvar), each [B, zdim]."""
        return self.deformation_encoder(images)

    def conditioned_queries(self, z: torch.Tensor) -> torch.Tensor:
        """Structure queries after the decoder blocks: z [B, zdim] → [B, N, C]."""
        return self.structure_queries(self.deformation_tokens(z))

    def _table(self, conditioned: torch.Tensor) -> torch.Tensor:
        """Conditioned queries [B, N, C] → per-block table [B, n, n, n, T] (axes z, y, x)."""
        n = self.config.blocks_per_axis
        t = self.density_head.table(conditioned)
        return t.reshape(t.shape[0], n, n, n, t.shape[-1])

    def query_table(self, z: torch.Tensor) -> torch.Tensor:
        """Per-block table read by ``GetQuery``: z [B, zdim] → [B, n, n, n, T]."""
        return self._table(self.conditioned_queries(z))

    # ------------------------------------------------------------------ training forward
    def _pose(self, images: torch.Tensor, rotations: torch.Tensor | None,
              shifts_px: torch.Tensor | None, pose_source: str) -> tuple:
        """The pose to render with and the encoder's prediction: ``(R, t, R̂, t̂)``, the last
        two None without an orientation encoder."""
        pred_r = pred_t = None
        if self.orientation_encoder is not None and pose_source != "given":
            pred_r, pred_t = self.orientation_encoder(images)
        if pose_source == "predicted" or (pose_source == "auto" and pred_r is not None):
            if pred_r is None:
                raise ValueError("pose_source='predicted' needs use_orientation_encoder=True")
            return pred_r, pred_t, pred_r, pred_t
        if pose_source in ("auto", "given"):
            if rotations is None:
                raise ValueError("rotations are required without an orientation encoder")
            return rotations, shifts_px, pred_r, pred_t
        raise ValueError(f"unknown pose_source {pose_source!r}")

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
            :func:`~cryoformer.model.pose_loss.pose_loss` against the given pose), else the
            given pose.

        Returns
        -------
        dict
            ``pred_images`` [B, D, D]; ``z``, ``mu`` [B, zdim]; ``logvar`` [B, zdim] or None;
            ``rotations`` [B, 3, 3] and ``shifts_px`` [B, 2] or None (pose used);
            ``pred_rotations`` [B, 3, 3], ``pred_shifts_px`` [B, 2] (None without encoder).
        """
        enc = self.encode(images)
        rot, shifts, pred_r, pred_t = self._pose(images, rotations, shifts_px, pose_source)
        table = self.query_table(enc["z"])  # [B, n, n, n, T]
        sites = self.field.restrict(self.renderer.sites(rot))
        density = self.field(self.density_head, table, sites)  # [B, S]
        pred = self.renderer(density, sites, rot, shifts, ctf)
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
        Tensor [D, D, D] or [B, D, D, D], float32, axes ``[z, y, x]``, on the model's device;
        zero outside the support.
        """
        z, single = self._as_latent(z)
        vol = self.field.volume(self.density_head, self.query_table(z), int(D or self.box_size))
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
            Per-voxel softmax weights of eq. 5 over the ``K`` spatial tokens (zero outside
            the support); None for the no-RSCA ablation, which has no attention.
        """
        z, single = self._as_latent(z)
        n = self.config.blocks_per_axis
        q = self.conditioned_queries(z)  # [B, N, C]
        wv = self.field.attention_weights(self.density_head, self._table(q),
                                          int(D or self.box_size))
        qv = q.reshape(z.shape[0], n, n, n, -1)
        if single:
            return qv[0], (None if wv is None else wv[0])
        return qv, wv
