"""Building a training run, or resuming one: checks, data, model, optimiser and state.

:func:`build_run` does everything that may refuse — options that contradict the run being
resumed, input data changed since it began, a directory that holds another run, images whose
contrast contradicts ``--uninvert-data`` — before anything is written, then (rank 0) writes
the run's header files: ``config.yaml``, the particle and held-out indices. What it returns
is a :class:`Run`, which :mod:`.loop` trains.

Determinism: the model is initialised from ``torch.manual_seed(seed)`` (identical weights on
every rank and in every run) and a resumed run then restores the RNG streams its checkpoint
captured, so a run stopped anywhere and resumed follows the trajectory of one never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from cryoformer.errors import InputError
from cryoformer.io.fingerprint import compare_fingerprints, fingerprint_files
from cryoformer.io.guard import inside
from cryoformer.model import CryoFormer, ModelConfig

from . import outputs
from .checkpoint import load_checkpoint, restore_rng_state
from .config import ModelOptions, TrainConfig
from .data import BatchPlan, ParticleData, check_contrast, load_particle_data
from .distributed import DistInfo
from .state import RunState
from .validation import MIN_HELDOUT, ValidationHistory, split_heldout

logger = logging.getLogger("cryoformer.trainer.loop")  # one logger for the whole training log

ENCODER_GROUP = "orientation_encoder"  # the optimiser group with the joint phase's own rate


@dataclass
class Run:
    """A training run built or resumed by :func:`build_run`.

    Attributes
    ----------
    config : TrainConfig
        As given, with the options that belong to a resumed run taken from it.
    model_config : ModelConfig
    data : ParticleData
        The selected particles at their *input* poses (current poses: ``state.poses``).
    model : CryoFormer
        On the run's device; its support mask is ``state.support``.
    optimizer : torch.optim.AdamW
    plan : BatchPlan
        The training batches (held-out rows excluded).
    heldout_rows : np.ndarray [m] int64
        Subset rows held out of training (empty when none).
    state : RunState
    run_id : str
    data_fingerprint : dict
        Sizes and sampled hashes of the training inputs (:mod:`cryoformer.io.fingerprint`).
    resumed : bool
    contrast_note : str
        The contrast convention trained under and how it was decided (for ``run.log``).
    loaded_from : str or None
        The checkpoint whose weights a new run started from (``--load``).
    """

    config: TrainConfig
    model_config: ModelConfig
    data: ParticleData
    model: CryoFormer
    optimizer: torch.optim.Optimizer
    plan: BatchPlan
    heldout_rows: np.ndarray
    state: RunState
    run_id: str
    data_fingerprint: dict[str, Any]
    resumed: bool
    contrast_note: str = ""
    loaded_from: Optional[str] = None


def build_run(config: TrainConfig, model_config: Optional[ModelConfig], info: DistInfo, resume: bool,
              command_line: Optional[str], force: bool = False) -> Run:
    """Check the inputs and build (or resume) the run in ``config.data.outdir``; see
    :func:`~cryoformer.trainer.loop.train` for the arguments.

    Raises
    ------
    InputError
        Anything that stops the run, before any file is written.
    """
    run_dir = config.data.outdir
    checkpoint, run_id, clear_first, loaded = None, outputs.new_run_id(), False, None
    if resume:
        checkpoint, run_id = _open_checkpoint(run_dir, run_id)
        config = _resumed_config(config, checkpoint["train_config"], run_dir)
    else:
        if config.optimisation.load is not None:
            loaded = _open_load_checkpoint(config.optimisation.load, run_dir)
        clear_first = _may_start_over(run_dir, force)
    data = load_particle_data(config)
    # What training reads (the ground-truth poses are only reported, so they are not part of
    # the data fingerprint, but they must survive a restart all the same).
    opts = config.data
    inputs = [opts.particles, opts.poses, opts.ctf, opts.ind, *data.source.files]
    if clear_first:
        _refuse_deleting_inputs(run_dir, inputs + [opts.gt_poses, config.optimisation.load])
    contrast_note = _contrast(data, config, checkpoint is not None, info.is_main)
    fingerprint = fingerprint_files(inputs)
    if checkpoint is not None:
        _refuse_changed_data(checkpoint, fingerprint, run_dir)
        model_config = ModelConfig.from_dict(checkpoint["model_config"])
        data = dataclasses.replace(data, image_scale=float(checkpoint["data"]["image_scale"]))
    if loaded is not None:
        model_config = _loaded_model_config(loaded, model_config, data.box_size, config)
    model_config = _fit_model_config(model_config, data.box_size, config.refinement.refine_poses)
    seed = config.optimisation.seed
    torch.manual_seed(seed)  # identical initial weights on every rank and every run
    model = CryoFormer(model_config).to(info.device)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=config.optimisation.lr,
                                  weight_decay=config.optimisation.weight_decay)
    held = config.heldout
    train_rows, heldout_rows = split_heldout(len(data), held.heldout_fraction, held.heldout_max, seed)
    plan = BatchPlan(len(data), config.optimisation.batch_size, seed, info.rank, info.world,
                     rows=train_rows if heldout_rows.size else None)
    _check_run_options(config, model_config, heldout_rows, len(data))
    if checkpoint is None:
        state = RunState(poses=data.poses, validation=ValidationHistory(n_heldout=int(heldout_rows.size)))
        if loaded is not None:
            state.support = _load_weights(loaded, model, optimizer, config)
    else:
        state = _restore(checkpoint, model, optimizer, data, int(heldout_rows.size))
    run = Run(config, model_config, data, model, optimizer, plan, heldout_rows, state, run_id,
              fingerprint, resumed=checkpoint is not None, contrast_note=contrast_note,
              loaded_from=config.optimisation.load if checkpoint is None else None)
    if info.is_main:
        _write_header(run, command_line, info.world, clear_first)
    return run


def _open_checkpoint(run_dir: str, fresh_id: str) -> tuple[dict[str, Any], str]:
    """``last.pt`` of the run to resume and the run's identity."""
    last = outputs.resume_checkpoint(run_dir)
    checkpoint = load_checkpoint(last)
    recorded = (outputs.read_config_yaml(run_dir) or {}).get("run_id")
    if recorded is not None and checkpoint.get("run_id") != recorded:
        raise InputError(last, "run_id", f"belongs to run {checkpoint.get('run_id') or '(unknown)'}, "
                         f"not to the run recorded in {run_dir}/config.yaml ({recorded}); a "
                         "checkpoint copied from another run cannot continue this one")
    return checkpoint, checkpoint.get("run_id") or recorded or fresh_id


