"""``cryoformer train``: train a CryoFormer model on particles with poses and CTF.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=K -m cryoformer train ...`` (the global
batch size stays ``--batch-size``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from cryoformer import options
from cryoformer.errors import InputError
from cryoformer.io.particles import open_particles
from cryoformer.trainer import ModelOptions, TrainConfig, TrainingDiverged, train
from cryoformer.trainer import outputs
from cryoformer.trainer.checkpoint import load_checkpoint
from cryoformer.trainer.run_dir import best_epoch

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``train`` sub-command: its flags generated from :class:`TrainConfig`'s option
    groups and :class:`ModelOptions` (each declared once, in :mod:`cryoformer.trainer.config`)."""
    p = sub.add_parser(
        "train",
        help="train a CryoFormer model (heterogeneous reconstruction) on particles with poses and CTF",
        description=(
            "Train on particle images with given poses (and CTF), writing a run directory: "
            "config.yaml, log.csv, checkpoints/epoch_XXX.pt and last.pt, latents/epoch_XXX.npy "
            "([N, zdim] mean latents), and poses/epoch_XXX.pkl with --refine-poses. Images are "
            "read memory-mapped. RUN/run.log is the run's plain-text record (settings, one line "
            "per epoch, how it ended), appended to on every resume; progress is a bar on a "
            "terminal and plain lines when the output goes to a file (batch jobs). Ctrl-C or "
            "SIGTERM stops after the current step with a checkpoint; --resume continues the same "
            "run, --load CKPT starts a new one from another run's weights. Several GPUs/nodes: "
            "torchrun --nproc_per_node=K -m cryoformer train ..."
        ),
    )
    options.add_arguments(p, TrainConfig)
    # Not an option of the run: how this invocation relates to the run directory.
    p.add_argument("--resume", action="store_true",
                   help="continue the run in -o from checkpoints/last.pt: the same run (its id, "
                        "epoch count, held-out split, logs), same data/options; --epochs, "
                        "--max-minutes, --early-stop, --device, --num-workers may change. "
                        "Compare --load, which starts a new run from a checkpoint's weights")
    options.add_arguments(p, ModelOptions, title="model")
    return p


def build_configs(args):
    """``(TrainConfig, ModelConfig or None)`` from parsed arguments; None = from the checkpoint
    (that of the run resumed, or the one ``--load`` starts from when no model option is given)."""
    given = options.given_values(args, TrainConfig)
    model_given = options.given_values(args, ModelOptions)
    if args.resume:
        if "load" in given:
            raise InputError(None, "--load", "--load starts a new run from a checkpoint's weights, "
                             "--resume continues the run in -o from its own last.pt: give one of them")
        if model_given:
            raise InputError(None, "--resume", "model options (--preset, --zdim, --feature-grid, "
                             "--variational) come from the run being resumed and cannot be given")
        saved = load_checkpoint(outputs.resume_checkpoint(os.path.abspath(args.outdir)))["train_config"]
        return TrainConfig.from_dict({**options.nested_to_flat(TrainConfig, saved), **given}), None
    if args.particles is None:
        raise InputError(None, "PARTICLES", "the particle file is required (unless --resume)")
    config = TrainConfig.from_flat(**given)
    data = config.data
    box = data.box_size or open_particles(data.particles, datadir=data.datadir).box_size
    if box % 2 or box < 8:
        raise InputError(data.particles, "box size", f"training box must be even and >= 8, got {box}")
    if config.optimisation.load is not None and not model_given:
        return config, None  # the architecture of the checkpoint loaded
    model = options.from_flat(ModelOptions, model_given)
    return config, model.model_config(box, refine_poses=config.refinement.refine_poses)


def run(args) -> int:
    if os.path.lexists(args.outdir) and not os.path.isdir(args.outdir):
        raise InputError(args.outdir, "-o", "exists and is not a directory")
    if args.resume and args.force:
        raise InputError(None, "--force", "--resume continues the run; --force would start it "
                         "again from scratch: give one of them")
    config, model_config = build_configs(args)
    command = " ".join(shlex.quote(a) for a in ["cryoformer"] + sys.argv[1:])
    try:
        result = train(config, model_config, resume=args.resume, command_line=command,
                       force=args.force)
    except TrainingDiverged as err:
        print(f"cryoformer train: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0
    where = f"{result.run_dir} (last epoch with outputs: {result.epoch}, {result.step} steps)"
    if result.stopped == "interrupted":
        print(f"cryoformer train: interrupted; checkpoint written, continue with --resume: {where}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    best = best_epoch(result.run_dir) if result.epoch >= 1 else None
    if best is not None:
        print(f"lowest held-out image loss at epoch {best} (what `cryoformer analyze` uses by default)")
    if result.stopped == "time":
        print(f"stopped at the --max-minutes budget; continue with --resume: {where}")
        return 0
    if result.stopped == "early":
        print(f"stopped early: the held-out loss did not improve for {config.heldout.early_stop_epochs} "
              f"epochs: {where}")
        return 0
    print(f"training finished: {where}")
    return 0
