"""The pieces of one optimisation step: the loss module DDP wraps, the stop flag, the
per-step seed and the running loss accumulator (used by :mod:`.loop`)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from cryoformer.model import CryoFormer, kl_divergence, pose_loss

from .config import TrainConfig


class LossModule(nn.Module):
    """Model + loss, so DistributedDataParallel wraps (and syncs) the whole step.

    ``forward(batch, phase)`` returns ``dict(loss, mse, pose_loss, kl)`` (0-d tensors; terms
    that do not apply are 0). ``phase`` is ``"pretrain"`` (pose loss alone), ``"warmup"`` (the
    image loss at the input poses, the orientation encoder out of the graph) or ``"train"``.
    """

    def __init__(self, model: CryoFormer, config: TrainConfig) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(self, batch: dict[str, torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
        m, cfg = self.model, self.config
        images, rot0, t0 = batch["images"], batch["rotations"], batch["shifts_px"]
        zero = images.new_zeros(())
        if phase == "pretrain":  # pose-only: no rendering, the cheap first stage
            r, t = m.orientation_encoder(images)
            lp = pose_loss(r.float(), t.float(), rot0, t0)
            return {"loss": lp, "mse": zero, "pose_loss": lp, "kl": zero}
        joint = cfg.refinement.refine_poses and phase != "warmup"
        out = m(images, rot0, t0, batch.get("ctf"), pose_source="auto" if joint else "given")
        mse = ((out["pred_images"].float() - images) ** 2).mean()
        loss, lp, kl = mse, zero, zero
        if joint:
            lp = pose_loss(out["pred_rotations"].float(), out["pred_shifts_px"].float(), rot0, t0)
            loss = loss + cfg.refinement.pose_weight * lp
        if out["logvar"] is not None:
            kl = kl_divergence(out["mu"].float(), out["logvar"].float())
            loss = loss + cfg.optimisation.kl_weight * kl / images.shape[-1] ** 2  # per pixel, like the MSE
        return {"loss": loss, "mse": mse, "pose_loss": lp, "kl": kl}


class StopFlag:
    """Ctrl-C / SIGTERM → flag (main thread only); a second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.reason == "interrupted" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = "interrupted"

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.default_rng([seed, rank, step]).integers(2 ** 62))


class LossAccumulator:
    """Image-weighted sums of loss terms and the wall time since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "mse": 0.0, "pose_loss": 0.0, "kl": 0.0}
        self.images, self.t0 = 0, time.monotonic()

    def add(self, terms: dict[str, float], n: int) -> None:
        for k in self.sums:
            self.sums[k] += terms[k] * n
        self.images += n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.images, 1) for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.images / max(time.monotonic() - self.t0, 1e-9)