def _resumed_config(config: TrainConfig, saved: dict[str, Any], run_dir: str) -> TrainConfig:
    """``config`` checked against the resumed run's saved one, with the options that belong
    to the run (its held-out split, its support mask) taken from it."""
    bad = config.resume_mismatches(saved)
    if bad:
        raise InputError(None, ", ".join(bad), "differs from the run being resumed "
                         f"({run_dir}); only the schedule, time budget and device may change")
    config = config.resumed_from(saved)
    if config.heldout.early_stop_epochs is not None and config.heldout.heldout_fraction == 0:
        raise InputError(run_dir, "--early-stop", "this run holds out no images (started "
                         "with --heldout-fraction 0 or by an older cryoformer), so it cannot "
                         "stop on a held-out loss")
    return config


def _contrast(data: ParticleData, config: TrainConfig, resumed: bool, is_main: bool) -> str:
    """Check the contrast flag against the images (new runs; refuses a contradiction before
    anything is written: a wrong flag trains a map of inverted sign) and say how it was decided."""
    used = ("images multiplied by -1 (RELION/cryoSPARC convention, the default)" if data.invert
            else "images used as they are (--uninvert-data, cryoDRGN convention)")
    if resumed:
        return f"{used}; checked when the run started"
    if not config.data.check_contrast:
        return f"{used}; not checked (--no-contrast-check)"
    est = check_contrast(data, config.data.particles, config.optimisation.seed)
    undecided = est.invert_data is None
    if is_main:
        logger.info("%s%s", est.summary(), "; too few images or too little signal to check the "
                    "contrast flag" if undecided else "")
    verdict = ("undecided (too few images or too little signal), the flag as given" if undecided
               else "the images agree")
    measured = est.summary().removeprefix("contrast: ")
    return f"{used}; checked on the images: {measured} → {verdict}"


