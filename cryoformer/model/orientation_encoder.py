"""The orientation encoder (paper §3.2): image → pose ``(R̂, t̂)``.

Its loss terms are in :mod:`.pose_loss`; input preparation and the MLP in :mod:`.mlp`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.rotations import sixd_to_matrix
from .mlp import circular_mask, mlp, prepare_encoder_input


class OrientationEncoder(nn.Module):
    """Image → pose ``(R̂, t̂)`` through an 8-D orientation feature ``F_O`` (paper §3.2).

    Six numbers are two 3-vectors (S²×S², Zhou et al.) turned into ``R̂`` by Gram–Schmidt
    (:func:`~cryoformer.physics.rotations.sixd_to_matrix`, rows b1, b2, b1×b2), continuous
    unlike Euler angles or quaternions; two numbers are the in-plane shift ``t̂`` in pixels.

    Parameters
    ----------
    box_size : int
    hidden, n_hidden : int
        MLP width and depth (paper: 128, 10).
    normalisation : str
        See :func:`~cryoformer.model.mlp.prepare_encoder_input`.
    """

    def __init__(self, box_size: int, hidden: int = 128, n_hidden: int = 10,
                 normalisation: str = "per_image") -> None:
        super().__init__()
        self.normalisation = normalisation
        self.register_buffer("mask", circular_mask(box_size), persistent=False)
        self.net = mlp(box_size * box_size, hidden, n_hidden, 8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict poses.

        Parameters
        ----------
        images : Tensor [B, D, D]

        Returns
        -------
        rotations : Tensor [B, 3, 3]
        shifts_px : Tensor [B, 2]
            ``(sx, sy)`` in pixels, same convention as the given poses (docs/conventions.md).
        """
        f_o = self.net(prepare_encoder_input(images, self.mask, self.normalisation))  # [B, 8]
        return sixd_to_matrix(f_o[:, :6]), f_o[:, 6:]
