"""The real-domain implicit feature volume ``V_Θ`` (paper §3.3, eq. 3).

``F_S(x) = V_Θ(x; Θ)``: a multi-resolution hash grid (tcnn semantics, see
:mod:`cryoformer.model.hash_grid`) followed by a one-hidden-layer MLP (width 64, paper §4.2)
whose output is split into ``K`` spatial tokens of width ``C`` — the keys/values of the
region-wise spatial cross-attention (eq. 5).

``F_S`` does not depend on the image, so a renderer may evaluate it once on a fixed grid and
share it across a batch, and the decoder may cache it across latents (docs/conventions.md, "The model").
"""

from __future__ import annotations

import torch
from torch import nn

from .hash_grid import HashGridConfig, HashGridEncoding
from .coordinates import grid_points_unit


class FeatureVolume(nn.Module):
    """Hash-grid feature volume producing ``K`` tokens of width ``C`` per point.

    Parameters
    ----------
    hash_config : HashGridConfig
        With ``finest_resolution`` set (normally the box size ``D``).
    n_tokens : int
        ``K``.
    token_dim : int
        ``C``.
    hidden : int
        Hidden width of the MLP (paper: 64).
    backend : str
        Hash-grid backend (``"auto"``, ``"torch"``, ``"triton"``, ``"tinycudann"``).
    """

    def __init__(self, hash_config: HashGridConfig, n_tokens: int, token_dim: int,
                 hidden: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.token_dim = token_dim
        self.encoding = HashGridEncoding(hash_config, backend=backend)
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_tokens * token_dim),
        )

    def forward(self, u: torch.Tensor, chunk_size: int = 1 << 18) -> torch.Tensor:
        """Spatial feature tokens at unit-coordinate points.

        Parameters
        ----------
        u : Tensor [..., 3]
            Unit coordinates ``(x, y, z)`` in ``[0, 1]`` (see :mod:`.coordinates`).
        chunk_size : int
            Points per encoding call; bounds the temporary memory of the hash lookup.

        Returns
        -------
        Tensor [..., K, C], float32
        """
        lead = u.shape[:-1]
        flat = u.reshape(-1, 3).float()
        if flat.shape[0] <= chunk_size:
            enc = self.encoding(flat)  # [P, L·F]
        else:
            enc = torch.cat([self.encoding(c) for c in flat.split(chunk_size)], dim=0)
        tokens = self.mlp(enc)  # [P, K·C]
        return tokens.reshape(*lead, self.n_tokens, self.token_dim)

    def on_grid(self, resolution: int, chunk_size: int = 1 << 18) -> torch.Tensor:
        """``F_S`` on every voxel of a ``resolution³`` grid spanning the box.

        Returns
        -------
        Tensor [resolution, resolution, resolution, K, C]
            Axes ``[z, y, x]``; voxel ``i`` at unit coordinate ``i / resolution``.
        """
        dev = next(self.parameters()).device
        pts = grid_points_unit(resolution, device=dev)  # [G³, 3]
        feats = self(pts, chunk_size=chunk_size)  # [G³, K, C]
        return feats.reshape(resolution, resolution, resolution, self.n_tokens, self.token_dim)

    def parameter_version(self) -> tuple:
        """A key that changes whenever a parameter is replaced or modified.

        Storage pointer (``.to()``, re-assignment) and autograd version counter (in-place
        ops, ``load_state_dict``, most optimisers) — plus a float64 fingerprint (sum and sum
        of squares) because some updates bypass the version counter: ``Adam(fused=True)``
        does, as do writes through ``.data``. Costs two reductions over the parameters (about
        a millisecond for the paper's 2^15-entry tables). Used to invalidate cached grids.
        """
        params = list(self.parameters())
        with torch.no_grad():
            flat = [p.reshape(-1) for p in params]
            fingerprint = torch.stack([torch.stack([f.sum(dtype=torch.float64),
                                                    torch.dot(f, f).double()])
                                       for f in flat]).flatten().tolist()
        meta = tuple((p.data_ptr(), p._version, str(p.device)) for p in params)
        return meta + tuple(fingerprint)