def _open_load_checkpoint(path: str, run_dir: str) -> dict[str, Any]:
    """The checkpoint ``--load`` starts a new run from; refused when it belongs to the run
    in ``run_dir`` (that run continues with ``--resume``)."""
    checkpoint = load_checkpoint(path)
    recorded = (outputs.read_config_yaml(run_dir) or {}).get("run_id") if os.path.isdir(run_dir) else None
    mine = inside(path, run_dir) or (recorded is not None and checkpoint.get("run_id") == recorded)
    if mine:
        raise InputError(path, "--load", f"is a checkpoint of the run in -o {run_dir}; --load "
                         "starts a new run: continue this one with --resume, or write the new "
                         "run to another directory")
    if "model_config" not in checkpoint or "model" not in checkpoint:
        raise InputError(path, "--load", "holds no model weights (model, model_config)")
    return checkpoint


def _loaded_model_config(checkpoint: dict[str, Any], given: Optional[ModelConfig], box_size: int,
                         config: TrainConfig) -> ModelConfig:
    """The architecture of a run started from ``checkpoint``: the checkpoint's, which the
    given one (model options on the command line) and the training box must match."""
    saved = ModelConfig.from_dict(checkpoint["model_config"])
    wanted = given or saved
    if wanted.box_size == box_size:  # (another box is reported below, with the other fields)
        wanted = _fit_model_config(wanted, box_size, config.refinement.refine_poses)
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} here" for k in diff[:3])
        hint = (" (--box sets the training box)" if "box_size" in diff else
                " (--refine-poses must be as when it was trained)" if "use_orientation_encoder" in diff
                else " (leave the model options out to use the checkpoint's)")
        raise InputError(config.optimisation.load, "model_config",
                         f"does not match this run's model: {shown}{hint}")
    return saved


def _is_encoder_parameter(model: CryoFormer) -> list[bool]:
    """For each of ``model.parameters()``, in order: does the orientation encoder own it?"""
    enc = model.orientation_encoder
    owned = set() if enc is None else {id(p) for p in enc.parameters()}
    return [id(p) in owned for p in model.parameters()]


def parameter_groups(model: CryoFormer) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: everything, then (with an orientation encoder) the
    encoder alone, named :data:`ENCODER_GROUP` so the joint phase can give it its own rate."""
    params = list(model.parameters())
    mine = _is_encoder_parameter(model)
    groups = [{"params": [p for p, e in zip(params, mine) if not e]}]
    if any(mine):
        groups.append({"params": [p for p, e in zip(params, mine) if e], "name": ENCODER_GROUP})
    return groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: CryoFormer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, also for a checkpoint written before the encoder
    had a group of its own: its one group listed the parameters in ``model.parameters()``
    order, which is regrouped here (rest first, then the encoder) with their Adam moments."""
    groups = saved["param_groups"]
    if len(groups) == 1 and len(optimizer.param_groups) == 2:
        mine = _is_encoder_parameter(model)
        order = [i for i, e in enumerate(mine) if not e] + [i for i, e in enumerate(mine) if e]
        old_ids = groups[0]["params"]  # saved ids, in model.parameters() order
        state = {new: saved["state"][old_ids[old]] for new, old in enumerate(order)
                 if old_ids[old] in saved["state"]}
        n_rest = len(order) - sum(mine)
        saved = {"state": state, "param_groups": [
            {**groups[0], "params": list(range(n_rest))},
            {**groups[0], "params": list(range(n_rest, len(order))), "name": ENCODER_GROUP}]}
    optimizer.load_state_dict(saved)


def _load_weights(checkpoint: dict[str, Any], model: CryoFormer, optimizer: torch.optim.Optimizer,
                  config: TrainConfig) -> Optional[torch.Tensor]:
    """``--load``: weights and Adam moments from ``checkpoint``; the learning rate and weight
    decay stay this run's. Returns the support mask the weights were trained under (None when
    this run trains without one): the head was never trained outside it."""
    model.load_state_dict(checkpoint["model"])
    load_optimizer_state(optimizer, model, checkpoint["optimizer"])
    for group in optimizer.param_groups:  # load_state_dict brought the old run's values
        group["lr"], group["weight_decay"] = config.optimisation.lr, config.optimisation.weight_decay
    support = checkpoint.get("support") if config.support.support_mask else None
    if support is None:
        return None
    support = support.to(dtype=torch.bool, device="cpu")
    model.set_support(support)
    return support


