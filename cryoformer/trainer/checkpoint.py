"""Checkpoints: atomic writes, ``weights_only`` reads, RNG state capture.

A checkpoint is a dict of tensors and plain containers only, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs on load)::

    format          int, CHECKPOINT_FORMAT
    model           state_dict of the CryoFormer (unwrapped from DDP)
    optimizer       AdamW state_dict
    epoch           int, 1-based epoch the position refers to
    step            int, optimiser steps taken in total
    batch_in_epoch  int, global batches of ``epoch`` already trained (sampler position)
    phase           "pretrain" | "train"
    epoch_complete  bool, ``batch_in_epoch`` covers the whole epoch
    rng             dict(torch=ByteTensor, cuda=[ByteTensor] | None, numpy=dict, python=list)
    train_config    TrainConfig.to_dict(); model_config ModelConfig.to_dict()
    data            dict(image_scale, original_box, box_size, pixel_size_angstrom, n_particles)
    elapsed_s       float, wall-clock seconds trained so far (over all resumes)
    last_epoch_written, output_epoch  int, last epoch with outputs; the one this file is of (-1: none)
    validation      list of held-out loss rows (validation.ValidationHistory)
    support         [D, D, D] bool support mask, when the density is trained under one
    current_rotations, current_shifts_px  with --pose-search: the current poses (box D₀)
    run_id, data_fingerprint  the run's identity; sizes and hashes of its inputs

The run-state entries are written and read by :class:`~cryoformer.trainer.state.RunState`.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any

import numpy as np
import torch

from cryoformer.errors import InputError
from cryoformer.io.atomic import atomic_open
from cryoformer.io.guard import require_free_space

CHECKPOINT_FORMAT = 1


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy's global generator and ``random``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        # random.getstate() = (version, tuple of 625 ints, gauss_next); lists survive weights_only.
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA state only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, then rename).

    A crash or a second Ctrl-C during the write leaves the previous file intact. The state is
    serialised in memory first: torch's zip writer reports a full disk as an opaque
    "unexpected pos" error, where a plain write raises ENOSPC, which is reported as one line
    naming the checkpoint.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    require_free_space(path, data.nbytes)
    with atomic_open(path, "wb", suffix=".pt") as handle:
        handle.write(data)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises
    ------
    InputError
        Missing, unreadable or of an unknown format.
    """
    if not os.path.isfile(path):
        raise InputError(path, None, "checkpoint does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, foreign pickle refused by weights_only, ...
        raise InputError(path, None, f"not a readable cryoformer checkpoint ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "format", f"not a cryoformer checkpoint of format {CHECKPOINT_FORMAT}")
    return state
