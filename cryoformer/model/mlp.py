"""Pieces shared by the image encoders: the image mask and normalisation, the residual MLP.

Input preparation (:func:`prepare_encoder_input`), the same for both encoders:

1. **mask**: pixels outside the inscribed circle (radius ``D/2`` around ``D//2``) are set to
   zero — they hold only noise and box-edge artefacts, never particle signal;
2. **normalise** (``"per_image"``, default): subtract the mean and divide by the standard
   deviation of the pixels inside the circle, per image. Datasets come in arbitrary grey
   units; this makes the encoders see unit-variance input whatever the detector, dose or
   earlier scaling, with no dataset statistic to store in the checkpoint. ``"none"`` leaves
   the masked image as given (the caller normalises).

The MLPs are cryoDRGN-style (paper §4.2: 10 hidden layers × 128, ReLU) with residual hidden
layers (docs/architecture.md explains this departure).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_NORMALISATIONS = ("per_image", "none")


def circular_mask(box_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Boolean-valued float mask ``[D, D]``: 1 where ``x² + y² ≤ (D/2)²`` (centre ``D//2``)."""
    c = torch.arange(box_size, device=device, dtype=dtype) - box_size // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 <= (box_size / 2) ** 2).to(dtype)


def prepare_encoder_input(images: torch.Tensor, mask: torch.Tensor,
                          normalisation: str = "per_image", eps: float = 1e-6) -> torch.Tensor:
    """Mask and normalise images for the encoders (see the module docstring).

    Parameters
    ----------
    images : Tensor [B, D, D]
    mask : Tensor [D, D]
        From :func:`circular_mask`.
    normalisation : {"per_image", "none"}

    Returns
    -------
    Tensor [B, D·D]
    """
    x = images.float() * mask  # [B, D, D]
    if normalisation == "per_image":
        n = mask.sum()
        mean = x.sum(dim=(-2, -1), keepdim=True) / n  # [B, 1, 1]
        var = (((x - mean) * mask) ** 2).sum(dim=(-2, -1), keepdim=True) / n
        x = (x - mean) * mask / torch.sqrt(var + eps)
    return x.flatten(1)


class ResidualLayer(nn.Module):
    """``h + ReLU(W h + b)``: a hidden layer of constant width with an identity path.

    A plain stack of ten ReLU layers at PyTorch's default initialisation shrinks the
    differences between inputs by roughly a constant factor per layer, so the last layer sees
    almost the same vector for every image and the latents collapse (measured here: latent
    standard deviation ~1e-5 after three epochs). The identity path (as in cryoDRGN's
    residual MLPs) keeps image-to-image differences, and gradients, alive through the depth.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [..., W] → [..., W]."""
        return h + torch.relu(self.linear(h))


def mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int) -> nn.Sequential:
    """``n_hidden`` hidden layers of width ``hidden`` (ReLU; residual after the first), then a
    linear output layer. Same parameter count as the paper's plain 10 × 128 MLP."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    layers += [ResidualLayer(hidden) for _ in range(n_hidden - 1)]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)
