"""The training loop: optimisation, pose refinement phases, checkpoints, stops, DDP.

Schedule. With ``refine_poses`` the orientation encoder is first pre-trained for
``pose_pretrain_epochs`` passes on the input poses alone (pose loss only, no rendering); its
result is epoch 0 of the run. Then ``epochs`` passes of joint training: image MSE (paper
eq. 7) at the *predicted* poses + ``pose_weight`` · pose loss (paper eq. 2). Without
refinement, only the image MSE at the given poses (+ KL when the model is variational).

Determinism. The data order of epoch ``e`` comes from ``(seed, e)`` and the random draws of
step ``s`` on rank ``r`` from ``(seed, r, s)``; a checkpoint stores the position in the
epoch, so a run stopped anywhere and resumed follows the same trajectory as one never stopped.

Stops. Ctrl-C and SIGTERM set a flag; the current step finishes and ``last.pt`` is written
(a second Ctrl-C aborts at once). ``max_minutes`` stops likewise, also writing the outputs of
the partial epoch. A non-finite loss stops before the optimiser step, leaving the last good
checkpoint as it was. ``early_stop_epochs`` stops after that many epochs without a lower
held-out image loss (:mod:`.validation`; held-out images never enter a training batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cryoformer.errors import InputError
from cryoformer.io.fingerprint import compare_fingerprints, fingerprint_files
from cryoformer.io.guard import inside
from cryoformer.metadata import Poses
from cryoformer.model import CryoFormer, ModelConfig

from . import distributed as dist_mod
from . import epoch_hooks
from . import outputs
from .allocator import keep_freed_memory
from .checkpoint import CHECKPOINT_FORMAT, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig, default_model_config
from .data import BatchPlan, check_contrast, load_particle_data, make_loader
from .inference import encode_particles
from .step import LossAccumulator, LossModule, StopFlag, step_seed
from .trainlog import TrainLog
from .validation import MIN_HELDOUT, ValidationHistory, split_heldout


logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing the bad state."""


@dataclass(frozen=True)
class TrainResult:
    """How a call to :func:`train` ended.

    Attributes
    ----------
    run_dir : str
    stopped : {"finished", "time", "interrupted", "early"}
        ``early``: the held-out loss stopped improving (``early_stop_epochs``).
    epoch : int
        Last training epoch with outputs on disk (0 = only pose pre-training; -1 = none).
    step : int
        Optimiser steps taken in total.
    checkpoint : str or None
        ``last.pt`` (None when nothing was trained).
    """

    run_dir: str
    stopped: str
    epoch: int
    step: int
    checkpoint: Optional[str]


