"""Loss terms of the encoders: the pose regulariser (paper eq. 2) and the KL term."""

from __future__ import annotations

import torch


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


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) ‖ N(0, I))`` summed over latent dims, mean over the batch.

    Parameters
    ----------
    mu, logvar : Tensor [B, zdim]

    Returns
    -------
    Tensor []
    """
    return (-0.5 * (1.0 + logvar - mu * mu - logvar.exp()).sum(dim=-1)).mean()
