"""The deformation encoder (paper §3.2): image → conformational latent ``z``.

``z`` becomes the deformation tokens ``F_D`` on the decoder side
(:class:`~cryoformer.model.structure_queries.DeformationTokens`); the KL term of the
variational form is :func:`~cryoformer.model.pose_loss.kl_divergence`.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import circular_mask, mlp, prepare_encoder_input


class DeformationEncoder(nn.Module):
    """Image → conformational latent ``z`` (paper §3.2), optionally variational.

    Parameters
    ----------
    box_size : int
    zdim : int
        Latent dimension (paper: 8).
    hidden, n_hidden : int
        MLP width and depth (paper: 128, 10).
    variational : bool
        Output ``(mu, logvar)`` and sample ``z = mu + exp(logvar/2)·ε`` in training
        (``z = mu`` in eval mode).
    normalisation : str
        See :func:`~cryoformer.model.mlp.prepare_encoder_input`.
    """

    def __init__(self, box_size: int, zdim: int = 8, hidden: int = 128, n_hidden: int = 10,
                 variational: bool = False, normalisation: str = "per_image") -> None:
        super().__init__()
        self.zdim = zdim
        self.variational = variational
        self.normalisation = normalisation
        self.register_buffer("mask", circular_mask(box_size), persistent=False)
        self.net = mlp(box_size * box_size, hidden, n_hidden, 2 * zdim if variational else zdim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Encode images.

        Parameters
        ----------
        images : Tensor [B, D, D]

        Returns
        -------
        dict
            ``z`` [B, zdim]; ``mu`` [B, zdim] (= ``z`` when not variational); ``logvar``
            [B, zdim] or None.
        """
        out = self.net(prepare_encoder_input(images, self.mask, self.normalisation))
        if not self.variational:
            return {"z": out, "mu": out, "logvar": None}
        mu, logvar = out[:, : self.zdim], out[:, self.zdim:]
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterisation
        else:
            z = mu
        return {"z": z, "mu": mu, "logvar": logvar}
