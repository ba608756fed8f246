"""Orientation and deformation image encoders (paper §3.2).

Both are cryoDRGN-style MLPs on the flattened image (paper §4.2: 10 hidden layers × 128,
ReLU). Input preparation, shared by both (:func:`prepare_encoder_input`):

1. **mask**: pixels outside the inscribed circle (radius ``D/2`` around ``D//2``) are set to
   zero — they hold only noise and box-edge artefacts, never particle signal;
2. **normalise** (``"per_image"``, default): subtract the mean and divide by the standard
   deviation of the pixels inside the circle, per image. Datasets come in arbitrary grey
   units; this makes the encoders see unit-variance input whatever the detector, dose or
   earlier scaling, with no dataset statistic to store in the checkpoint. ``"none"`` leaves
   the masked image as given (the caller normalises).
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.rotations import sixd_to_matrix


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


class _ResidualLayer(nn.Module):
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
        return h + torch.relu(self.linear(h))


def mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int) -> nn.Sequential:
    """``n_hidden`` hidden layers of width ``hidden`` (ReLU; residual after the first), then a
    linear output layer. Same parameter count as the paper's plain 10 × 128 MLP."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    layers += [_ResidualLayer(hidden) for _ in range(n_hidden - 1)]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


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
        See :func:`prepare_encoder_input`.
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


def pose_loss(rotations: torch.Tensor, shifts_px: torch.Tensor, rotations0: torch.Tensor,
              shifts0_px: torch.Tensor, reduction: str = "mean",
              eps: float = 1e-8) -> torch.Tensor:
    """Pose regulariser of paper eq. 2: ``(1/9)‖R̂−R₀‖₂ + (1/2)‖t̂−t₀‖₁`` per image.

    ``‖·‖₂`` of a matrix is the Frobenius norm, **not** squared, exactly as printed;
    ``eps`` under the square root keeps its gradient finite at ``R̂ = R₀``.

    Parameters
    ----------
    rotations, rotations0 : Tensor [B, 3, 3]
        Predicted and initial (given) rotations.
    shifts_px, shifts0_px : Tensor [B, 2]
        Predicted and initial shifts, pixels.
    reduction : {"mean", "sum", "none"}
        The paper sums over images; ``"mean"`` (default) keeps the weight ``λ`` independent
        of the batch size, matching the mean-squared image loss (docs/conventions.md, "The model").

    Returns
    -------
    Tensor [] (or [B] for ``"none"``)
    """
    rot = torch.sqrt(((rotations - rotations0) ** 2).sum(dim=(-2, -1)) + eps) / 9.0  # [B]
    trans = (shifts_px - shifts0_px).abs().sum(dim=-1) / 2.0  # [B]
    per_image = rot + trans
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    if reduction == "none":
        return per_image
    raise ValueError(f"unknown reduction {reduction!r}")


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
        (``z = mu`` in eval mode); the KL term is :func:`kl_divergence`.
    normalisation : str
        See :func:`prepare_encoder_input`.
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


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) ‖ N(0, I))`` summed over latent dims, mean over the batch."""
    return (-0.5 * (1.0 + logvar - mu * mu - logvar.exp()).sum(dim=-1)).mean()


class DeformationTokens(nn.Module):
    """Linear map from the latent ``z`` to the deformation feature ``F_D`` (M tokens × C).

    Lives on the decoder side: decoding a volume needs only ``z`` (paper §3.2 footnote).
    """

    def __init__(self, zdim: int, n_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.linear = nn.Linear(zdim, n_tokens * token_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` [B, zdim] → ``F_D`` [B, M, C]."""
        return self.linear(z).reshape(z.shape[0], self.n_tokens, self.token_dim)
