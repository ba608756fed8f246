"""Held-out images: which epoch to trust when the model starts fitting the noise.

At the SNR of real particles (~0.1) a decoder with a hash table's capacity, trained for long
enough on a modest number of images, fits their noise: the training loss keeps falling while
the maps get worse against the truth (docs/benchmarks.md: on the AdK benchmark the per-state
FSC-0.5 went 7.3 Å → 9.7 Å → 17.6 Å from epoch 7 to 15 to 27). Because both encoders are
amortised, an image never trained on still gets a latent in one forward pass, so the image loss
on a fixed held-out set is an unbiased estimate of how well the model predicts *new* images of
the same specimen — as long as nothing about those images was fitted: they are scored at
their *input* poses even when ``--pose-search`` refines every particle's pose (a search on the
held-out images themselves would pull their loss down epoch after epoch). That is the number
tracked here:

- :func:`split_heldout` draws the held-out rows once, from the seed (same on every rank and on
  resume); training batches never contain them, but every output (latents, refined poses)
  still covers all particles.
- :func:`heldout_loss` is the mean per-image MSE (the training objective, eq. 7) on those
  images, at the given poses — the predicted ones when the orientation encoder is trained, the
  searched ones with ``pose_search``.
- :class:`ValidationHistory` keeps one row per output epoch, in the checkpoint (so a resumed run
  continues it) and in ``RUN/validation.json``, whose ``best_epoch`` is what
  :func:`~cryoformer.trainer.run_dir.load_run` loads by default.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np
import torch

from cryoformer.io.atomic import atomic_open

from .data import ParticleData, make_loader
from cryoformer.progress import OFF, Progress, resolve_style

VALIDATION_NAME = "validation.json"
# Held-out images per forward call, at most: no gradients, so a few training batches' worth
# fits wherever a training step does.
VAL_BATCH = 64
# Fewer held-out images than this would choose the epoch on the noise of a handful of images:
# small runs (tutorial toys, tests) then hold none out and use the latest epoch.
MIN_HELDOUT = 20


def heldout_count(n: int, fraction: float, maximum: int) -> int:
    """Number of held-out images for ``n`` particles: ``round(fraction·n)``, at most
    ``maximum`` and leaving at least one image to train on; 0 when ``fraction`` is 0 or that
    would be fewer than :data:`MIN_HELDOUT` images."""
    m = int(min(round(fraction * n), maximum, n - 1)) if fraction > 0 else 0
    return m if m >= MIN_HELDOUT else 0


def split_heldout(n: int, fraction: float, maximum: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split subset rows ``0..n-1`` into training and held-out rows.

    Returns
    -------
    train_rows, heldout_rows : np.ndarray [n - m], [m] int64, both sorted.
    """
    m = heldout_count(n, fraction, maximum)
    held = np.sort(np.random.default_rng([seed, 11]).choice(n, size=m, replace=False)).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64), held


def heldout_loss(model, data: ParticleData, rows: np.ndarray, device: torch.device,
                 predicted_poses: bool, amp: bool = False, batch_size: int = VAL_BATCH,
                 progress=OFF) -> float:
    """Mean per-image MSE of the model's predictions of the held-out images (the mean of
    :func:`heldout_losses`, same parameters; 0 for no image)."""
    losses = heldout_losses(model, data, rows, device, predicted_poses, amp, batch_size, progress)
    return float(losses.mean()) if losses.size else 0.0


@torch.no_grad()
def heldout_losses(model, data: ParticleData, rows: np.ndarray, device: torch.device,
                   predicted_poses: bool, amp: bool = False, batch_size: int = VAL_BATCH,
                   progress=OFF) -> np.ndarray:
    """Per-image MSE of the model's predictions of the held-out images.

    Parameters
    ----------
    model : CryoFormer
        Unwrapped model; its train/eval mode is restored afterwards.
    data : ParticleData
    rows : np.ndarray [m] int64
        Subset rows of the held-out images.
    device : torch.device
    predicted_poses : bool
        Render at the orientation encoder's poses (``--refine-poses``) instead of the input ones.
    amp : bool
        bf16 autocast (CUDA only), as in training.
    batch_size : int
        Images per forward call.
    progress : bool or str
        A style of :mod:`cryoformer.progress`, or a bool (True: bars on a terminal, plain lines elsewhere).

    Returns
    -------
    np.ndarray
        ``[m]`` float64, the mean per-pixel squared error of each image, in the order of
        ``rows`` (units of the normalised images²).
    """
    was_training = model.training
    model.eval()
    losses = np.empty(rows.size, dtype=np.float64)
    done = 0
    batches = [rows[i:i + batch_size] for i in range(0, rows.size, batch_size)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    bar = Progress(len(batches), "held-out", resolve_style(progress), unit="batch")
    try:
        for batch in make_loader(data, batches, 0):
            images = batch["images"].to(device)
            bar.update(1, images=images.shape[0])
            ctf = batch["ctf"].to(device) if "ctf" in batch else None
            with autocast:
                out = model(images, batch["rotations"].to(device), batch["shifts_px"].to(device), ctf,
                            pose_source="predicted" if predicted_poses else "given")
            err = ((out["pred_images"].float() - images) ** 2).mean(dim=(-2, -1))  # [b]
            losses[done:done + err.numel()] = err.double().cpu().numpy()
            done += int(err.numel())
    finally:
        bar.close()
        model.train(was_training)
    return losses


class ValidationHistory:
    """Held-out loss per output epoch and the best epoch so far.

    Rows are ``{"epoch", "step", "elapsed_s", "heldout_mse", "epoch_complete"}``; an epoch
    re-evaluated (a resumed partial epoch) replaces its earlier row.
    """

    def __init__(self, rows: Optional[list[dict[str, Any]]] = None, n_heldout: int = 0) -> None:
        self.rows = [dict(r) for r in (rows or [])]
        self.n_heldout = n_heldout

    def add(self, epoch: int, step: int, elapsed_s: float, mse: float, complete: bool) -> None:
        self.rows = [r for r in self.rows if r["epoch"] != epoch]
        self.rows.append({"epoch": int(epoch), "step": int(step), "elapsed_s": float(elapsed_s),
                          "heldout_mse": float(mse), "epoch_complete": bool(complete)})

    def best_epoch(self, up_to_elapsed_s: Optional[float] = None) -> Optional[int]:
        """Epoch with the lowest held-out MSE (the earliest on ties), optionally among those
        written within ``up_to_elapsed_s`` seconds of training; None without rows."""
        rows = [r for r in self.rows if math.isfinite(r["heldout_mse"])
                and (up_to_elapsed_s is None or r["elapsed_s"] <= up_to_elapsed_s)]
        if not rows:
            return None
        return int(min(rows, key=lambda r: (r["heldout_mse"], r["epoch"]))["epoch"])

    def epochs_since_best(self) -> int:
        best = self.best_epoch()
        if best is None:
            return 0
        return sum(1 for r in self.rows if r["epoch"] > best)

    def to_dict(self) -> dict[str, Any]:
        return {"n_heldout": self.n_heldout, "best_epoch": self.best_epoch(), "history": self.rows}

    def write(self, run_dir: str) -> None:
        """``RUN/validation.json``, atomically."""
        with atomic_open(os.path.join(run_dir, VALIDATION_NAME), "w") as handle:
            json.dump(self.to_dict(), handle, indent=1)


def read_validation(run_dir: str) -> Optional[dict[str, Any]]:
    """``RUN/validation.json`` as a dict, or None when the run held out no images."""
    path = os.path.join(run_dir, VALIDATION_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None  # a damaged summary must not make the run unreadable; load_run falls back
