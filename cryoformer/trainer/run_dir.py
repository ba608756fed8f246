"""Read a training run directory back (for analysis, evaluation, export, widgets).

>>> run = load_run("RUN/")               # best epoch by held-out loss (else the latest)
>>> run.latents.shape                    # [N, zdim], particle order of the --ind subset
>>> vol = run.model.decode_volume(run.latents.mean(0))   # [D, D, D], voxel run.pixel_size_angstrom

Weights are read with ``torch.load(..., weights_only=True)``; the layout is described in
:mod:`cryoformer.trainer.outputs`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from cryoformer.errors import InputError
from cryoformer.model import CryoFormer, ModelConfig

from . import outputs
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .validation import read_validation

_EPOCH_RE = re.compile(r"^epoch_(\d{3,})\.pt$")


@dataclass(frozen=True)
class TrainedRun:
    """One epoch of a training run, ready to decode.

    Attributes
    ----------
    model : CryoFormer
        In eval mode, on the requested device.
    model_config : ModelConfig
    train_config : TrainConfig
    epoch : int
        The epoch loaded (0 = after pose pre-training only).
    epoch_complete : bool
        False when the run stopped inside this epoch (``--max-minutes``).
    latents : np.ndarray [N, zdim] float32
        Mean latent of every trained particle, in the order of ``particle_indices``.
    particle_indices : np.ndarray [N] int64
        Rows of the original particle stack (the ``--ind`` subset, else ``arange``).
    box_size : int
        Training box ``D`` in px: the model's box and default decoding size.
    pixel_size_angstrom : float or None
        Å/px at ``box_size``: the voxel size of ``model.decode_volume(z)``.
    original_box_size : int
        Box of the particle stack (px) (``box_size`` differs with ``--box``).
    original_pixel_size_angstrom : float or None
    paths : dict
        Absolute input paths: ``particles``, ``poses``, ``ctf``, ``datadir``, ``ind``,
        ``gt_poses`` (None where not used).
    run_dir : str
    refined_poses_path : str or None
        ``poses/epoch_XXX.pkl`` of this epoch when poses were refined.
    data : dict
        The checkpoint's data summary (image scale, inversion, counts).
    selected_by : str
        Why this epoch was loaded: ``"requested"``, ``"heldout"`` (lowest held-out image
        loss) or ``"latest"``.
    """

    model: CryoFormer
    model_config: ModelConfig
    train_config: TrainConfig
    epoch: int
    epoch_complete: bool
    latents: np.ndarray
    particle_indices: np.ndarray
    box_size: int
    pixel_size_angstrom: Optional[float]
    original_box_size: int
    original_pixel_size_angstrom: Optional[float]
    paths: dict[str, Optional[str]]
    run_dir: str
    refined_poses_path: Optional[str] = None
    data: dict[str, Any] = field(default_factory=dict)
    selected_by: str = "requested"

    @property
    def n_particles(self) -> int:
        return int(self.latents.shape[0])

    def input_files(self) -> list[str]:
        """Every file that reading this run depends on: the run's own files of this epoch and
        the particle data it was trained on. Outputs made from the run must never land on one."""
        run = self.run_dir
        files = [os.path.join(run, outputs.CONFIG_NAME), os.path.join(run, outputs.INDICES_NAME),
                 outputs.epoch_file(run, outputs.CHECKPOINT_DIR, self.epoch),
                 outputs.epoch_file(run, outputs.LATENT_DIR, self.epoch),
                 outputs.last_checkpoint(run)]
        files += [self.refined_poses_path] if self.refined_poses_path else []
        return files + [p for p in self.paths.values() if p]


def _require_run(run_dir: str) -> str:
    run_dir = os.path.abspath(os.fspath(run_dir))
    if not os.path.isdir(run_dir):
        raise InputError(run_dir, None, "run directory does not exist")
    if not outputs.is_run_dir(run_dir):
        raise InputError(run_dir, None, "not a cryoformer training run (no config.yaml or checkpoints/)")
    return run_dir


def _load_array(path: str, what: str) -> np.ndarray:
    """``np.load`` of a run file; a truncated or damaged file is a one-line InputError."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, None, f"{what} file is damaged or truncated ({exc}); restore it "
                         "or choose another --epoch") from None


def list_epochs(run_dir: str) -> list[int]:
    """Epochs of ``run_dir`` that have both a checkpoint and latents, ascending.

    Raises
    ------
    InputError
        ``run_dir`` is not a training run.
    """
    run_dir = _require_run(run_dir)
    ckpt_dir = os.path.join(run_dir, outputs.CHECKPOINT_DIR)
    found = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        m = _EPOCH_RE.match(name)
        if m and os.path.isfile(outputs.epoch_file(run_dir, outputs.LATENT_DIR, int(m.group(1)))):
            found.append(int(m.group(1)))
    return sorted(found)


