"""``cryoformer analyze``: latent-space analysis of a trained run → ``RUN/analysis/``.

Also home of the helpers the other run-reading commands (``eval-vol``, ``evaluate``,
``export``) share: :func:`add_run_arguments` (``RUN [EPOCH]``, ``--epoch``) and :func:`open_run`.
"""

from __future__ import annotations

import argparse
import os

from cryoformer import options
from cryoformer.analysis.analyze import AnalyzeConfig, analysis_dir, analyze_run
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir
from cryoformer.trainer.run_dir import load_run

# Where the two spellings of the epoch are kept apart, so that open_run can refuse a disagreement.
_EPOCH_POSITIONAL, _EPOCH_FLAG = "epoch_positional", "epoch_flag"


def epoch_argument(text: str):
    """``--epoch`` values: an integer ≥ 0, ``best`` or ``last``."""
    if text in ("best", "last"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number, 'best' or 'last', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"epoch must be >= 0, got {value}")
    return value


class _EpochAction(argparse.Action):
    """Stores the epoch under its own name (positional or flag) and the one given as ``epoch``,
    so every command reads ``args.epoch`` whichever way it was written."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:  # the optional positional, not given
            return
        setattr(namespace, self.dest, values)
        namespace.epoch = values


def add_run_arguments(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The run directory, its epoch (``RUN [EPOCH]`` or ``--epoch``) and (optionally) ``--device``."""
    p.add_argument("run_dir", metavar="RUN", help="training run directory (written by `cryoformer train`)")
    p.add_argument(_EPOCH_POSITIONAL, metavar="EPOCH", nargs="?", type=epoch_argument, action=_EpochAction,
                   help="epoch to use, as --epoch (`RUN 12` = `RUN --epoch 12`)")
    p.add_argument("--epoch", dest=_EPOCH_FLAG, metavar="EPOCH", type=epoch_argument, action=_EpochAction,
                   help="epoch to use: a number (0 = after pose pre-training), 'best' or 'last' "
                        "(default: the epoch with the lowest held-out image loss when images were "
                        "held out, else the last finished one)")
    p.set_defaults(epoch=None)
    if device:
        p.add_argument("--device", default="cpu",
                       help="torch device for decoding: cpu, cuda, cuda:1, auto (default cpu)")


def open_run(args):
    """Load ``args.run_dir`` at ``args.epoch`` on ``args.device`` (errors are one-line InputErrors:
    the epoch given twice, differently; not a run directory, no finished epoch, a missing epoch,
    no CUDA device)."""
    positional, flag = getattr(args, _EPOCH_POSITIONAL, None), getattr(args, _EPOCH_FLAG, None)
    if positional is not None and flag is not None and positional != flag:
        raise InputError(None, "EPOCH", f"the epoch is given twice, as {positional} (positional) and as "
                                        f"--epoch {flag}; give one")
    return load_run(args.run_dir, epoch=args.epoch, device=getattr(args, "device", "cpu"))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="PCA, UMAP, K-means, cluster and traversal volumes, attention maps, flexible-region score",
        description=(
            "Analyse the latents of a trained run and write RUN/analysis/ (RUN/analysis.E/ for "
            "epoch E: `cryoformer analyze RUN E` or --epoch E): z.npy, pca.npy and the "
            "explained-variance plot, umap.npy (UMAP, with umap-learn: pip install "
            "'cryoformer[umap]'), kmeans_labels.npy and kmeans_centers.npy (each centre is the "
            "particle latent nearest to its K-means centroid, as cryoDRGN; clusters numbered along "
            "PC1), volumes at the centres (vol_kmeans_XX.mrc) and along PC1/PC2 between the 5th and "
            "95th percentiles (pcN/vol_XXX.mrc), attention maps at the centres (attn_kmeans_XX.mrc: "
            "C query channels then K attention-weight channels), the flexible-region score "
            "flex_score.mrc (in [0, 1]) and a one-page summary (summary.png, summary.html). Maps "
            "carry the voxel size in Å (training pixel size × training box / D). The directory is "
            "replaced only when complete."
        ),
    )
    add_run_arguments(p)
    options.add_arguments(p, AnalyzeConfig)
    p.add_argument("-o", "--outdir", help="output directory (default RUN/analysis or RUN/analysis.E)")
    return p


def _config(args) -> AnalyzeConfig:
    """The AnalyzeConfig of the options given (the others at their defaults), checked."""
    config = options.from_flat(AnalyzeConfig, options.given_values(args, AnalyzeConfig))
    for flag, value in (("--k", config.k), ("--n-traversal", config.n_traversal), ("--pcs", config.traversal_pcs),
                        ("--batch-size", config.batch_size)):
        if value < 1:
            raise InputError(None, flag, f"must be a positive integer, got {value}")
    if config.box_size is not None and (config.box_size < 2 or config.box_size % 2):
        raise InputError(None, "-D", f"decoding box must be even and >= 2, got {config.box_size}")
    if config.umap_fit_max < 3:
        raise InputError(None, "--umap-fit-max", f"must be at least 3 particles, got {config.umap_fit_max}")
    return config


def run(args) -> int:
    config = _config(args)
    loaded = open_run(args)
    # "last" names the directory by its number, so `--epoch N` finds it later too.
    out_dir = args.outdir or analysis_dir(args.run_dir, loaded.epoch if args.epoch == "last" else args.epoch)
    claim_output_dir(out_dir, loaded.input_files(), args.force, option="-o")
    record = analyze_run(loaded, out_dir, config)
    why = {"heldout": " (lowest held-out image loss)", "latest": " (latest)"}.get(loaded.selected_by, "")
    print(f"analysed epoch {record['epoch']}{why}: {record['n_particles']} particles, zdim {record['zdim']}, "
          f"{config.k} clusters (sizes {record['cluster_sizes']})")
    print(f"explained variance PC1…: {', '.join(f'{v:.3f}' for v in record['explained_variance_ratio'][:4])}")
    umap = record["umap"]
    if "file" in umap:
        print(f"UMAP: umap.npy, fitted on {umap['fit_particles']} of {record['n_particles']} particles")
    print(f"maps: {record['box_size_voxels']}³ voxels of {record['voxel_size_angstrom']:.3f} Å")
    print(f"output: {out_dir}/ (summary: {os.path.join(out_dir, 'summary.html')})")
    return 0
