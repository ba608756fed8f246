"""``cryoformer train``: train a CryoFormer model on particles with poses and CTF.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=K -m cryoformer train ...`` (the global
batch size stays ``--batch-size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from cryoformer.errors import InputError

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def _defaults() -> dict:
    from cryoformer.trainer.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def add_parser(sub) -> argparse.ArgumentParser:
    from cryoformer.model import PRESETS
    from cryoformer.trainer.config import DEFAULT_PRESET, POSE_SEARCH_REFERENCES

    d = _defaults()
    p = sub.add_parser(
        "train",
        help="train a CryoFormer model (heterogeneous reconstruction) on particles with poses and CTF",
        description=(
            "Train on particle images with given poses (and CTF), writing a run directory: "
            "config.yaml, log.csv, checkpoints/epoch_XXX.pt and last.pt, latents/epoch_XXX.npy "
            "([N, zdim] mean latents), and poses/epoch_XXX.pkl with --refine-poses. Images are "
            "read memory-mapped. Ctrl-C or SIGTERM stops after the current step with a checkpoint; "
            "--resume continues. Several GPUs/nodes: torchrun --nproc_per_node=K -m cryoformer train ..."
        ),
    )
    p.add_argument("particles", nargs="?",
                   help="particles: .mrcs/.mrc stack, .txt list of stacks, RELION .star or cryoSPARC .cs "
                        "(optional with --resume)")
    p.add_argument("-o", "--outdir", required=True, help="run directory to write")
    p.add_argument("--poses", help="poses .pkl (cryoDRGN)/.star/.cs; shifts in px (default: PARTICLES if .star/.cs)")
    p.add_argument("--ctf", help="CTF .pkl/.star/.cs (default: PARTICLES if .star/.cs, else no CTF)")
    p.add_argument("--datadir", help="directory of the stacks named in a .txt/.star/.cs")
    p.add_argument("--ind", help="subset: .npy/.pkl of 0-based particle indices")
    p.add_argument("--uninvert-data", dest="invert_data", action="store_false", default=None,
                   help="do not multiply images by -1. By default images are inverted, as RELION/cryoSPARC "
                        "particles (and `cryoformer simulate --contrast relion`) are -(projection*CTF); "
                        "use this flag for cryoDRGN-convention data (+projection*CTF) and for CTF-free "
                        "images with positive (white) density")
    p.add_argument("--no-contrast-check", dest="check_contrast", action="store_false", default=None,
                   help="skip the check that the images' contrast (read from the lowest Fourier rings "
                        "of up to 2000 phase-flipped images) agrees with --uninvert-data; for stacks "
                        "the check cannot read, e.g. images already phase-flipped")
    p.add_argument("--box", dest="box_size", type=int,
                   help="train at this box size in px (even, <= D), Fourier-cropping on the fly; shifts and "
                        "the CTF pixel size (Å/px) are rescaled (default: the stack's D)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"training epochs (default {d['epochs']})")
    g.add_argument("-b", "--batch-size", type=int,
                   help=f"global batch size in images, split over DDP processes (default {d['batch_size']})")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d['lr']:g})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']:g})")
    g.add_argument("--kl-weight", type=float,
                   help=f"KL weight (per image / D² px) for --variational models (default {d['kl_weight']:g})")
    g.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    g.add_argument("--max-minutes", type=float,
                   help="wall-clock budget in minutes; stops cleanly with a checkpoint and latents")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto (default): CUDA when available")
    g.add_argument("--num-workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                   help="no bf16 autocast on CUDA (never used on CPU)")
    g.add_argument("--heldout-fraction", type=float,
                   help="fraction of the particles held out of training to measure, after each epoch, "
                        "how well the model predicts images it never saw (RUN/validation.json); "
                        "analysis then uses the epoch where that loss is lowest, before the model fits "
                        f"the noise. 0 disables (default {d['heldout_fraction']:g}, at most "
                        f"--heldout-max images)")
    g.add_argument("--heldout-max", type=int, help=f"at most this many held-out images (default {d['heldout_max']})")
    g.add_argument("--early-stop", dest="early_stop_epochs", type=int, metavar="EPOCHS",
                   help="stop when the held-out loss has not improved for EPOCHS epochs (default: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in -o from checkpoints/last.pt (same data/options and "
                        "held-out split; --epochs, --max-minutes, --early-stop, --device, "
                        "--num-workers may change)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=sorted(PRESETS), help=f"architecture preset (default {DEFAULT_PRESET})")
    m.add_argument("--zdim", type=int, help="latent dimension (default 8)")
    m.add_argument("--feature-grid", type=int, metavar="G",
                   help="evaluate the spatial features F_S on a G³ grid (px of the training box) and "
                        "upsample; smaller is faster (default: the trainer's tuned value)")
    m.add_argument("--get-query", choices=("trilinear", "block"),
                   help="how a point reads the structure queries: trilinear blend of the neighbouring "
                        "blocks' queries (default; smoother maps) or the query of its block (the paper)")
    m.add_argument("--no-support-mask", dest="support_mask", action="store_false", default=None,
                   help="evaluate the density on the whole sphere in every epoch. By default, from "
                        "epoch 2 on the density is restricted to a mask around the molecule (from the "
                        "model's own maps, dilated by --support-margin px): the per-image head runs "
                        "only there (faster) and noise outside the molecule is not fitted (better maps, "
                        "docs/benchmarks.md); the mask is saved with the model and applied when "
                        "decoding. A resumed run keeps the setting it was started with")
    m.add_argument("--support-threshold", type=float,
                   help=f"fraction of the peak density that counts as molecule (default {d['support_threshold']:g})")
    m.add_argument("--support-margin", dest="support_margin_px", type=int,
                   help=f"dilation of the mask in px of the training box (default {d['support_margin_px']})")
    m.add_argument("--variational", action="store_true", default=None,
                   help="variational latent (KL term, as cryoDRGN) instead of a deterministic one")
    r = p.add_argument_group("pose refinement (paper §3.2)")
    r.add_argument("--refine-poses", action="store_true", default=None,
                   help="learn poses with the orientation encoder: pose-only pre-training, then image "
                        "loss + λ·pose loss; refined poses go to RUN/poses/epoch_XXX.pkl")
    r.add_argument("--pose-pretrain-epochs", type=int,
                   help=f"passes of pose-only pre-training (default {d['pose_pretrain_epochs']})")
    r.add_argument("--pose-weight", type=float, help=f"λ, weight of the pose loss (default {d['pose_weight']:g})")
    r.add_argument("--pose-search", action="store_true", default=None,
                   help="refine poses by projection matching against the model's own maps after each "
                        "epoch: Fourier-slice projections at the particles' full box, coarse-to-fine "
                        "local search of rotations and shifts, MAP with a prior on the distance to the "
                        "input pose whose width is fitted to the data; training continues at the "
                        "refined poses (RUN/poses/epoch_XXX.pkl). Works on a CPU budget, unlike the "
                        "orientation encoder; exclusive with --refine-poses")
    r.add_argument("--pose-search-start", type=int,
                   help=f"first epoch after which --pose-search runs (default {d['pose_search_start']})")
    r.add_argument("--pose-search-radius", dest="pose_search_radius_deg", type=float, metavar="DEG",
                   help="search rotations within this many degrees of the current ones, about 3x the "
                        f"input poses' typical error (default {d['pose_search_radius_deg']:g})")
    r.add_argument("--pose-search-prior", dest="pose_search_prior_deg", type=float, metavar="DEG",
                   help="fix the width of the prior on the angle to the input rotation (degrees; 0: "
                        "none, maximum likelihood); default: fitted to the data at each search")
    r.add_argument("--pose-search-reference", dest="pose_search_reference", choices=POSE_SEARCH_REFERENCES,
                   help="what --pose-search matches the particles against: 'backprojection' (default), "
                        "gold-standard half maps reconstructed from the particles at their current poses "
                        "at the full box; 'model', the model's own maps (limited by --box)")
    r.add_argument("--pose-search-groups", dest="pose_search_groups", type=int, metavar="K",
                   help="references per search: K-means groups of the latents, one map each (default 4 "
                        "for backprojection, 16 for model); more groups follow the heterogeneity, "
                        "fewer give less noisy maps")
    r.add_argument("--gt-poses", help="ground-truth poses (.pkl/.star/.cs) to log rotation (rad) and shift "
                                      "(px) errors per epoch; never used for training")
    return p


_TRAIN_FIELDS = ("particles", "outdir", "poses", "ctf", "datadir", "ind", "gt_poses", "box_size",
                 "invert_data", "check_contrast", "epochs", "batch_size", "lr", "weight_decay", "kl_weight", "seed",
                 "max_minutes", "device", "num_workers", "refine_poses", "pose_pretrain_epochs",
                 "pose_weight", "pose_search", "pose_search_start", "pose_search_radius_deg",
                 "pose_search_prior_deg", "pose_search_reference", "pose_search_groups", "amp", "heldout_fraction",
                 "heldout_max", "early_stop_epochs", "support_mask", "support_threshold",
                 "support_margin_px")
_MODEL_OPTIONS = ("preset", "zdim", "feature_grid", "get_query", "variational")


def build_configs(args):
    """``(TrainConfig, ModelConfig or None)`` from parsed arguments; None = from the checkpoint."""
    from cryoformer.trainer import outputs
    from cryoformer.trainer.checkpoint import load_checkpoint
    from cryoformer.trainer.config import TrainConfig, default_model_config

    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    if args.resume:
        if any(getattr(args, k) is not None for k in _MODEL_OPTIONS):
            raise InputError(None, "--resume", "model options (--preset, --zdim, --feature-grid, "
                             "--variational) come from the run being resumed and cannot be given")
        saved = load_checkpoint(outputs.resume_checkpoint(os.path.abspath(args.outdir)))["train_config"]
        saved.update(given)
        return TrainConfig.from_dict(saved), None
    if args.particles is None:
        raise InputError(None, "PARTICLES", "the particle file is required (unless --resume)")
    config = TrainConfig(**given)
    from cryoformer.io.particles import open_particles

    box = config.box_size or open_particles(config.particles, datadir=config.datadir).box_size
    overrides = {}
    if args.feature_grid is not None:
        overrides["feature_grid_resolution"] = args.feature_grid
    if args.get_query is not None:
        overrides["get_query"] = args.get_query
    if args.variational:
        overrides["variational"] = True
    kwargs = {"zdim": args.zdim} if args.zdim is not None else {}
    if args.preset is not None:
        kwargs["preset"] = args.preset
    if box % 2 or box < 8:
        raise InputError(config.particles, "box size", f"training box must be even and >= 8, got {box}")
    return config, default_model_config(box, refine_poses=config.refine_poses, **kwargs, **overrides)


def run(args) -> int:
    from cryoformer.trainer import TrainingDiverged, train

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
    from cryoformer.trainer.run_dir import best_epoch

    best = best_epoch(result.run_dir) if result.epoch >= 1 else None
    if best is not None:
        print(f"lowest held-out image loss at epoch {best} (what `cryoformer analyze` uses by default)")
    if result.stopped == "time":
        print(f"stopped at the --max-minutes budget; continue with --resume: {where}")
        return 0
    if result.stopped == "early":
        print(f"stopped early: the held-out loss did not improve for {config.early_stop_epochs} "
              f"epochs: {where}")
        return 0
    print(f"training finished: {where}")
    return 0