class Trainer:
    """One training job (one process of it under DDP); see :func:`train`."""

    def __init__(self, config: TrainConfig, model_config: Optional[ModelConfig],
                 info: dist_mod.DistInfo, resume: bool, command_line: Optional[str],
                 progress: bool, force: bool = False) -> None:
        self.config, self.info, self.progress = config, info, progress
        self.run_dir = config.outdir
        state = None
        self.run_id = outputs.new_run_id()
        clear_first = False  # files of an earlier start to remove once the inputs check out
        if resume:
            last = outputs.resume_checkpoint(self.run_dir)
            state = load_checkpoint(last)
            recorded = (outputs.read_config_yaml(self.run_dir) or {}).get("run_id")
            if recorded is not None and state.get("run_id") != recorded:
                raise InputError(last, "run_id", f"belongs to run {state.get('run_id') or '(unknown)'}, "
                                 f"not to the run recorded in {self.run_dir}/config.yaml "
                                 f"({recorded}); a checkpoint copied from another run cannot "
                                 "continue this one")
            self.run_id = state.get("run_id") or recorded or self.run_id
            bad = config.resume_mismatches(state["train_config"])
            if bad:
                raise InputError(None, ", ".join(bad), "differs from the run being resumed "
                                 f"({self.run_dir}); only the schedule, time budget and device may change")
        elif outputs.existing_run_entries(self.run_dir):
            started = outputs.is_run_dir(self.run_dir) and not outputs.has_checkpoint(self.run_dir)
            if not (force or started):
                raise InputError(self.run_dir, None, "already holds a training run; pass --resume to "
                                 "continue it, --force to start it again from scratch (its "
                                 "checkpoints, latents, logs and analyses are deleted), or choose "
                                 "another output directory")
            if started and not force:  # a start that never reached its first checkpoint
                logger.warning("%s holds a run that stopped before its first checkpoint; starting "
                               "it again", self.run_dir)
            clear_first = True
        if state is not None:
            # The held-out split is part of the run: a resumed run keeps its own (and one begun
            # before images were held out keeps training on all of them).
            saved = state["train_config"]
            config = dataclasses.replace(config, heldout_fraction=saved.get("heldout_fraction", 0.0),
                                         heldout_max=saved.get("heldout_max", config.heldout_max),
                                         support_mask=saved.get("support_mask", False),
                                         support_threshold=saved.get("support_threshold", config.support_threshold),
                                         support_margin_px=saved.get("support_margin_px", config.support_margin_px))
            self.config = config
            if config.early_stop_epochs is not None and config.heldout_fraction == 0:
                raise InputError(self.run_dir, "--early-stop", "this run holds out no images (started "
                                 "with --heldout-fraction 0 or by an older cryoformer), so it cannot "
                                 "stop on a held-out loss")
        self.data = load_particle_data(config)
        self.input_poses = self.data.poses  # the pose-search prior is centred on these
        # What training reads (the ground-truth poses are only reported, so they are not part
        # of the data fingerprint, but they must survive a restart all the same).
        training_inputs = [config.particles, config.poses, config.ctf, config.ind, *self.data.source.files]
        if clear_first:
            entries = outputs.existing_run_entries(self.run_dir)
            for path in training_inputs + [config.gt_poses]:
                if path is not None and any(inside(path, entry) for entry in entries):
                    raise InputError(self.run_dir, "-o", f"starting again would delete {path}, an "
                                     "input of this run; move it out of the run directory first")
        if state is None and config.check_contrast:
            # Before anything is written: a wrong contrast flag trains a map of inverted sign.
            est = check_contrast(self.data, config.particles, config.seed)
            if info.is_main:
                logger.info("%s%s", est.summary(), "" if est.invert_data is not None else
                            "; too few images or too little signal to check the contrast flag")
        self.data_fingerprint = fingerprint_files(training_inputs)
        if state is not None and state.get("data_fingerprint"):
            changed = compare_fingerprints(state["data_fingerprint"], self.data_fingerprint)
            if changed:
                more = f" (and {len(changed) - 2} more)" if len(changed) > 2 else ""
                raise InputError(self.run_dir, "--resume", "the input data changed since this run "
                                 f"started: {'; '.join(changed[:2])}{more}. A resumed run must read "
                                 "the data it began with; start a new run in another directory")
        if state is not None:
            model_config = ModelConfig.from_dict(state["model_config"])
            self.data.image_scale = float(state["data"]["image_scale"])
        elif model_config is None:
            model_config = default_model_config(self.data.box_size, refine_poses=config.refine_poses)
        if model_config.box_size != self.data.box_size:
            raise InputError(None, "--box", f"model box {model_config.box_size} px differs from the "
                             f"training box {self.data.box_size} px")
        if model_config.use_orientation_encoder != config.refine_poses:
            model_config = dataclasses.replace(model_config, use_orientation_encoder=config.refine_poses)
        self.model_config = model_config
        self.device = info.device
        torch.manual_seed(config.seed)  # identical initial weights on every rank and every run
        self.model = CryoFormer(model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        train_rows, self.heldout_rows = split_heldout(len(self.data), config.heldout_fraction,
                                                      config.heldout_max, config.seed)
        self.plan = BatchPlan(len(self.data), config.batch_size, config.seed, info.rank, info.world,
                              rows=train_rows if self.heldout_rows.size else None)
        self.validation = ValidationHistory(n_heldout=int(self.heldout_rows.size))
        if config.support_mask and model_config.renderer != "canonical":
            logger.warning("--support-mask only applies to the canonical renderer; the %s renderer "
                           "evaluates the whole sphere", model_config.renderer)
        if config.early_stop_epochs is not None and not self.heldout_rows.size:
            raise InputError(None, "--early-stop", f"needs at least {MIN_HELDOUT} held-out images; "
                             f"{config.heldout_fraction:g} of {len(self.data)} particles is fewer")
        self.phase, self.epoch, self.batch_in_epoch, self.step = "start", 0, 0, 0
        self.epoch_complete, self.elapsed_before = True, 0.0
        self.last_epoch_written = -1
        if state is not None:
            self.model.load_state_dict(state["model"])
            if state.get("support") is not None:
                self.model.set_support(state["support"])
            self.optimizer.load_state_dict(state["optimizer"])
            restore_rng_state(state["rng"])
            self.phase, self.epoch = state["phase"], int(state["epoch"])
            self.batch_in_epoch, self.step = int(state["batch_in_epoch"]), int(state["step"])
            self.epoch_complete = bool(state["epoch_complete"])
            self.elapsed_before = float(state["elapsed_s"])
            self.last_epoch_written = int(state.get("last_epoch_written", -1))
            self.validation = ValidationHistory(state.get("validation"), int(self.heldout_rows.size))
            if "current_rotations" in state:  # poses refined by the local search so far
                self.data.poses = Poses(state["current_rotations"].numpy(),
                                        state["current_shifts_px"].numpy(), self.data.original_box)
        self.loss_module: nn.Module = LossModule(self.model, config)
        if info.distributed:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.refine_poses)
        self.log: Optional[TrainLog] = None
        if info.is_main:
            if clear_first:
                outputs.clear_run(self.run_dir)
            os.makedirs(os.path.join(self.run_dir, outputs.CHECKPOINT_DIR), exist_ok=True)
            outputs.write_config_yaml(self.run_dir, config, model_config,
                                      outputs.data_summary(self.data, config), command_line,
                                      info.world, resumed=state is not None, run_id=self.run_id,
                                      data_fingerprint=self.data_fingerprint)
            outputs.write_indices(self.run_dir, self.data.indices)
            if self.heldout_rows.size:
                outputs.write_indices(self.run_dir, self.data.indices[self.heldout_rows],
                                      outputs.HELDOUT_NAME)
            keep_epoch = self.last_epoch_written
            if self.phase == "train" and not self.epoch_complete and keep_epoch == self.epoch:
                keep_epoch -= 1  # its pose errors were of a partial epoch; they are redone
            self.log = TrainLog(self.run_dir, resume_step=self.step if state is not None else None,
                                keep_pose_epochs_upto=keep_epoch, keep_heldout_epochs_upto=keep_epoch)
        dist_mod.barrier(info)

    # ------------------------------------------------------------------ schedule
    def stages(self) -> list[tuple[str, int]]:
        cfg = self.config
        pre = [("pretrain", e) for e in range(1, cfg.pose_pretrain_epochs + 1)] if cfg.refine_poses else []
        return pre + [("train", e) for e in range(1, cfg.epochs + 1)]

    def _start(self, stages) -> tuple[int, int]:
        """Index of the stage to run next and the batch to start it at."""
        if self.phase == "start":
            return 0, 0
        if (self.phase, self.epoch) not in stages:  # resumed with fewer epochs: nothing left
            return len(stages), 0
        here = stages.index((self.phase, self.epoch))
        return (here + 1, 0) if self.epoch_complete else (here, self.batch_in_epoch)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._t0)

    # ------------------------------------------------------------------ main entry
    def run(self) -> TrainResult:
        self._t0 = time.monotonic()
        stages = self.stages()
        first, start_batch = self._start(stages)
        if self.info.is_main and self.phase == "start" and self.data.gt_poses is not None:
            self._log_pose_errors(0, "input", self.data.poses.rotations, self.data.poses.shifts_px)
        stopped = "finished"
        try:
            with StopFlag() as flag:
                for phase, epoch in stages[first:]:
                    reason = self._run_epoch(phase, epoch, start_batch, flag)
                    start_batch = 0
                    if reason is not None:
                        stopped = reason
                        break
        finally:
            if self.log is not None:
                self.log.close()
        last = outputs.last_checkpoint(self.run_dir)
        return TrainResult(self.run_dir, stopped, self.last_epoch_written, self.step,
                           last if os.path.isfile(last) else None)

    def _run_epoch(self, phase: str, epoch: int, start_batch: int, flag: StopFlag) -> Optional[str]:
        cfg, info = self.config, self.info
        n_batches = self.plan.steps_per_epoch()
        self.phase, self.epoch, self.batch_in_epoch = phase, epoch, start_batch
        self.epoch_complete = start_batch >= n_batches
        if (cfg.support_mask and phase == "train" and start_batch == 0 and epoch > 1
                and self.model_config.renderer == "canonical"):
            # The mask this epoch trains under, from the model the previous epoch left: the
            # checkpoints of this epoch then hold the mask their weights were trained with.
            epoch_hooks.update_support(self, epoch)
        stream = 1 if phase == "pretrain" else 0
        batches = list(self.plan.rank_batches(epoch, start_batch, stream=stream))
        workers = cfg.num_workers if cfg.num_workers is not None else (4 if self.device.type == "cuda" else 0)
        loader = make_loader(self.data, batches, workers, pin_memory=self.device.type == "cuda")
        total = (cfg.pose_pretrain_epochs if phase == "pretrain" else cfg.epochs)
        desc = f"{'pose pre-training' if phase == 'pretrain' else 'epoch'} {epoch}/{total}"
        bar = tqdm(total=n_batches, initial=start_batch, desc=desc, unit="batch", leave=False,
                   disable=not (info.is_main and self.progress), dynamic_ncols=True)
        acc = {"step": LossAccumulator(), "epoch": LossAccumulator()}
        self.model.train()
        reason = None
        try:
            for batch in loader:
                terms, n_images = self._train_step(batch, phase)
                self.batch_in_epoch += 1
                self.epoch_complete = self.batch_in_epoch >= n_batches
                for a in acc.values():
                    a.add(terms, n_images)
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4g}", img_s=f"{acc['epoch'].rate():.1f}")
                stop = flag.reason or ("time" if cfg.max_minutes and self.elapsed() > 60 * cfg.max_minutes
                                       else None)
                code = dist_mod.all_reduce_max({None: 0, "time": 1, "interrupted": 2}[stop], info)
                reason = {0: None, 1: "time", 2: "interrupted"}[int(code)]
                if self.step % cfg.log_every_steps == 0 or self.epoch_complete or reason:
                    self._log_row("step", acc["step"])
                if reason:
                    break
        except RuntimeError:
            if not flag.reason:  # a DataLoader worker killed by the Ctrl-C: treat as the stop
                raise
            reason = "interrupted"
        finally:
            bar.close()
        if acc["epoch"].images:
            self._log_row("epoch", acc["epoch"])
        if self._end_of_epoch(phase, epoch, reason) and reason is None:
            reason = "early"
        return reason

    def _train_step(self, batch, phase: str) -> tuple[dict[str, float], int]:
        cfg, info = self.config, self.info
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        torch.manual_seed(step_seed(cfg.seed, info.rank, self.step))
        amp = (torch.autocast("cuda", dtype=torch.bfloat16)
               if cfg.amp and self.device.type == "cuda" else contextlib.nullcontext())
        with amp:
            terms = self.loss_module(batch, phase)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if phase == "pretrain":  # only the orientation encoder is pre-trained
            enc = {id(p) for p in self.model.orientation_encoder.parameters()}
            for p in self.model.parameters():
                if id(p) not in enc:
                    p.grad = None
        values = dist_mod.all_reduce_mean(
            torch.stack([terms[k].detach().float() for k in ("loss", "mse", "pose_loss", "kl")]), info)
        values = values.cpu().tolist()
        if not all(math.isfinite(v) for v in values):
            last = outputs.last_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {values[0]} at {phase} epoch {self.epoch}, step {self.step + 1}; "
                f"training stopped and {keep}. Check the images for NaN/inf values or lower --lr "
                f"(now {cfg.lr:g}).")
        self.optimizer.step()
        self.step += 1
        n_images = batch["images"].shape[0] * info.world
        return dict(zip(("loss", "mse", "pose_loss", "kl"), values)), n_images

    # ------------------------------------------------------------------ logging
    def _log_row(self, kind: str, acc: "LossAccumulator") -> None:
        if self.log is not None and acc.images:
            self.log.row({"kind": kind, "epoch": self.epoch, "step": self.step, "phase": self.phase,
                          "images": acc.images, **acc.means(), "lr": self.optimizer.param_groups[0]["lr"],
                          "images_per_s": acc.rate(), "elapsed_s": self.elapsed()})
        acc.reset()

    def _log_pose_errors(self, epoch: int, stage: str, rotations: np.ndarray, shifts_px: np.ndarray) -> None:
        from cryoformer.metrics.pose_error import pose_error_summary

        gt = self.data.gt_poses
        summary = pose_error_summary(rotations, gt.rotations, shifts_px, gt.shifts_px)
        self.log.pose_errors(epoch, stage, summary)
        self.log.row({"kind": "pose", "epoch": epoch, "step": self.step, "phase": stage,
                      "elapsed_s": self.elapsed(), **summary,
                      "shift_mean_square_px2": summary.get("shift_mean_square_px2")})

    # ------------------------------------------------------------------ epoch outputs
    def _end_of_epoch(self, phase: str, epoch: int, reason: Optional[str]) -> bool:
        """Outputs and checkpoints after an epoch (or at a stop inside one).

        Returns True when the held-out loss says to stop early (same answer on every rank)."""
        cfg = self.config
        finished_pretrain = phase == "pretrain" and self.epoch_complete and epoch == cfg.pose_pretrain_epochs
        out_epoch = None
        if phase == "train" and (self.epoch_complete or reason == "time"):
            out_epoch = epoch
        elif finished_pretrain:
            out_epoch = 0
        latents = None
        if (cfg.pose_search and phase == "train" and self.epoch_complete
                and epoch >= cfg.pose_search_start):
            latents = epoch_hooks.search_training_poses(self)
        stop_early = False
        if self.info.is_main:
            validated = False
            if out_epoch is not None:
                self._write_epoch_outputs(out_epoch, latents)
                if phase == "train" and self.heldout_rows.size:
                    stop_early, validated = epoch_hooks.validate(self, out_epoch), True
            self._save(out_epoch)
            if validated:  # after the checkpoint: its best epoch must already be loadable
                self.validation.write(self.run_dir)
        dist_mod.barrier(self.info)
        return bool(dist_mod.all_reduce_max(float(stop_early), self.info))

    def _write_epoch_outputs(self, out_epoch: int, latents: Optional[np.ndarray] = None) -> None:
        # ``latents``: what the pose search just encoded with this same model (it and
        # --refine-poses exclude each other, so no predicted poses are needed then)
        enc = ({"z": latents} if latents is not None else
               encode_particles(self.model, self.data, self.device, want_poses=self.config.refine_poses))
        outputs.write_latents(self.run_dir, out_epoch, enc["z"])
        if self.config.pose_search:
            p = self.data.poses
            outputs.write_refined_poses(self.run_dir, out_epoch, p.rotations, p.shifts_px,
                                        self.data.original_box)
            if self.data.gt_poses is not None:
                self._log_pose_errors(out_epoch, "search", p.rotations, p.shifts_px)
        if self.config.refine_poses:
            shifts = enc["shifts_px"] * (self.data.original_box / self.data.box_size)  # back to D₀ px
            outputs.write_refined_poses(self.run_dir, out_epoch, enc["rotations"], shifts,
                                        self.data.original_box)
            if self.data.gt_poses is not None:
                stage = "pretrained" if out_epoch == 0 else "train"
                self._log_pose_errors(out_epoch, stage, enc["rotations"], shifts)
        self.last_epoch_written = out_epoch

    def _save(self, out_epoch: Optional[int]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "phase": self.phase, "epoch": self.epoch,
            "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "epoch_complete": self.epoch_complete, "last_epoch_written": self.last_epoch_written,
            "output_epoch": -1 if out_epoch is None else out_epoch,
            "rng": capture_rng_state(), "train_config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "data": outputs.data_summary(self.data, self.config), "elapsed_s": self.elapsed(),
            "validation": self.validation.rows,
            "run_id": self.run_id, "data_fingerprint": self.data_fingerprint,
        }
        if self.model.support_mask is not None:
            state["support"] = self.model.support_mask.detach().cpu()
        if self.config.pose_search:
            state["current_rotations"] = torch.from_numpy(self.data.poses.rotations)
            state["current_shifts_px"] = torch.from_numpy(self.data.poses.shifts_px)
        last = outputs.last_checkpoint(self.run_dir)
        if out_epoch is None:
            save_checkpoint(state, last)
        else:
            path = outputs.epoch_file(self.run_dir, outputs.CHECKPOINT_DIR, out_epoch)
            save_checkpoint(state, path)
            outputs.copy_atomic(path, last)


