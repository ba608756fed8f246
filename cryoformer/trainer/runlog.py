"""``RUN/run.log``: the durable, human-readable record of a run, for cluster jobs.

Plain text, appended to across resumes (each start or resume begins with a summary), one
line per event, each flushed as written so ``tail -f`` and a killed job show everything up to
the last event. Every line starts with the local time, ISO 8601::

    2026-05-01T10:00:00+02:00 start: run 5f3c… (new run)
    2026-05-01T10:00:00+02:00 particles: 20000 from /data/particles.star (1 stack: …)
    2026-05-01T10:00:00+02:00 box: read 128 px at 1.0000 Å/px; trained at 64 px, 2.0000 Å/px
    …
    2026-05-01T10:03:12+02:00 epoch 1/20 (train): loss 0.91 mse 0.91 … | held-out mse 0.93 | 410.2 img/s | elapsed 0:03:10 | wrote latents, checkpoint
    2026-05-01T10:03:14+02:00 pass latents: 20000 particles in 2.1 s
    2026-05-01T10:40:00+02:00 end: time budget (--max-minutes) at step 9000; last checkpoint /run/checkpoints/last.pt

The Python log on stderr carries the same news as it happens; ``log.csv`` the numbers.
Only rank 0 writes.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Iterable, Optional

import torch

from cryoformer import __version__

from cryoformer.progress import format_duration

RUN_LOG_NAME = "run.log"

# How a call to train() ended → the words run.log uses for it.
END_REASONS = {
    "finished": "completed",
    "time": "time budget (--max-minutes) reached",
    "early": "early stop (held-out loss stopped improving)",
    "interrupted": "interrupted by a signal (Ctrl-C / SIGTERM)",
    "diverged": "diverged (non-finite loss)",
    "error": "failed with an error",
}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _angstrom(value: Optional[float]) -> str:
    return "unknown Å/px" if value is None else f"{value:.4f} Å/px"


class RunLog:
    """Appends timestamped lines to ``RUN/run.log`` (created when missing).

    Parameters
    ----------
    run_dir : str
        The run directory (must exist).
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, RUN_LOG_NAME)
        # line-buffered: every line reaches the file as it is written
        self._handle = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, text: str) -> None:
        """One line per line of ``text``, each stamped with the current time."""
        stamp = _now()
        for line in str(text).splitlines() or [""]:
            self._handle.write(f"{stamp} {line}\n")
        self._handle.flush()

    def lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def start_lines(run, device: torch.device, world: int, command_line: Optional[str]) -> list[str]:
    """The start-up summary of a run (:class:`~cryoformer.trainer.build.Run`) as lines:
    what was read, what is trained, where it runs and who started it."""
    cfg, data, state = run.config, run.data, run.state
    files = list(dict.fromkeys(data.source.files))
    shown = ", ".join(files[:3]) + (f", … ({len(files)} files)" if len(files) > 3 else "")
    subset = f" (subset --ind {cfg.data.ind} of {len(data.source)})" if cfg.data.ind else ""
    summary = run_data_summary(run)
    if run.resumed:
        how = (f"resumed at {state.phase} epoch {state.epoch}, step {state.step} "
               f"({'epoch complete' if state.epoch_complete else f'batch {state.batch_in_epoch}'})")
    elif run.loaded_from is not None:
        how = f"new run from the weights of {run.loaded_from}"
    else:
        how = "new run"
    out = [
        f"start: run {run.run_id} ({how})",
        f"particles: {len(data)} from {cfg.data.particles}{subset}; images in {shown}",
        f"box: read {data.original_box} px at {_angstrom(data.pixel_size_angstrom)}; trained at "
        f"{data.box_size} px, {_angstrom(data.training_pixel_size_angstrom)}",
        f"poses: {summary['poses']}",
        f"ctf: {summary['ctf'] or 'none (no CTF applied)'}",
        f"contrast: {run.contrast_note}",
        f"held-out: {run.heldout_rows.size} images "
        f"({cfg.heldout.heldout_fraction:g} of the particles, at most {cfg.heldout.heldout_max})",
        f"schedule: {cfg.optimisation.epochs} epochs of {run.plan.steps_per_epoch()} steps, batch "
        f"{cfg.optimisation.batch_size}, lr {cfg.optimisation.lr:g}"
        + (f", pose pre-training {cfg.refinement.pose_pretrain_epochs} epochs"
           if cfg.refinement.refine_poses else "")
        + (f", budget {cfg.runtime.max_minutes:g} min" if cfg.runtime.max_minutes else ""),
        f"device: {_device_name(device)} x {world} process(es), torch threads {torch.get_num_threads()}",
        f"versions: cryoformer {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        f"command: {command_line or '(library call)'}",
    ]
    return out


def run_data_summary(run) -> dict[str, Any]:
    """Where the poses and CTF came from (paths as recorded in config.yaml)."""
    opts = run.config.data
    from_particles = opts.particles.lower().endswith((".star", ".cs"))
    return {"poses": opts.poses or opts.particles,
            "ctf": opts.ctf or (opts.particles if from_particles else None)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def epoch_line(phase: str, epoch: int, total: int, losses: dict[str, float], heldout_mse: Optional[float],
               images_per_s: float, elapsed_s: float, written: list[str], partial: bool) -> str:
    """One epoch: its loss terms, held-out loss, speed, elapsed time and what it wrote."""
    name = "pose pre-training" if phase == "pretrain" else "epoch"
    terms = " ".join(f"{k} {v:.5g}" for k, v in losses.items()
                     if k in ("loss", "mse", "pose_loss", "kl") and v)
    parts = [f"{name} {epoch}/{total}{' (partial)' if partial else ''}: {terms or 'no steps'}"]
    if heldout_mse is not None:
        parts.append(f"held-out mse {heldout_mse:.5g}")
    parts += [f"{images_per_s:.1f} img/s", f"elapsed {format_duration(elapsed_s)}",
              f"wrote {', '.join(written) if written else 'nothing'}"]
    return " | ".join(parts)


def end_line(reason: str, step: int, checkpoint: Optional[str], detail: str = "") -> str:
    """How the run (this piece of it) ended, with the checkpoint to continue from."""
    where = f"last checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
    more = f" ({detail})" if detail else ""
    return f"end: {END_REASONS.get(reason, reason)} at step {step}{more}; {where}"