def resolve_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(None, "--device", str(exc)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device", "cuda requested but torch sees no CUDA device")
    return dev


def best_epoch(run_dir: str) -> Optional[int]:
    """Epoch with the lowest held-out image loss that still has its files, or None (no
    images were held out, or that epoch's checkpoint is gone)."""
    run_dir = _require_run(run_dir)
    summary = read_validation(run_dir)
    best = None if summary is None else summary.get("best_epoch")
    return int(best) if best is not None and int(best) in list_epochs(run_dir) else None


def select_epoch(run_dir: str, epoch: Any = None) -> tuple[int, str]:
    """Resolve an epoch request to ``(epoch, why)``; see :func:`load_run` for ``epoch``.

    Raises
    ------
    InputError
        No finished epoch, or the requested one is missing.
    """
    run_dir = _require_run(run_dir)
    epochs = list_epochs(run_dir)
    if not epochs:
        raise InputError(run_dir, None, "no epoch has finished yet (no checkpoints/epoch_XXX.pt "
                         "with latents/epoch_XXX.npy)")
    if epoch in (None, "best"):
        best = best_epoch(run_dir)
        if best is not None:
            return best, "heldout"
        if epoch == "best":
            raise InputError(run_dir, "epoch", "no held-out loss was recorded (trained with "
                             "--heldout-fraction 0?); pass an epoch number or 'last'")
        return epochs[-1], "latest"
    if epoch == "last":
        return epochs[-1], "latest"
    try:
        epoch = int(epoch)
    except (TypeError, ValueError):
        raise InputError(run_dir, "epoch", f"expected an epoch number, 'best' or 'last', got {epoch!r}") from None
    if epoch not in epochs:
        raise InputError(run_dir, "epoch", f"epoch {epoch} not found; available: "
                         f"{', '.join(str(e) for e in epochs)}")
    return epoch, "requested"


def _load_epoch_model(ckpt_path: str, dev: torch.device) -> tuple[dict[str, Any], CryoFormer]:
    """An epoch checkpoint and its model (eval mode, on ``dev``, inside its support mask)."""
    state = load_checkpoint(ckpt_path, map_location=dev)
    try:
        model = CryoFormer(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        missing = [k for k in ("data", "train_config", "phase", "epoch_complete") if k not in state]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(ckpt_path, None, f"is not a complete cryoformer checkpoint "
                         f"({exc.__class__.__name__}: {first[:200]})") from None
    model.to(dev).eval()
    if state.get("support") is not None:  # the density was trained inside this mask
        model.set_support(state["support"])
    return state, model


def load_run(run_dir: str, epoch: Any = None, device: Any = "cpu") -> TrainedRun:
    """Load the model and latents of one epoch of a training run.

    Parameters
    ----------
    run_dir : str
        Directory written by ``cryoformer train``.
    epoch : int, "best", "last" or None
        Epoch to load (see :func:`list_epochs`). None (default): the epoch with the lowest
        held-out image loss (``RUN/validation.json``) when images were held out — later epochs
        may have fitted the noise — else the latest. ``"best"`` insists on the former.
    device : str or torch.device
        Where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``).

    Raises
    ------
    InputError
        Not a run directory, no finished epoch yet, a missing epoch, or unreadable files.
    """
    run_dir = _require_run(run_dir)
    epoch, why = select_epoch(run_dir, epoch)
    dev = resolve_device(device)
    state, model = _load_epoch_model(outputs.epoch_file(run_dir, outputs.CHECKPOINT_DIR, epoch), dev)
    model_config = model.config
    latent_path = outputs.epoch_file(run_dir, outputs.LATENT_DIR, epoch)
    latents = _load_array(latent_path, "latents")
    indices_path = os.path.join(run_dir, outputs.INDICES_NAME)
    if os.path.isfile(indices_path):
        indices = _load_array(indices_path, "particle indices")
    else:
        indices = np.arange(latents.shape[0], dtype=np.int64)
    if latents.ndim != 2 or latents.shape[1] != model_config.zdim or latents.shape[0] != indices.shape[0]:
        raise InputError(latent_path, None, f"latents of shape {latents.shape} do not match "
                         f"{indices.shape[0]} particles × zdim {model_config.zdim}")
    data = dict(state["data"])
    poses_path = outputs.epoch_file(run_dir, outputs.POSE_DIR, epoch)
    return TrainedRun(
        model=model, model_config=model_config,
        train_config=TrainConfig.from_dict(state["train_config"]), epoch=int(epoch),
        epoch_complete=bool(state["epoch_complete"]) or state["phase"] == "pretrain",
        latents=latents.astype(np.float32, copy=False), particle_indices=indices.astype(np.int64),
        box_size=int(data["box_size"]), pixel_size_angstrom=data.get("training_pixel_size_angstrom"),
        original_box_size=int(data["original_box"]),
        original_pixel_size_angstrom=data.get("pixel_size_angstrom"),
        paths={k: data.get(k) for k in ("particles", "poses", "ctf", "datadir", "ind", "gt_poses")},
        run_dir=run_dir, refined_poses_path=poses_path if os.path.isfile(poses_path) else None,
        data=data, selected_by=why)
