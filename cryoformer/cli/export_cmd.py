"""``cryoformer export``: chosen particles back to RELION / cryoSPARC / cryoDRGN."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from cryoformer.analysis.analyze import analysis_dir
from cryoformer.analysis.export import EXPORT_FORMATS, POSE_CHOICES, export_run, load_selection, select_clusters
from cryoformer.cli.analyze_cmd import add_run_arguments, open_run
from cryoformer.errors import InputError
from cryoformer.io.guard import claim_output_file


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write chosen particles (K-means clusters or a selection) as .star, .cs, cryoSPARC index, "
             "cryoDRGN index or cryoDRGN poses, with the run's refined poses",
        description=(
            "Choose particles by K-means cluster (from `cryoformer analyze`) or by a selection file "
            "and write them for another tool. Indices always refer to the ORIGINAL particle stack "
            "(the run's --ind subset is mapped back). star: a RELION file; when the training input "
            "(or --particles-star) is a .star its rows are copied, every column kept, else a RELION "
            "3.1 file is written from the run's poses (origins in Å), CTF and stack (pixel size in "
            "Å/px). cs: a cryoSPARC .cs (the input's or --particles-cs rows, filtered, every field "
            "kept; else a new one). cs-index: a .npy of 0-based indices, plus the filtered .cs when "
            "the input (or --particles-cs) is a .cs. pkl: a cryoDRGN index pickle for --ind. "
            "poses-pkl: a cryoDRGN pose pickle of the chosen particles. Poses: the run's refined "
            "poses (trained with --pose-search or --refine-poses) when the epoch has them, else the "
            "input poses (--poses); refined poses are written in the file's own conventions "
            "(rlnAngleRot/Tilt/Psi in degrees and rlnOriginX/YAngst in Å, or alignments3D/pose and "
            "/shift in px of the blob)."
        ),
    )
    add_run_arguments(p, device=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--clusters", help="comma-separated K-means cluster ids, e.g. 1,3")
    which.add_argument("--selection", help="rows of the run's particles (order of z.npy): .npy of int "
                                           "indices or a bool mask, or a cryoDRGN .pkl")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    p.add_argument("--poses", choices=POSE_CHOICES, default=None,
                   help="poses to write (star, cs, poses-pkl, the .cs of cs-index): refined (the "
                        "epoch's RUN/poses/epoch_XXX.pkl) or input (default: refined when the epoch "
                        "has them, else input)")
    p.add_argument("--particles-star", help="RELION .star of the original particles to copy rows from")
    p.add_argument("--particles-cs", help="cryoSPARC .cs of the original particles to filter")
    p.add_argument("-o", "--out", required=True, help="output file (.star, .cs, .npy or .pkl)")
    return p


def _rows(args, n_particles: int, epoch: int):
    if args.selection:
        return load_selection(args.selection, n_particles)
    try:
        clusters = [int(c) for c in args.clusters.replace(" ", "").split(",") if c]
    except ValueError as exc:
        raise InputError(None, "--clusters", f"expected comma-separated integers, got {args.clusters!r}") from exc
    if not clusters:
        raise InputError(None, "--clusters", "no cluster given")
    folder = analysis_dir(args.run_dir, epoch if args.epoch == "last" else args.epoch)
    path = os.path.join(folder, "kmeans_labels.npy")
    again = f"`cryoformer analyze {args.run_dir}{'' if args.epoch is None else f' --epoch {args.epoch}'}`"
    if not os.path.isfile(path):
        raise InputError(path, None, f"no K-means labels; run {again} first")
    info_path = os.path.join(folder, "analysis.json")
    if os.path.isfile(info_path):  # the default analysis follows the best epoch, which can move
        with open(info_path, encoding="utf-8") as fh:
            analysed = json.load(fh).get("epoch")
        if analysed is not None and int(analysed) != epoch:
            raise InputError(path, None, f"these clusters are of epoch {analysed}, the run's selected "
                             f"epoch is now {epoch}; re-run {again} or pass --epoch {analysed}")
    labels = np.load(path, allow_pickle=False)
    if labels.shape != (n_particles,):
        raise InputError(path, None, f"{labels.size} labels but the run has {n_particles} particles; "
                         "re-run `cryoformer analyze`")
    return select_clusters(labels, clusters, path)


def run(args) -> int:
    if args.particles_star and args.particles_cs:
        raise InputError(None, "--particles-star", "give --particles-star or --particles-cs, not both")
    source = args.particles_star or args.particles_cs
    if args.particles_star and args.format != "star":
        raise InputError(None, "--particles-star", "only used with --format star")
    if args.particles_cs and args.format not in ("cs", "cs-index"):
        raise InputError(None, "--particles-cs", "only used with --format cs or cs-index")
    if source and not os.path.isfile(source):
        raise InputError(source, None, "file does not exist")
    out_is_cs = args.out.lower().endswith(".cs")
    if (args.format == "cs") != out_is_cs and args.format in ("cs", "cs-index"):
        # cryoSPARC imports only .cs names; cs-index puts its .cs beside -o, so -o must differ
        raise InputError(args.out, "-o", "--format cs writes a .cs file: name it NAME.cs" if args.format == "cs"
                         else "--format cs-index writes indices (NAME.npy) and NAME.cs beside them: "
                              "name -o NAME.npy")
    loaded = open_run(args)
    inputs = loaded.input_files() + [source, args.selection]
    outs = [args.out]
    if args.format == "cs-index" and (source or loaded.paths.get("particles") or "").lower().endswith(".cs"):
        outs.append(os.path.splitext(args.out)[0] + ".cs")  # the filtered .cs goes beside it
    for out in outs:
        claim_output_file(out, inputs, args.force, option="-o")
    rows = _rows(args, len(loaded.particle_indices), loaded.epoch)
    if rows.size == 0:
        raise InputError(args.selection, "--clusters" if args.clusters else None, "selects no particles")
    info = export_run(loaded, rows, args.format, args.out, source, poses=args.poses)
    poses = "" if info["poses"] is None else f", {info['poses']} poses"
    print(f"exported {info['n_particles']} particles ({info['how']}{poses}): {', '.join(info['files'])}")
    return 0
