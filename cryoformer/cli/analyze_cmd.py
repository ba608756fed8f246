"""``cryoformer analyze``: latent-space analysis of a trained run → ``RUN/analysis/``.

Also home of the helpers the other run-reading commands (``eval-vol``, ``evaluate``,
``export``) share: :func:`add_run_arguments` and :func:`open_run`.
"""

from __future__ import annotations

import argparse
import os

from cryoformer.analysis.analyze import AnalyzeConfig, analysis_dir, analyze_run
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_dir
from cryoformer.trainer.run_dir import load_run


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


def add_run_arguments(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The run directory, ``--epoch`` and (optionally) ``--device`` arguments."""
    p.add_argument("run_dir", metavar="RUN", help="training run directory (written by `cryoformer train`)")
    p.add_argument("--epoch", type=epoch_argument,
                   help="epoch to use: a number (0 = after pose pre-training), 'best' or 'last' "
                        "(default: the epoch with the lowest held-out image loss when images were "
                        "held out, else the last finished one)")
    if device:
        p.add_argument("--device", default="cpu",
                       help="torch device for decoding: cpu, cuda, cuda:1, auto (default cpu)")


def open_run(args):
    """Load ``args.run_dir`` at ``args.epoch`` on ``args.device`` (errors are one-line InputErrors:
    not a run directory, no finished epoch, a missing epoch, no CUDA device)."""
    return load_run(args.run_dir, epoch=args.epoch, device=getattr(args, "device", "cpu"))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="PCA, K-means, cluster and traversal volumes, attention maps, flexible-region score",
        description=(
            "Analyse the latents of a trained run and write RUN/analysis/ (RUN/analysis.E/ with "
            "--epoch E): z.npy, pca.npy and the explained-variance plot, kmeans_labels.npy and "
            "kmeans_centers.npy (each centre is the particle latent nearest to its K-means centroid, "
            "as cryoDRGN; clusters numbered along PC1), volumes at the centres (vol_kmeans_XX.mrc) "
            "and along PC1/PC2 between the 5th and 95th percentiles (pcN/vol_XXX.mrc), attention "
            "maps at the centres (attn_kmeans_XX.mrc: C query channels then K attention-weight "
            "channels), the flexible-region score flex_score.mrc (in [0, 1]) and a one-page "
            "summary (summary.png, summary.html). Maps carry the voxel size in Å (training pixel "
            "size × training box / D). The directory is replaced only when complete."
        ),
    )
    add_run_arguments(p)
    p.add_argument("--k", type=int, default=10, help="number of K-means clusters (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of K-means and of latent subsampling (default 0)")
    p.add_argument("-D", "--box", type=int, help="decoding box in voxels, even (default: the training box)")
    p.add_argument("--n-traversal", type=int, default=10, help="volumes per PC traversal (default 10)")
    p.add_argument("--pcs", type=int, default=2, help="traverse PC1…PCn (default 2)")
    p.add_argument("--flex-method", choices=("queries", "weights"), default="queries",
                   help="flexible-region score: variance of the conditioned queries across latents "
                        "(default) or of the per-voxel attention weights")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="volumes decoded together (default 4)")
    p.add_argument("-o", "--outdir", help="output directory (default RUN/analysis or RUN/analysis.E)")
    return p


def run(args) -> int:
    for name, value in (("--k", args.k), ("--n-traversal", args.n_traversal), ("--pcs", args.pcs),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(None, name, f"must be a positive integer, got {value}")
    if args.box is not None and (args.box < 2 or args.box % 2):
        raise InputError(None, "-D", f"decoding box must be even and >= 2, got {args.box}")
    loaded = open_run(args)
    # "last" names the directory by its number, so `--epoch N` finds it later too.
    out_dir = args.outdir or analysis_dir(args.run_dir, loaded.epoch if args.epoch == "last" else args.epoch)
    claim_output_dir(out_dir, loaded.input_files(), args.force, option="-o")
    config = AnalyzeConfig(k=args.k, seed=args.seed, n_traversal=args.n_traversal, traversal_pcs=args.pcs,
                           box_size=args.box, flex_method=args.flex_method, batch_size=args.batch_size)
    record = analyze_run(loaded, out_dir, config)
    why = {"heldout": " (lowest held-out image loss)", "latest": " (latest)"}.get(loaded.selected_by, "")
    print(f"analysed epoch {record['epoch']}{why}: {record['n_particles']} particles, zdim {record['zdim']}, "
          f"{args.k} clusters (sizes {record['cluster_sizes']})")
    print(f"explained variance PC1…: {', '.join(f'{v:.3f}' for v in record['explained_variance_ratio'][:4])}")
    print(f"maps: {record['box_size_voxels']}³ voxels of {record['voxel_size_angstrom']:.3f} Å")
    print(f"output: {out_dir}/ (summary: {os.path.join(out_dir, 'summary.html')})")
    return 0