def train(config: TrainConfig, model_config: Optional[ModelConfig] = None, *, resume: bool = False,
          command_line: Optional[str] = None, progress: bool = True, force: bool = False) -> TrainResult:
    """Train a CryoFormer model; write the run directory ``config.outdir``.

    Parameters
    ----------
    config : TrainConfig
    model_config : ModelConfig, optional
        Architecture (its ``box_size`` must be the training box); default
        :func:`~cryoformer.trainer.config.default_model_config`. Ignored on resume (the
        checkpoint's is used).
    resume : bool
        Continue from ``RUN/checkpoints/last.pt``.
    command_line : str, optional
        Recorded in ``config.yaml``.
    progress : bool
        Show the tqdm progress bar (rank 0).
    force : bool
        Start afresh in a directory that holds a run with checkpoints, deleting that run's
        files (never the inputs). Without it such a directory is refused; one whose run
        stopped before its first checkpoint is restarted either way.

    Returns
    -------
    TrainResult

    Raises
    ------
    InputError
        Bad input or options (before anything is written).
    TrainingDiverged
        Non-finite loss; the files on disk are those of the last good checkpoint.
    """
    info = dist_mod.setup(config.device)
    if info.device.type == "cpu":
        keep_freed_memory()  # reuse freed activations instead of page-faulting them in again
    trainer = None
    try:
        trainer = Trainer(config, model_config, info, resume, command_line, progress, force)
        return trainer.run()
    except BaseException as exc:
        # the traceback's frames hold the trainer too: clear them so it can be freed below
        traceback.clear_frames(exc.__traceback__.tb_next)
        raise
    finally:
        # The DDP wrapper holds the gloo/NCCL process group; left to the interpreter's
        # shutdown, its worker threads are torn down after Python is gone and the process
        # aborts ("terminate called without an active exception", ~1 run in 8 measured).
        # Free it (it sits in reference cycles, hence the collect) before the group goes.
        del trainer
        gc.collect()
        dist_mod.teardown(info)
