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
from cryoformer.metrics.pose_error import pose_error_summary
from cryoformer.model import ModelConfig
from cryoformer.model.density_field import slab_voxels

from . import distributed as dist_mod
from . import epoch_hooks
from . import outputs
from .allocator import keep_freed_memory
from .build import ENCODER_GROUP, Run, build_run
from .checkpoint import CHECKPOINT_FORMAT, capture_rng_state, save_checkpoint
from .config import TrainConfig
from .data import make_loader
from .inference import encode_particles
from cryoformer.progress import OFF, Progress, progress_style
from .runlog import RunLog, end_line, epoch_line, start_lines
from .slab_tuning import SlabTuner
from .step import LossAccumulator, LossModule, StopFlag, step_seed
from .trainlog import TrainLog

logger = logging.getLogger(__name__)

# Loss terms every step reports (and log.csv records), in this order.
LOSS_TERMS = ("loss", "mse", "pose_loss", "kl")


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
    """Runs the epochs of a built :class:`~.build.Run` (one process of it under DDP).

    The run's evolving state is ``run.state`` (:class:`~.state.RunState`); the trainer keeps
    only what running needs besides: the DDP-wrapped loss, the log and the clock.
    """

    def __init__(self, run: Run, info: dist_mod.DistInfo, progress: bool,
                 command_line: Optional[str] = None, started: Optional[float] = None) -> None:
        self.run, self.info = run, info
        # bars on a terminal, plain lines in a batch job's log file, nothing off rank 0
        self.style = progress_style(progress) if info.is_main else OFF
        self.config, self.state, self.model = run.config, run.state, run.model
        self.run_dir, self.device = run.config.data.outdir, info.device
        # the run's clock (time.monotonic) starts when train() was called: reading and checking
        # the data counts against a --max-minutes budget too
        self._t0 = time.monotonic() if started is None else started
        self.loss_module: nn.Module = LossModule(self.model, self.config)
        if info.distributed:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.refinement.refine_poses)
        self.log: Optional[TrainLog] = None
        self.runlog: Optional[RunLog] = None
        self._epoch_news: dict = {}  # what the current epoch wrote, for its run.log line
        # training throughput and held-out cost measured in this process: they size the part
        # of a --max-minutes budget kept for the held-out pass that follows a time stop
        self._trained_images, self._training_s = 0, 0.0
        self._heldout_s_per_image: Optional[float] = None
        # the latent pass's cost per particle: probed on a few particles when a budgeted run
        # starts training, then measured by each pass (it grows with N, the held-out pass does not)
        self._latent_s_per_particle: Optional[float] = None
        self._budget_checked = False
        # the CPU slab size timed on this run's steps (.slab_tuning), and the support's voxel
        # count it was chosen for
        self._tuning: Optional[SlabTuner] = None
        self._tuned_for_voxels: Optional[int] = None
        if info.is_main:
            self.runlog = RunLog(self.run_dir)
            self.runlog.lines(start_lines(run, self.device, info.world, command_line))
            state = self.state
            keep_epoch = state.last_epoch_written
            if state.phase == "train" and not state.epoch_complete and keep_epoch == state.epoch:
                keep_epoch -= 1  # its pose errors were of a partial epoch; they are redone
            self.log = TrainLog(self.run_dir, resume_step=state.step if run.resumed else None,
                                keep_pose_epochs_upto=keep_epoch, keep_heldout_epochs_upto=keep_epoch)
        dist_mod.barrier(info)

    # ------------------------------------------------------------------ schedule
    def stages(self) -> list[tuple[str, int]]:
        refine, epochs = self.config.refinement, self.config.optimisation.epochs
        pre = [("pretrain", e) for e in range(1, refine.pose_pretrain_epochs + 1)] if refine.refine_poses else []
        return pre + [("train", e) for e in range(1, epochs + 1)]

    def _start(self, stages) -> tuple[int, int]:
        """Index of the stage to run next and the batch to start it at."""
        state = self.state
        if state.phase == "start":
            return 0, 0
        if (state.phase, state.epoch) not in stages:  # resumed with fewer epochs: nothing left
            return len(stages), 0
        here = stages.index((state.phase, state.epoch))
        return (here + 1, 0) if state.epoch_complete else (here, state.batch_in_epoch)

    def elapsed(self) -> float:
        return self.state.elapsed_before_s + (time.monotonic() - self._t0)

    # ------------------------------------------------------------------ main entry
    def run_epochs(self) -> TrainResult:
        stages = self.stages()
        first, start_batch = self._start(stages)
        if self.info.is_main and self.state.phase == "start" and self.run.data.gt_poses is not None:
            self._log_pose_errors(0, "input", self.run.data.poses.rotations, self.run.data.poses.shifts_px)
        stopped = "finished"
        try:
            with StopFlag() as flag:
                for phase, epoch in stages[first:]:
                    reason = self._run_epoch(phase, epoch, start_batch, flag)
                    start_batch = 0
                    if reason is not None:
                        stopped = reason
                        break
            self._log_end(stopped)
        except TrainingDiverged:
            self._log_end("diverged")
            raise
        except KeyboardInterrupt:
            self._log_end("interrupted", "a second Ctrl-C aborted at once")
            raise
        except BaseException as exc:
            self._log_end("error", f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        finally:
            if self.log is not None:
                self.log.close()
            if self.runlog is not None:
                self.runlog.close()
        last = outputs.last_checkpoint(self.run_dir)
        return TrainResult(self.run_dir, stopped, self.state.last_epoch_written, self.state.step,
                           last if os.path.isfile(last) else None)

    def _log_end(self, reason: str, detail: str = "") -> None:
        """run.log's last line for this piece of the run: how it ended, where to continue."""
        if self.runlog is not None:
            last = outputs.last_checkpoint(self.run_dir)
            self.runlog.write(end_line(reason, self.state.step, last if os.path.isfile(last) else None,
                                       detail))

    def _run_epoch(self, phase: str, epoch: int, start_batch: int, flag: StopFlag) -> Optional[str]:
        """Train one epoch from ``start_batch`` (or until a stop); returns the stop reason."""
        cfg, state = self.config, self.state
        n_batches = self.run.plan.steps_per_epoch()
        state.phase, state.epoch, state.batch_in_epoch = phase, epoch, start_batch
        state.epoch_complete = start_batch >= n_batches
        self._epoch_news = {"written": [], "heldout": None}
        loader, bar = self._begin_epoch(phase, epoch, start_batch, n_batches)
        if phase == "train":
            self._retime_slab_if_support_shrank()
        acc = {"step": LossAccumulator(), "epoch": LossAccumulator()}
        self.model.train()
        reason = None
        try:
            for batch in loader:
                t_step = time.monotonic()
                tuner = self._slab_tuner(batch, phase)
                self._set_lr(phase, n_batches)
                terms, n_images = self._train_step(batch, phase)
                step_s = time.monotonic() - t_step
                self._trained_images += n_images
                self._training_s += step_s
                if tuner is not None:
                    self._slab_timed(tuner, step_s)
                if not self._budget_checked and phase == "train":
                    self._check_budget()
                state.batch_in_epoch += 1
                state.epoch_complete = state.batch_in_epoch >= n_batches
                if self._first_support_due(phase, n_batches):
                    self._make_support(epoch, f"epoch 1, after {state.batch_in_epoch} of {n_batches} steps")
                    self._retime_slab_if_support_shrank()
                for a in acc.values():
                    a.add(terms, n_images)
                bar.update(1, loss=terms["loss"], images=n_images)
                reason = self._stop_reason(flag)
                if state.step % cfg.runtime.log_every_steps == 0 or state.epoch_complete or reason:
                    self._log_row("step", acc["step"])
                if reason:
                    break
        except RuntimeError:
            if not flag.reason:  # a DataLoader worker killed by the Ctrl-C: treat as the stop
                raise
            reason = "interrupted"
        finally:
            bar.close()
        trained = (acc["epoch"].means(), acc["epoch"].rate()) if acc["epoch"].images else ({}, 0.0)
        if acc["epoch"].images:
            self._log_row("epoch", acc["epoch"])
        if self._end_of_epoch(phase, epoch, reason) and reason is None:
            reason = "early"
        self._log_epoch_line(phase, epoch, *trained)
        return reason

    def _log_epoch_line(self, phase: str, epoch: int, losses: dict[str, float], rate: float) -> None:
        if self.runlog is None:
            return
        total = self.config.refinement.pose_pretrain_epochs if phase == "pretrain" else self.config.optimisation.epochs
        news = self._epoch_news
        self.runlog.write(epoch_line(phase, epoch, total, losses, news["heldout"], rate, self.elapsed(),
                                     news["written"], partial=not self.state.epoch_complete))

    def _begin_epoch(self, phase: str, epoch: int, start_batch: int, n_batches: int):
        """The support mask this epoch trains under, its data loader and progress bar."""
        cfg, run, state = self.config, self.run, self.state
        if self._masks_support(phase) and start_batch == 0 and epoch > 1:
            # The mask this epoch trains under, from the model the previous epoch left: the
            # checkpoints of this epoch then hold the mask their weights were trained with.
            self._make_support(epoch, f"epoch {epoch}")
        stream = 1 if phase == "pretrain" else 0
        batches = list(run.plan.rank_batches(epoch, start_batch, stream=stream))
        workers = cfg.runtime.num_workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 0
        loader = make_loader(run.data.with_poses(state.poses), batches, workers,
                             pin_memory=self.device.type == "cuda")
        total = cfg.refinement.pose_pretrain_epochs if phase == "pretrain" else cfg.optimisation.epochs
        desc = f"{'pose pre-training' if phase == 'pretrain' else 'epoch'} {epoch}/{total}"
        bar = Progress(n_batches, desc, self.style, initial=start_batch, unit="batch")
        return loader, bar

    def _stop_reason(self, flag: StopFlag) -> Optional[str]:
        """Why to stop after this step ("time", "interrupted" or None), the same on every rank.

        A time budget is the wall time of the whole run: training stops early enough to leave
        the held-out and latent passes that follow it room inside the budget
        (:meth:`_reserve_after_stop_s`),
        so a batch job given the same limit is not killed while writing its last epoch."""
        budget = self.config.runtime.max_minutes
        over = budget and self.elapsed() + self._reserve_after_stop_s(60 * budget) > 60 * budget
        stop = flag.reason or ("time" if over else None)
        code = dist_mod.all_reduce_max({None: 0, "time": 1, "interrupted": 2}[stop], self.info)
        return {0: None, 1: "time", 2: "interrupted"}[int(code)]

    def _set_lr(self, phase: str, n_batches: int) -> None:
        """The learning rate of the next step: ``lr`` while training; during pose pre-training a
        cosine decay from ``lr`` to 0 over all its steps.

        Pre-training regresses the orientation encoder onto the input poses. At a constant rate
        Adam's steps keep it from settling: on 1000 particles (D = 32, SNR 0.1 or 1) the median
        error to the input poses stalls at 6–9° after 40–200 epochs; decayed to 0 over 150 epochs
        it reaches 0.0° (docs/benchmarks.md). The rate depends on the position in the schedule
        only, so a resumed run steps exactly as an uninterrupted one."""
        lr = self.config.optimisation.lr
        encoder_lr = lr * self.config.refinement.pose_lr_scale
        if phase == "pretrain":
            total = max(self.config.refinement.pose_pretrain_epochs * n_batches, 1)
            done = (self.state.epoch - 1) * n_batches + self.state.batch_in_epoch
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(done / total, 1.0)))
            encoder_lr = lr
        for group in self.run.optimizer.param_groups:
            group["lr"] = encoder_lr if group.get("name") == ENCODER_GROUP else lr

    def _passes_after_stop_s(self) -> tuple[float, float]:
        """Estimated seconds of the passes that follow a time stop: (held-out, latents).

        Held-out: the last held-out pass's time per image when one ran in this process (or the
        probe of :meth:`_check_budget`), else the training time per image so far (scoring
        renders without the backward pass, so this over-estimates, by about 2.7× at D = 64 on 2
        CPU cores). Latents: the latent pass's
        time per particle (probed at the start of training, then measured) times the number of
        particles; at D = 128 read and cropped to 64 it costs about 0.15 ms per particle on 2 CPU
        cores, so 70 s at 450 000 particles (docs/benchmarks.md). 0 where nothing is known yet."""
        heldout = 0.0
        n = self.run.heldout_rows.size
        if n and self.state.phase == "train":
            per_image = self._heldout_s_per_image
            if per_image is None and self._trained_images:
                per_image = self._training_s / self._trained_images
            heldout = n * (per_image or 0.0)
        latents = len(self.run.data) * (self._latent_s_per_particle or 0.0)
        return heldout, latents

    def _reserve_after_stop_s(self, budget_s: float) -> float:
        """Seconds of the budget kept for the passes after a time stop (held-out scoring and
        the latent pass, :meth:`_passes_after_stop_s`): at most half the budget, training
        always gets the other half (:meth:`_check_budget` warns when that is too little)."""
        if self.state.phase != "train":
            return 0.0
        return min(sum(self._passes_after_stop_s()), 0.5 * budget_s)

    def _check_budget(self) -> None:
        """Once, after the first training step of a budgeted run: probe the latent and held-out
        passes (a few hundred and a few dozen images) and say
        (stderr and run.log) when the passes after a stop need more than half the budget, so a
        batch job's limit can be raised before it is overrun rather than after."""
        self._budget_checked = True
        budget = self.config.runtime.max_minutes
        if not budget:
            return
        if self._latent_s_per_particle is None:
            self._latent_s_per_particle = self._probe_latent_cost()
        if self._heldout_s_per_image is None and self.run.heldout_rows.size:
            # the training time per image over-estimates scoring about 2.7× (no backward pass):
            # a warning from it would cry wolf (100 000 particles in 90 s: warned, ended at 70 s)
            self._heldout_s_per_image = self._probe_heldout_cost()
        heldout, latents = self._passes_after_stop_s()
        budget_s = 60.0 * budget
        if heldout + latents > 0.5 * budget_s:
            self._note(
                f"warning: --max-minutes {budget:g} is short for {len(self.run.data)} particles: the passes "
                f"after training need about {heldout + latents:.0f} s (held-out {heldout:.0f} s, latents "
                f"{latents:.0f} s), more than half the budget; the run will end about "
                f"{heldout + latents - 0.5 * budget_s:.0f} s late. Give at least "
                f"--max-minutes {math.ceil(2 * (heldout + latents) / 60.0)}")

    def _probe_heldout_cost(self, n_probe: int = 32) -> float:
        """Seconds per image of the held-out pass, timed on its first ``n_probe`` images."""
        rows = self.run.heldout_rows[:n_probe]
        t0 = time.monotonic()
        epoch_hooks.validate(self.model, self.run.data, self.state.poses, rows, self.device, self.config,
                             self.info.world)
        return (time.monotonic() - t0) / max(rows.size, 1)

    def _probe_latent_cost(self, n_probe: int = 256) -> float:
        """Seconds per particle of the latent pass (reading, cropping, encoding), timed on
        ``n_probe`` particles spread over the stack (so the reads are as cold as the pass's)."""
        data, model = self.run.data, self.model
        positions = np.unique(np.linspace(0, len(data) - 1, min(n_probe, len(data))).astype(np.int64))
        was_training = model.training
        model.eval()
        t0 = time.monotonic()
        try:
            with torch.no_grad():
                model.encode(data.images(positions).to(self.device))
        finally:
            model.train(was_training)
        return (time.monotonic() - t0) / positions.size

    def _masks_support(self, phase: str) -> bool:
        """Whether this phase trains under a support mask (the canonical renderer's training)."""
        return (self.config.support.support_mask and phase == "train"
                and self.run.model_config.renderer == "canonical")

    def _make_support(self, epoch: int, when: str) -> None:
        """Make the support mask from the current model and train under it from the next step."""
        cfg, run, state = self.config, self.run, self.state
        rows = run.plan.rows if run.plan.rows is not None else np.arange(len(run.data))
        t0 = time.monotonic()
        state.support = epoch_hooks.update_support(
            self.model, run.data, rows, cfg.optimisation.seed, epoch, cfg.support.support_threshold,
            cfg.support.support_margin_px, self.device, self.info)
        self.model.set_support(state.support)
        self._log_pass(f"support mask ({when}): {int(state.support.sum())} voxels", t0)

    def _first_support_due(self, phase: str, n_batches: int) -> bool:
        """After a step of epoch 1: whether ``--support-after`` training images are done and no
        mask exists yet. On a large set the first epoch is most of a short run; the whole
        sphere costs several times the mask's time per image, and a model that has seen a few
        thousand images already outlines the molecule. A mask made this early is loose, which
        costs speed rather than density, and each later epoch makes it again from the model."""
        after = self.config.support.support_after_images
        state = self.state
        if not after or state.epoch != 1 or state.support is not None or not self._masks_support(phase):
            return False
        rows = self.run.plan.rows
        n_train = len(rows) if rows is not None else len(self.run.data)
        # images of the epoch trained so far, on all ranks (the plan splits them evenly)
        return state.batch_in_epoch * n_train >= after * n_batches and state.batch_in_epoch < n_batches

    def _retime_slab_if_support_shrank(self) -> None:
        """Where a new mask takes effect (each training epoch's start, and epoch 1's first mask):
        have the slab size timed again (:meth:`_slab_tuner`) when the support holds a quarter
        fewer voxels than when it was last timed (the mask changes nowhere else, so the steps
        need not look)."""
        r = self.model.config.box_size
        mask = self.model.support_mask
        voxels = r ** 3 if mask is None else int(mask.sum())
        if self._tuned_for_voxels is None or voxels <= 0.75 * self._tuned_for_voxels:
            self._tuned_for_voxels, self._tuning = voxels, None

    def _slab_tuner(self, batch, phase: str) -> Optional[SlabTuner]:
        """The tuner timing this step's slab size (:mod:`.slab_tuning`), set up on the model; None
        when not tuning: on a GPU, with --no-slab-tuning, a fixed ``chunk_points``, outside the
        training phase, or once the size is chosen (until :meth:`_retime_slab_if_support_shrank`)."""
        field = self.model.field
        if (not self.config.runtime.slab_tuning or self.device.type != "cpu" or phase != "train"
                or field.chunk_points or self.run.model_config.renderer != "canonical"):
            return None
        if self._tuning is None:
            self._tuning = SlabTuner(slab_voxels(self.device, int(batch["images"].shape[0])),
                                     self.model.config.box_size)
            if self._tuning.done:  # one candidate (a small box): nothing to time
                field.training_slab_voxels = self._tuning.choice
        if self._tuning.done:
            return None
        field.training_slab_voxels = self._tuning.next_slab()
        return self._tuning

    def _slab_timed(self, tuner: SlabTuner, seconds: float) -> None:
        tuner.record(seconds)
        if tuner.done:
            self.model.field.training_slab_voxels = tuner.choice
            self._note(tuner.summary())

    def _train_step(self, batch, phase: str) -> tuple[dict[str, float], int]:
        cfg, info, state = self.config, self.info, self.state
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        torch.manual_seed(step_seed(cfg.optimisation.seed, info.rank, state.step))
        amp = (torch.autocast("cuda", dtype=torch.bfloat16)
               if cfg.runtime.amp and self.device.type == "cuda" else contextlib.nullcontext())
        refine = cfg.refinement
        step_phase = ("warmup" if phase == "train" and refine.refine_poses
                      and state.epoch <= refine.pose_warmup_epochs else phase)
        with amp:
            terms = self.loss_module(batch, step_phase)
        optimizer = self.run.optimizer
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if phase == "pretrain":  # only the orientation encoder is pre-trained
            enc = {id(p) for p in self.model.orientation_encoder.parameters()}
            for p in self.model.parameters():
                if id(p) not in enc:
                    p.grad = None
        values = dist_mod.all_reduce_mean(torch.stack([terms[k].detach().float() for k in LOSS_TERMS]), info)
        values = values.cpu().tolist()
        if not all(math.isfinite(v) for v in values):
            last = outputs.last_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became {values[0]} at {phase} epoch {state.epoch}, step {state.step + 1}; "
                f"training stopped and {keep}. Check the images for NaN/inf values or lower --lr "
                f"(now {cfg.optimisation.lr:g}).")
        optimizer.step()
        state.step += 1
        n_images = batch["images"].shape[0] * info.world
        return dict(zip(LOSS_TERMS, values)), n_images

    # ------------------------------------------------------------------ logging
    def _log_row(self, kind: str, acc: LossAccumulator) -> None:
        state = self.state
        if self.log is not None and acc.images:
            self.log.row({"kind": kind, "epoch": state.epoch, "step": state.step, "phase": state.phase,
                          "images": acc.images, **acc.means(), "lr": self.run.optimizer.param_groups[0]["lr"],
                          "images_per_s": acc.rate(), "elapsed_s": self.elapsed()})
        acc.reset()

    def _log_pose_errors(self, epoch: int, stage: str, rotations: np.ndarray, shifts_px: np.ndarray) -> None:
        gt = self.run.data.gt_poses
        summary = pose_error_summary(rotations, gt.rotations, shifts_px, gt.shifts_px)
        self.log.pose_errors(epoch, stage, summary)
        self.log.row({"kind": "pose", "epoch": epoch, "step": self.state.step, "phase": stage,
                      "elapsed_s": self.elapsed(), **summary,
                      "shift_mean_square_px2": summary.get("shift_mean_square_px2")})

    # ------------------------------------------------------------------ epoch outputs
    def _end_of_epoch(self, phase: str, epoch: int, reason: Optional[str]) -> bool:
        """Outputs and checkpoints after an epoch (or at a stop inside one).

        Returns True when the held-out loss says to stop early (same answer on every rank)."""
        cfg, run, state = self.config, self.run, self.state
        finished_pretrain = (phase == "pretrain" and state.epoch_complete
                             and epoch == cfg.refinement.pose_pretrain_epochs)
        out_epoch = None
        if phase == "train" and (state.epoch_complete or reason == "time"):
            out_epoch = epoch
        elif finished_pretrain:
            out_epoch = 0
        if reason == "time" and out_epoch is not None:
            self._note(f"time budget reached at step {state.step}; writing latents for {len(run.data)} "
                       f"particles" + (f" and scoring {run.heldout_rows.size} held-out images"
                                       if phase == "train" and run.heldout_rows.size else ""))
        encoded = None
        if (cfg.search.pose_search and phase == "train" and state.epoch_complete
                and epoch >= cfg.search.pose_search_start):
            t0 = time.monotonic()
            state.poses, encoded = epoch_hooks.search_training_poses(
                self.model, run.data, state.poses, run.heldout_rows, epoch, cfg, self.device, self.info,
                self.style)
            self._log_pass(f"pose search (after epoch {epoch}): {len(run.data)} particles", t0)
        stop_early = False
        if self.info.is_main:
            validated = False
            if out_epoch is not None:
                self._write_epoch_outputs(out_epoch, encoded)
                if phase == "train" and run.heldout_rows.size:
                    stop_early, validated = self._validate(out_epoch), True
            self._save(out_epoch)
            if validated:  # after the checkpoint: its best epoch must already be loadable
                state.validation.write(self.run_dir)
        dist_mod.barrier(self.info)
        return bool(dist_mod.all_reduce_max(float(stop_early), self.info))

    def _validate(self, out_epoch: int) -> bool:
        """Held-out loss of this epoch's model → history and log; True to stop early."""
        run, state = self.run, self.state
        t0 = time.monotonic()
        losses = epoch_hooks.validate(self.model, run.data, state.poses, run.heldout_rows, self.device,
                                      self.config, self.info.world, progress=self.style)  # [m]
        mse = float(losses.mean())
        outputs.write_heldout_losses(self.run_dir, out_epoch, losses)  # colours the explorer
        self._heldout_s_per_image = (time.monotonic() - t0) / max(run.heldout_rows.size, 1)
        self._log_pass(f"held-out (epoch {out_epoch}): {run.heldout_rows.size} images, mse {mse:.5g}", t0)
        self._epoch_news["heldout"] = mse
        state.validation.add(out_epoch, state.step, self.elapsed(), mse, state.epoch_complete)
        best = state.validation.best_epoch()
        self.log.row({"kind": "heldout", "epoch": out_epoch, "step": state.step, "phase": "train",
                      "images": int(run.heldout_rows.size), "mse": mse, "elapsed_s": self.elapsed()})
        logger.info("epoch %d: held-out image loss %.6g (best epoch %s)", out_epoch, mse, best)
        return epoch_hooks.early_stop_due(state.validation, self.config.heldout.early_stop_epochs,
                                          state.epoch_complete)

    def _write_epoch_outputs(self, out_epoch: int, encoded: Optional[dict] = None) -> None:
        # ``encoded``: what the pose search just encoded with this same model (latents, and the
        # encoder's poses with --refine-poses), so the particles are not encoded again
        cfg, data = self.config, self.run.data
        refine = cfg.refinement.refine_poses
        if encoded is not None:
            enc = encoded
        else:
            t0 = time.monotonic()
            enc = encode_particles(self.model, data, self.device, want_poses=refine, progress=self.style)
            self._latent_s_per_particle = (time.monotonic() - t0) / max(len(data), 1)
            self._log_pass(f"latents (epoch {out_epoch}): {len(data)} particles", t0)
        outputs.write_latents(self.run_dir, out_epoch, enc["z"])
        self._epoch_news["written"].append("latents")
        if cfg.search.pose_search and out_epoch > 0:
            # the run's current poses, as the last search left them; with --refine-poses they
            # are what the encoder's pose loss pulls towards, and the encoder's poses are the
            # run's output
            p = self.state.poses
            if not refine:
                outputs.write_refined_poses(self.run_dir, out_epoch, p.rotations, p.shifts_px, data.original_box)
                self._epoch_news["written"].append("poses")
            if data.gt_poses is not None:
                self._log_pose_errors(out_epoch, "search", p.rotations, p.shifts_px)
        if refine:
            shifts = enc["shifts_px"] * (data.original_box / data.box_size)  # back to D₀ px
            outputs.write_refined_poses(self.run_dir, out_epoch, enc["rotations"], shifts, data.original_box)
            self._epoch_news["written"].append("poses")
            if data.gt_poses is not None:
                stage = "pretrained" if out_epoch == 0 else "train"
                self._log_pose_errors(out_epoch, stage, enc["rotations"], shifts)
        self.state.last_epoch_written = out_epoch

    def _save(self, out_epoch: Optional[int]) -> None:
        run = self.run
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            **self.state.to_checkpoint(self.elapsed(), with_poses=self.config.search.pose_search),
            "output_epoch": -1 if out_epoch is None else out_epoch,
            "rng": capture_rng_state(), "train_config": self.config.to_dict(),
            "model_config": run.model_config.to_dict(),
            "data": outputs.data_summary(run.data, self.config),
            "run_id": run.run_id, "data_fingerprint": run.data_fingerprint,
        }
        last = outputs.last_checkpoint(self.run_dir)
        if out_epoch is None:
            save_checkpoint(checkpoint, last)
            self._epoch_news.setdefault("written", []).append("checkpoint last.pt")
        else:
            path = outputs.epoch_file(self.run_dir, outputs.CHECKPOINT_DIR, out_epoch)
            save_checkpoint(checkpoint, path)
            outputs.copy_atomic(path, last)
            self._epoch_news.setdefault("written", []).append(f"checkpoint {os.path.basename(path)}")

    def _note(self, message: str) -> None:
        """A line for the stderr log and run.log (rank 0)."""
        if self.info.is_main:
            logger.info("%s", message)
            if self.runlog is not None:
                self.runlog.write(message)

    def _log_pass(self, what: str, t0: float) -> None:
        """run.log: a pass between epochs (latents, held-out, pose search, mask) and its duration."""
        if self.runlog is not None:
            self.runlog.write(f"pass {what} in {time.monotonic() - t0:.1f} s")


def train(config: TrainConfig, model_config: Optional[ModelConfig] = None, *, resume: bool = False,
          command_line: Optional[str] = None, progress: bool = True, force: bool = False) -> TrainResult:
    """Train a CryoFormer model; write the run directory ``config.data.outdir``.

    Parameters
    ----------
    config : TrainConfig
    model_config : ModelConfig, optional
        Architecture (its ``box_size`` must be the training box); default
        ``ModelOptions().model_config(...)`` (:mod:`.config`). Ignored on resume (the
        checkpoint's is used).
    resume : bool
        Continue from ``RUN/checkpoints/last.pt``.
    command_line : str, optional
        Recorded in ``config.yaml``.
    progress : bool
        Show progress (rank 0): a tqdm bar when stderr is a terminal (or in a notebook),
        else plain lines (every 30 s and per epoch) that read well in a batch job's log file.
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
    started = time.monotonic()
    info = dist_mod.setup(config.runtime.device)
    if info.device.type == "cpu":
        keep_freed_memory()  # reuse freed activations instead of page-faulting them in again
    trainer = None
    try:
        trainer = Trainer(build_run(config, model_config, info, resume, command_line, force), info, progress,
                          command_line, started=started)
        return trainer.run_epochs()
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