def _may_start_over(run_dir: str, force: bool) -> bool:
    """Whether ``run_dir`` holds files of an earlier run to remove once the inputs check out;
    refuses a finished run without ``force``."""
    if not outputs.existing_run_entries(run_dir):
        return False
    started = outputs.is_run_dir(run_dir) and not outputs.has_checkpoint(run_dir)
    if not (force or started):
        raise InputError(run_dir, None, "already holds a training run; pass --resume to "
                         "continue it, --force to start it again from scratch (its "
                         "checkpoints, latents, logs and analyses are deleted), or choose "
                         "another output directory")
    if started and not force:  # a start that never reached its first checkpoint
        logger.warning("%s holds a run that stopped before its first checkpoint; starting "
                       "it again", run_dir)
    return True


def _refuse_deleting_inputs(run_dir: str, paths: list[Optional[str]]) -> None:
    entries = outputs.existing_run_entries(run_dir)
    for path in paths:
        if path is not None and any(inside(path, entry) for entry in entries):
            raise InputError(run_dir, "-o", f"starting again would delete {path}, an "
                             "input of this run; move it out of the run directory first")


def _refuse_changed_data(checkpoint: dict[str, Any], fingerprint: dict[str, Any], run_dir: str) -> None:
    if not checkpoint.get("data_fingerprint"):
        return
    changed = compare_fingerprints(checkpoint["data_fingerprint"], fingerprint)
    if changed:
        more = f" (and {len(changed) - 2} more)" if len(changed) > 2 else ""
        raise InputError(run_dir, "--resume", "the input data changed since this run "
                         f"started: {'; '.join(changed[:2])}{more}. A resumed run must read "
                         "the data it began with; start a new run in another directory")


def _fit_model_config(model_config: Optional[ModelConfig], box_size: int, refine_poses: bool) -> ModelConfig:
    """The architecture for the training box: the given one (checked) or the default, with
    the orientation encoder present exactly when poses are refined."""
    if model_config is None:
        model_config = ModelOptions().model_config(box_size, refine_poses=refine_poses)
    if model_config.box_size != box_size:
        raise InputError(None, "--box", f"model box {model_config.box_size} px differs from the "
                         f"training box {box_size} px")
    if model_config.use_orientation_encoder != refine_poses:
        model_config = dataclasses.replace(model_config, use_orientation_encoder=refine_poses)
    return model_config


def _check_run_options(config: TrainConfig, model_config: ModelConfig, heldout_rows: np.ndarray,
                       n_particles: int) -> None:
    if config.support.support_mask and model_config.renderer != "canonical":
        logger.warning("--support-mask only applies to the canonical renderer; the %s renderer "
                       "evaluates the whole sphere", model_config.renderer)
    if config.heldout.early_stop_epochs is not None and not heldout_rows.size:
        raise InputError(None, "--early-stop", f"needs at least {MIN_HELDOUT} held-out images; "
                         f"{config.heldout.heldout_fraction:g} of {n_particles} particles is fewer")


def _restore(checkpoint: dict[str, Any], model: CryoFormer, optimizer: torch.optim.Optimizer,
             data: ParticleData, n_heldout: int) -> RunState:
    """Weights, optimiser, RNG streams and run state from a checkpoint."""
    model.load_state_dict(checkpoint["model"])
    state = RunState.from_checkpoint(checkpoint, data.poses, data.original_box, n_heldout)
    if state.support is not None:
        model.set_support(state.support)
    load_optimizer_state(optimizer, model, checkpoint["optimizer"])
    restore_rng_state(checkpoint["rng"])
    return state


def _write_header(run: Run, command_line: Optional[str], world: int, clear_first: bool) -> None:
    """Rank 0: the files that describe the run (an earlier start's removed first)."""
    run_dir = run.config.data.outdir
    if clear_first:
        outputs.clear_run(run_dir)
    os.makedirs(os.path.join(run_dir, outputs.CHECKPOINT_DIR), exist_ok=True)
    outputs.write_config_yaml(run_dir, run.config, run.model_config, outputs.data_summary(run.data, run.config),
                              command_line, world, resumed=run.resumed, run_id=run.run_id,
                              data_fingerprint=run.data_fingerprint)
    outputs.write_indices(run_dir, run.data.indices)
    if run.heldout_rows.size:
        outputs.write_indices(run_dir, run.data.indices[run.heldout_rows], outputs.HELDOUT_NAME)
