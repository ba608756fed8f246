"""Files of a run directory: names, ``config.yaml``, per-epoch latents and poses.

Layout (rank 0 writes everything, each file atomically)::

    RUN/config.yaml                 version, command line, TrainConfig, ModelConfig, data
    RUN/particle_indices.npy        [N] int64 rows of the original stack (the --ind subset)
    RUN/run.log                     plain-text record: start-up summary per start/resume, one
                                    line per epoch and pass, how each piece ended (see runlog)
    RUN/log.csv                     losses, lr, images/s, elapsed (see trainlog)
    RUN/pose_errors.csv             with --gt-poses: errors of input / refined poses
    RUN/validation.json             held-out image loss per epoch and the best epoch
    RUN/heldout_indices.npy         rows of the original stack held out of training
    RUN/checkpoints/epoch_XXX.pt    after epoch XXX (1-based; 000 = after pose pre-training)
    RUN/checkpoints/last.pt         latest state, also written on Ctrl-C / SIGTERM
    RUN/latents/epoch_XXX.npy       [N, zdim] float32 mean latents, particle order of the subset
    RUN/poses/epoch_XXX.pkl         with --refine-poses: refined poses (cryoDRGN .pkl, box D₀)
    RUN/tensorboard/                TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import uuid
from typing import Any, Optional

import numpy as np
import yaml

from cryoformer import __version__
from cryoformer.errors import InputError
from cryoformer.io.atomic import atomic_open, atomic_path
from cryoformer.io.cryodrgn import write_poses_pkl
from cryoformer.metadata import Poses

CONFIG_NAME = "config.yaml"
INDICES_NAME = "particle_indices.npy"
# Rows of the original stack held out of training (cryoformer.trainer.validation).
HELDOUT_NAME = "heldout_indices.npy"
CHECKPOINT_DIR = "checkpoints"
LATENT_DIR = "latents"
POSE_DIR = "poses"
# Per-image loss of the held-out images after each epoch, in the order of HELDOUT_NAME.
HELDOUT_LOSS_DIR = "heldout_loss"
LAST_NAME = "last.pt"

CONTRAST_NOTE = ("images were multiplied by -1 before training (default; RELION/cryoSPARC "
                 "particles, i.e. images = -(projection * CTF)); --uninvert-data trains on the "
                 "images as they are (cryoDRGN convention: images = projection * CTF)")


# Everything ``train`` writes in a run directory (and the analyses made of it), relative names:
# what ``--force`` removes before a run starts again, and nothing else.
RUN_ENTRIES = (CONFIG_NAME, INDICES_NAME, HELDOUT_NAME, "run.log", "log.csv", "pose_errors.csv",
               "validation.json", CHECKPOINT_DIR, LATENT_DIR, POSE_DIR, HELDOUT_LOSS_DIR, "tensorboard")
DERIVED_PATTERNS = ("analysis", "analysis.*", "evaluation", "evaluation.*")


def new_run_id() -> str:
    """A fresh identity for a run (written in config.yaml and every checkpoint)."""
    return uuid.uuid4().hex


def existing_run_entries(run_dir: str) -> list[str]:
    """Paths in ``run_dir`` that a training run (or an analysis of one) has written."""
    found = [os.path.join(run_dir, n) for n in RUN_ENTRIES if os.path.lexists(os.path.join(run_dir, n))]
    for pattern in DERIVED_PATTERNS:
        found += sorted(glob.glob(os.path.join(glob.escape(run_dir), pattern)))
    return found


def has_checkpoint(run_dir: str) -> bool:
    """True when ``run_dir`` holds ``last.pt`` or any epoch checkpoint."""
    ckpt = os.path.join(run_dir, CHECKPOINT_DIR)
    return os.path.isfile(os.path.join(ckpt, LAST_NAME)) or bool(glob.glob(os.path.join(glob.escape(ckpt), "epoch_*.pt")))


def clear_run(run_dir: str) -> None:
    """Remove what :func:`existing_run_entries` lists (the caller checked it may)."""
    for path in existing_run_entries(run_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def resume_checkpoint(run_dir: str) -> str:
    """``last.pt`` of ``run_dir``, or an InputError that says what to do instead."""
    last = last_checkpoint(run_dir)
    if os.path.isfile(last):
        return last
    if not os.path.isdir(run_dir):
        raise InputError(run_dir, "--resume", "run directory does not exist; start a run there "
                         "without --resume")
    if is_run_dir(run_dir):
        raise InputError(run_dir, "--resume", "this run has no checkpoint yet (it stopped before "
                         "the first was written); start it again without --resume, which "
                         "replaces that partial start")
    raise InputError(run_dir, "--resume", "is not a training run (no config.yaml or checkpoints/); "
                     "start one there without --resume")


def read_config_yaml(run_dir: str) -> Optional[dict[str, Any]]:
    """``RUN/config.yaml`` as a dict (None when absent); InputError when unreadable."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(path, None, f"is not a readable run record ({first}); restore it or "
                         "start a new run in another directory") from None
    if not isinstance(doc, dict):
        raise InputError(path, None, "is not a readable run record (expected a mapping); "
                         "restore it or start a new run in another directory")
    return doc


def epoch_file(run_dir: str, kind: str, epoch: int) -> str:
    """Path of a per-epoch file: ``kind`` in {"checkpoints", "latents", "poses", "heldout_loss"}."""
    ext = {CHECKPOINT_DIR: ".pt", LATENT_DIR: ".npy", POSE_DIR: ".pkl", HELDOUT_LOSS_DIR: ".npy"}[kind]
    return os.path.join(run_dir, kind, f"epoch_{epoch:03d}{ext}")


def last_checkpoint(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR, LAST_NAME)


def is_run_dir(run_dir: str) -> bool:
    """True when ``run_dir`` holds a training run (its config or any checkpoint)."""
    return (os.path.isfile(os.path.join(run_dir, CONFIG_NAME))
            or os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)))


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def data_summary(data, config) -> dict[str, Any]:
    """The data section of ``config.yaml`` / checkpoints (plain types only)."""
    opts = config.data
    return {
        "particles": opts.particles, "poses": opts.poses or opts.particles,
        "ctf": opts.ctf or (opts.particles if opts.particles.lower().endswith((".star", ".cs")) else None),
        "datadir": opts.datadir, "ind": opts.ind, "gt_poses": opts.gt_poses,
        "n_particles": len(data), "original_box": int(data.original_box),
        "box_size": int(data.box_size),
        "pixel_size_angstrom": None if data.pixel_size_angstrom is None else float(data.pixel_size_angstrom),
        "training_pixel_size_angstrom": (None if data.training_pixel_size_angstrom is None
                                         else float(data.training_pixel_size_angstrom)),
        "image_scale": float(data.image_scale), "invert_data": bool(data.invert),
        "has_ctf": data.ctf is not None,
    }


def write_config_yaml(run_dir: str, train_config, model_config, data_info: dict[str, Any],
                      command_line: Optional[str], world_size: int, resumed: bool,
                      run_id: Optional[str] = None,
                      data_fingerprint: Optional[dict[str, Any]] = None) -> None:
    """Write ``RUN/config.yaml``; on resume keep the original and append to ``resumes``."""
    path = os.path.join(run_dir, CONFIG_NAME)
    previous: dict[str, Any] = {}
    if resumed:
        previous = read_config_yaml(run_dir) or {}
    doc = previous if previous else {
        "cryoformer_version": __version__,
        "run_id": run_id,
        "created": _now(),
        "command": command_line,
        "world_size": world_size,
        "train_config": train_config.to_dict(),
        "model_config": model_config.to_dict(),
        "data": data_info,
        "contrast": CONTRAST_NOTE if data_info["invert_data"] else
        "images were used as they are (--uninvert-data: cryoDRGN convention, projection * CTF)",
        # Size and sampled hash of every input file (cryoformer.io.fingerprint): a resume
        # refuses data that changed under the same paths.
        "data_fingerprint": data_fingerprint,
    }
    if resumed:
        doc.setdefault("resumes", []).append({
            "time": _now(), "cryoformer_version": __version__, "command": command_line,
            "world_size": world_size, "train_config": train_config.to_dict()})
    with atomic_open(path, "w") as handle:
        yaml.safe_dump(doc, handle, sort_keys=False, allow_unicode=True)


def write_indices(run_dir: str, indices: np.ndarray, name: str = INDICES_NAME) -> None:
    with atomic_open(os.path.join(run_dir, name), "wb") as handle:
        np.save(handle, np.asarray(indices, dtype=np.int64))


def _write_epoch_array(run_dir: str, kind: str, epoch: int, array: np.ndarray) -> str:
    """An epoch's float32 ``.npy`` under ``run_dir/kind/``, written atomically."""
    path = epoch_file(run_dir, kind, epoch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
    return path


def write_latents(run_dir: str, epoch: int, z: np.ndarray) -> str:
    """``[N, zdim]`` latents of an epoch."""
    return _write_epoch_array(run_dir, LATENT_DIR, epoch, z)


def write_heldout_losses(run_dir: str, epoch: int, losses: np.ndarray) -> str:
    """``[m]`` float32 per-image held-out MSE of an epoch (order of ``heldout_indices.npy``)."""
    return _write_epoch_array(run_dir, HELDOUT_LOSS_DIR, epoch, losses)


def write_refined_poses(run_dir: str, epoch: int, rotations: np.ndarray, shifts_px: np.ndarray,
                        original_box: int) -> str:
    """Refined poses as a cryoDRGN ``.pkl`` (shifts already in pixels of ``original_box``)."""
    path = epoch_file(run_dir, POSE_DIR, epoch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_poses_pkl(Poses(rotations, shifts_px, original_box), path)
    return path


def copy_atomic(src: str, dst: str) -> None:
    """Copy ``src`` onto ``dst`` so that ``dst`` is never seen half-written."""
    with atomic_path(dst, suffix=os.path.splitext(dst)[1]) as tmp:
        shutil.copyfile(src, tmp)
