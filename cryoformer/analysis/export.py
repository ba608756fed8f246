"""Write chosen particles back for RELION, cryoSPARC and cryoDRGN.

Selections are made on the run's particles (rows of ``z.npy``, cluster labels, a lasso in the
latent scatter); exports always refer to the **original** particle stack, so rows are mapped
through the run's ``particle_indices`` (the training ``--ind`` subset) first
(:func:`to_original_indices`).

Formats
-------
* ``star``: a RELION file with only the chosen particles. When the input was a ``.star``, its
  particle rows are copied *verbatim* (every column, number formatting, optics block and
  comments kept; :func:`filter_star_rows`) but for the pose columns when other poses are
  written (below); otherwise a RELION 3.1 file is written from the
  poses, CTF and image locations.
* ``cs-index``: a ``.npy`` of 0-based indices into the original stack (cryoSPARC users feed it
  to a particle-selection script); when the input was a ``.cs``, the filtered ``.cs`` too.
* ``cs``: a cryoSPARC ``.cs`` (cryoSPARC imports it): the input's ``.cs`` rows, filtered,
  every field kept; otherwise a new table from the poses, CTF and image locations.
* ``pkl``: a cryoDRGN index pickle (``--ind`` of every cryoDRGN command): an int64 array.
* ``poses-pkl``: a cryoDRGN pose pickle ``(rot, trans)`` of the chosen particles, in the order
  of the index files (cryoDRGN's ``--poses`` with ``--ind``, or a stack of those particles).

Poses
-----
``star``, ``cs``, ``cs-index`` (its ``.cs``) and ``poses-pkl`` carry poses: the run's refined
poses (``RUN/poses/epoch_XXX.pkl``, written by ``--pose-search`` / ``--refine-poses``; shifts
in px of the original box ``D₀``) or the input poses (:func:`resolve_pose_choice`). Refined
poses replace the pose columns of the copied rows in the source's own conventions
(:func:`cryoformer.io.star.star_pose_columns`, :func:`cryoformer.io.cryosparc.with_cs_poses`);
every other column is kept. Input poses are the poses the run was trained from: the copied
rows' own, unless training read them from another file (``--poses``), whose poses then replace
them the same way; a ``.cs`` whose poses were read per class (``--cs-class``) is copied as it
is, its ``alignments_class_K`` fields included.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import starfile

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.atomic import atomic_open, atomic_path
from cryoformer.io.cryodrgn import read_poses_pkl, write_poses_pkl
from cryoformer.io.cryosparc import cs_image_locations, read_cs, with_cs_poses, write_cs
from cryoformer.io.guard import same_file
from cryoformer.io.pairing import load_paired_metadata
from cryoformer.io.particles import open_particles, stack_paths_from_txt
from cryoformer.io.safe_pickle import load_pickle, save_pickle
from cryoformer.io.star import image_locations, read_star, star_pose_columns, subset_star, write_star
from cryoformer.metadata import Poses

__all__ = ["EXPORT_FORMATS", "select_clusters", "load_selection", "to_original_indices",
           "filter_star_rows", "write_star_subset", "write_cs_subset", "write_index_npy",
           "write_index_pkl", "image_names_for", "run_paths", "export_run", "POSE_CHOICES",
           "resolve_pose_choice", "refined_poses"]

EXPORT_FORMATS = ("star", "cs", "cs-index", "pkl", "poses-pkl")
POSE_CHOICES = ("refined", "input")
# Formats whose output holds poses (cs-index: the .cs written beside the indices).
_WITH_POSES = ("star", "cs", "cs-index", "poses-pkl")


def select_clusters(labels: np.ndarray, clusters: Sequence[int], labels_path: Optional[str] = None,
                    ) -> np.ndarray:
    """Rows ``[M]`` (sorted) of the particles in any of ``clusters``; InputError if out of range."""
    labels = np.asarray(labels).reshape(-1)
    k = int(labels.max()) + 1 if labels.size else 0
    bad = [c for c in clusters if not 0 <= int(c) < k]
    if bad:
        raise InputError(labels_path, "--clusters", f"cluster id(s) {bad} out of range: the analysis "
                         f"has clusters 0…{k - 1}")
    return np.nonzero(np.isin(labels, np.asarray(clusters, dtype=np.int64)))[0].astype(np.int64)


def load_selection(path: PathLike, n_particles: int) -> np.ndarray:
    """Rows (sorted, unique) from a selection file.

    Parameters
    ----------
    path : path
        ``.npy`` (int rows, or a bool mask of length ``n_particles``) or ``.pkl`` (cryoDRGN
        index pickle). Rows index the run's particles, in the order of ``z.npy``.
    n_particles : int
        Particles in the run.
    """
    path = require_file(path, "selection file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            sel = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(path, None, f"not a readable .npy file ({exc})") from exc
    elif ext == ".pkl":
        sel = load_pickle(path)
    else:
        raise InputError(path, None, f"unknown selection extension {ext!r} (expected .npy or .pkl)")
    sel = np.asarray(sel).reshape(-1)
    if sel.dtype == bool:
        if sel.size != n_particles:
            raise InputError(path, None, f"boolean mask has {sel.size} entries but the run has "
                             f"{n_particles} particles")
        return np.nonzero(sel)[0].astype(np.int64)
    if not np.issubdtype(sel.dtype, np.integer):
        raise InputError(path, None, f"expected integer row indices or a boolean mask, found dtype {sel.dtype}")
    if sel.size and (sel.min() < 0 or sel.max() >= n_particles):
        raise InputError(path, None, f"indices must lie in 0…{n_particles - 1} (the run's particles), "
                         f"found {int(sel.min())}…{int(sel.max())}")
    return np.unique(sel).astype(np.int64)


def to_original_indices(rows: np.ndarray, particle_indices: np.ndarray) -> np.ndarray:
    """Map run rows ``[M]`` to indices into the original stack (sorted, 0-based int64)."""
    return np.sort(np.asarray(particle_indices, dtype=np.int64)[np.asarray(rows, dtype=np.int64)])


# ---------------------------------------------------------------------------------- STAR
_DATA = re.compile(r"^\s*data_(\S*)")


def _star_blocks(lines: List[str]):
    """``[(name, first_line, end_line)]`` of the ``data_`` blocks of a STAR text."""
    starts = [(m.group(1), i) for i, line in enumerate(lines) if (m := _DATA.match(line))]
    return [(name, i, starts[j + 1][1] if j + 1 < len(starts) else len(lines))
            for j, (name, i) in enumerate(starts)]


def _loop_rows(lines: List[str], start: int, end: int) -> Optional[List[int]]:
    """Line numbers of the data rows of the loop in ``lines[start:end]`` (None: not a loop)."""
    i = start + 1
    while i < end and lines[i].strip() != "loop_":
        if lines[i].strip().startswith("_"):
            return None  # a key/value block
        i += 1
    if i == end:
        return None
    i += 1
    while i < end and (lines[i].strip().startswith("_") or not lines[i].strip()):
        i += 1
    return [j for j in range(i, end) if lines[j].strip() and not lines[j].lstrip().startswith("#")]


def moved_image_names(star, out: PathLike, datadir: Optional[PathLike] = None) -> Optional[List[str]]:
    """``rlnImageName`` of every row of ``star`` as it must read from a file at ``out``.

    Relative stack paths are resolved from the star file's own place (or ``datadir``). From
    another directory they may name other files or none: RELION resolves them against the
    directory it runs in, cryoformer against the file's directory and its parents. Returns None
    when ``out`` sits beside the source and no ``datadir`` was needed (rows can be copied
    verbatim), else the names with absolute stack paths, which every reader resolves alike.
    """
    out_dir = os.path.dirname(os.path.abspath(os.fspath(out)))
    if datadir is None and os.path.realpath(out_dir) == os.path.realpath(os.path.dirname(star.path)):
        return None
    here = image_locations(star, datadir)
    entries = star.particles["rlnImageName"].astype(str)
    return [f"{entry.strip().split('@', 1)[0]}@{path}" for entry, (path, _) in zip(entries, here)]


def _columns(lines: List[str], start: int, end: int, names: Sequence[str]) -> Tuple[List[Optional[int]], int]:
    """0-based column of each of ``names`` (``_rlnImageName``; None where absent) in the loop
    header of ``lines[start:end]``, and the number of columns."""
    labels = [line.split()[0] for line in lines[start:end] if line.strip().startswith("_")]
    return [labels.index(name) if name in labels else None for name in names], len(labels)


def _format_value(value) -> str:
    """A STAR field: floats with 6 decimals (as :func:`cryoformer.io.star.write_star`)."""
    return f"{value:.6f}" if isinstance(value, (float, np.floating)) else str(value)


def filter_star_rows(source: PathLike, out: PathLike, indices: np.ndarray,
                     datadir: Optional[PathLike] = None,
                     columns: Optional[Dict[str, Sequence]] = None) -> int:
    """Copy a particle ``.star`` keeping only the particle rows ``indices`` (0-based), verbatim.

    Every other line (optics block, headers, comments) is copied unchanged, and each kept row is
    the original line, so the result differs from the input only by the dropped rows — except
    ``rlnImageName``, which is rewritten with absolute stack paths when the relative ones would
    not reach the same stacks from ``out``'s directory (:func:`moved_image_names`), and the
    ``columns`` given. The row count found in the text is checked against
    :func:`cryoformer.io.read_star`; files whose rows cannot be told apart line by line
    (key/value blocks, quoted values), or that lack a column of ``columns``, are rewritten
    through ``starfile`` instead, keeping every column. Returns the number of rows written.

    Parameters
    ----------
    columns : dict, optional
        ``rlnName`` → ``[M]`` values for the kept rows (in the order of ``indices``), replacing
        (or adding) those columns, e.g. refined poses (:func:`cryoformer.io.star.star_pose_columns`).
    """
    source = os.path.abspath(require_file(source, "star file"))
    star = read_star(source)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.max() >= len(star):
        raise InputError(source, None, f"particle index {int(idx.max())} is beyond the file's "
                         f"{len(star)} particles")
    names = moved_image_names(star, out, datadir)
    new = {f"_{k.lstrip('_')}": [_format_value(v) for v in np.asarray(vals)] for k, vals in (columns or {}).items()}
    if names is not None:
        new["_rlnImageName"] = [names[i] for i in idx]
    with open(source, "r", encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    blocks = _star_blocks(lines)
    block_names = [b[0] for b in blocks]
    pick = "particles" if "particles" in block_names else next(
        (n for n in block_names if n != "optics"), None)
    block = next((b for b in blocks if b[0] == pick), None)
    rows = None if block is None else _loop_rows(lines, block[1], block[2])
    where, n_columns = ([None] * len(new), 0) if block is None else _columns(lines, block[1], block[2], list(new))
    # Rows are edited by whitespace-separated fields, so only where every row splits into
    # exactly the header's columns (no quoted values with spaces); otherwise through starfile.
    if (rows is None or len(rows) != len(star)
            or (new and (None in where or any(len(lines[rows[i]].split()) != n_columns for i in idx)))):
        return _rewrite_star_rows(source, out, idx, pick, {k.lstrip("_"): v for k, v in new.items()})
    for j, i in enumerate(idx):
        fields = lines[rows[i]].split()
        for column, values in zip(where, new.values()):
            fields[column] = values[j]
        if new:
            lines[rows[i]] = " ".join(fields) + "\n"
    drop = set(rows) - {rows[i] for i in idx}
    with atomic_open(out, "w") as fh:
        fh.writelines(line for j, line in enumerate(lines) if j not in drop)
        if lines and not lines[-1].endswith("\n"):
            fh.write("\n")
    return int(idx.size)


def _rewrite_star_rows(source: str, out: PathLike, idx: np.ndarray, block: Optional[str],
                       columns: Optional[Dict[str, Sequence]] = None) -> int:
    """Fallback of :func:`filter_star_rows` through ``starfile`` (all blocks kept); ``columns``
    (``rlnName`` → values of the kept rows) replace or add columns."""
    raw = starfile.read(source, always_dict=True)
    key = block if block in raw else next(k for k in raw if k != "optics")
    table = raw[key]
    if isinstance(table, dict):  # single-particle key/value block
        table = pd.DataFrame([table])
    table = table.iloc[idx].reset_index(drop=True)
    # starfile keeps the file's own spelling of the labels (with or without "_").
    prefix = "_" if any(str(c).startswith("_") for c in table.columns) else ""
    for name, values in (columns or {}).items():
        table[prefix + name] = list(values)
    raw[key] = table
    with atomic_path(out, suffix=".star") as tmp:
        starfile.write(raw, tmp)
    return int(idx.size)


def image_names_for(particles: PathLike, datadir: Optional[PathLike], out_dir: str) -> List[str]:
    """RELION ``rlnImageName`` of every original particle (``0001@stack.mrcs``), stacks relative to
    ``out_dir`` (``.mrcs``/``.mrc``/``.txt``/``.cs`` inputs)."""
    particles = os.fspath(particles)
    ext = os.path.splitext(particles)[1].lower()
    if ext == ".cs":
        locations = cs_image_locations(read_cs(particles), datadir, cs_path=particles)
    elif ext == ".txt":
        locations = []
        for stack in stack_paths_from_txt(particles, datadir):  # the resolution open_particles uses
            locations += [(stack, k) for k in range(len(open_particles(stack)))]
    else:
        locations = [(os.path.abspath(particles), k) for k in range(len(open_particles(particles)))]
    return [f"{k + 1:06d}@{os.path.relpath(path, out_dir)}" for path, k in locations]


def write_star_subset(out: PathLike, indices: np.ndarray, poses, ctf, image_names: Sequence[str],
                      pixel_size_angstrom: float) -> None:
    """A new RELION 3.1 file for the particles ``indices`` of ``poses``/``ctf``/``image_names``."""
    idx = np.asarray(indices, dtype=np.int64)
    write_star(out, None if poses is None else poses.subset(idx), None if ctf is None else ctf.subset(idx),
               [image_names[i] for i in idx], pixel_size_angstrom)


def write_cs_subset(source: PathLike, out: PathLike, indices: np.ndarray) -> None:
    """The rows ``indices`` of a cryoSPARC ``.cs`` table (every field kept)."""
    cs = read_cs(source)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.max() >= len(cs):
        raise InputError(source, None, f"particle index {int(idx.max())} is beyond the file's {len(cs)} rows")
    with atomic_open(out, "wb") as fh:
        np.save(fh, cs[idx], allow_pickle=False)


def write_index_npy(out: PathLike, indices: np.ndarray) -> None:
    """0-based indices into the original stack as an int64 ``.npy``."""
    with atomic_open(out, "wb") as fh:
        np.save(fh, np.asarray(indices, dtype=np.int64), allow_pickle=False)


def write_index_pkl(out: PathLike, indices: np.ndarray) -> None:
    """cryoDRGN index pickle (what ``--ind`` reads): an int64 numpy array."""
    save_pickle(np.asarray(indices, dtype=np.int64), out)


def run_paths(run) -> dict:
    """The run's input paths (``particles``, ``poses``, ``ctf``, ``datadir``) as a dict."""
    paths = run.paths
    if not isinstance(paths, dict):
        paths = {k: getattr(paths, k) for k in ("particles", "poses", "ctf", "datadir") if hasattr(paths, k)}
    return {k: (None if v is None else os.fspath(v)) for k, v in paths.items()}


def resolve_pose_choice(run, choice: Optional[str]) -> str:
    """``"refined"`` or ``"input"``: which poses an export writes.

    ``None`` (the default) means refined when the loaded epoch has them
    (``run.refined_poses_path``), else input. ``"refined"`` for an epoch without them is an
    InputError naming the run and what to do.
    """
    refined = getattr(run, "refined_poses_path", None)
    if choice is None:
        return "refined" if refined else "input"
    if choice not in POSE_CHOICES:
        raise InputError(None, "--poses", f"must be one of {POSE_CHOICES}, got {choice!r}")
    if choice == "refined" and not refined:
        raise InputError(getattr(run, "run_dir", None), "--poses", f"epoch {getattr(run, 'epoch', '?')} has "
                         "no refined poses (RUN/poses/epoch_XXX.pkl: the run was trained without "
                         "--pose-search or --refine-poses); export the input poses (--poses input) or "
                         "choose an epoch that has them (--epoch)")
    return choice


def refined_poses(run, indices: np.ndarray) -> Poses:
    """The run's refined poses of the original particles ``indices`` ``[M]``, shifts in px of
    the original box ``D₀`` (``run.original_box_size``).

    Row ``r`` of ``RUN/poses/epoch_XXX.pkl`` is the particle ``run.particle_indices[r]``.
    """
    path = run.refined_poses_path
    box = int(run.original_box_size)
    poses = read_poses_pkl(path, box_size=box)
    order = np.asarray(run.particle_indices, dtype=np.int64)
    if len(poses) != order.size:
        raise InputError(path, None, f"{len(poses)} poses but the run has {order.size} particles; the "
                         "run directory is inconsistent (choose another --epoch)")
    row_of = np.full(int(order.max()) + 1 if order.size else 0, -1, dtype=np.int64)
    row_of[order] = np.arange(order.size)
    idx = np.asarray(indices, dtype=np.int64)
    return Poses(poses.rotations[row_of[idx]], poses.shifts_px[row_of[idx]], box)


def _replacement_poses(run, paths: dict, idx: np.ndarray, which: str, src: str
                       ) -> Tuple[Optional[Poses], Optional[float]]:
    """Poses to write into the rows ``idx`` copied from ``src`` (and the Å/px at ``D₀``), or
    ``None`` where the rows already hold them: input poses read from ``src`` itself."""
    pose_source = paths.get("poses") or paths.get("particles")
    if which == "input" and (pose_source is None or same_file(pose_source, src)):
        return None, None
    return _chosen_poses(run, paths, idx, which)


def _chosen_poses(run, paths: dict, idx: np.ndarray, which: str) -> Tuple[Poses, Optional[float]]:
    """Poses of the original particles ``idx`` (px of ``D₀``) and the Å/px at ``D₀`` if known."""
    apix = getattr(run, "original_pixel_size_angstrom", None)
    if which == "refined":
        return refined_poses(run, idx), apix
    meta = _input_metadata(run, paths, idx, with_ctf=False)
    return meta.poses.subset(idx), meta.pixel_size_angstrom or apix


def _input_metadata(run, paths: dict, idx: np.ndarray, with_ctf: bool = True):
    """The run's input poses (and CTF) paired with its stack's images, as in training (the
    cryoSPARC class it read poses of, ``--cs-class``, included)."""
    # run-like objects without a training record (a cryoDRGN run's paths) read no class
    train_config = getattr(run, "train_config", None)
    cs_class = None if train_config is None else train_config.data.cs_class
    stack = open_particles(paths["particles"], datadir=paths.get("datadir"))
    ext = os.path.splitext(paths["particles"])[1].lower()
    # Poses / CTF given with the particles (.star/.cs input) when no separate file was used.
    pose_path = paths.get("poses") or paths["particles"]
    ctf_path = (paths.get("ctf") or (paths["particles"] if ext in (".star", ".cs") else None)) if with_ctf else None
    return load_paired_metadata(stack, paths["particles"], pose_path, ctf_path, paths.get("datadir"), rows=idx,
                                cs_class=cs_class)


def export_run(run, rows: np.ndarray, fmt: str, out: PathLike, source: Optional[PathLike] = None,
               poses: Optional[str] = None) -> dict:
    """Write the run particles ``rows`` for another tool (formats in the module docstring).

    Parameters
    ----------
    run : TrainedRun
    rows : np.ndarray
        ``[M]`` rows of the run's particles (order of ``z.npy``).
    fmt : {"star", "cs", "cs-index", "pkl", "poses-pkl"}
    out : path
        Output file (``.star``, ``.cs``, ``.npy``, ``.pkl``).
    source : path, optional
        Original metadata to copy rows from (``.star`` or ``.cs``); default the training input.
    poses : {"refined", "input"}, optional
        Which poses formats with poses write (:func:`resolve_pose_choice`; default refined
        when the epoch has them).

    Returns
    -------
    dict
        ``{"n_particles", "files": [...], "how", "poses"}``.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(None, "--format", f"must be one of {EXPORT_FORMATS}, got {fmt!r}")
    idx = to_original_indices(rows, run.particle_indices)
    paths = run_paths(run)
    src = os.fspath(source) if source is not None else paths.get("particles")
    ext = os.path.splitext(src or "")[1].lower()
    holds_poses = fmt in _WITH_POSES and (fmt != "cs-index" or ext == ".cs")
    if poses is not None and not holds_poses:
        raise InputError(None, "--poses", f"--format {fmt} writes no poses" + (
            " (no .cs input to filter)" if fmt == "cs-index" else ""))
    which = resolve_pose_choice(run, poses) if holds_poses else None
    out = os.fspath(out)
    files, how = [out], _write_format(run, paths, idx, fmt, out, src, ext, which, source is None)
    if fmt == "cs-index" and ext == ".cs":
        files.append(os.path.splitext(out)[0] + ".cs")
    label = None if which is None else (f"refined (epoch {run.epoch})" if which == "refined" else "input")
    return {"n_particles": int(idx.size), "files": files, "how": how, "poses": label}


def _write_format(run, paths: dict, idx: np.ndarray, fmt: str, out: str, src: Optional[str], ext: str,
                  which: Optional[str], from_run: bool) -> str:
    """Write ``out`` (and a ``.cs`` beside it for ``cs-index``); returns what was written."""
    if fmt == "pkl":
        write_index_pkl(out, idx)
        return "cryoDRGN index pickle (0-based indices into the original stack)"
    if fmt == "poses-pkl":
        chosen, _ = _chosen_poses(run, paths, idx, which)
        write_poses_pkl(chosen, out)
        return f"cryoDRGN pose pickle of the chosen particles (D={chosen.box_size}, order of the index file)"
    if fmt == "cs-index":
        write_index_npy(out, idx)
        if ext != ".cs":
            return "0-based indices into the original stack (.npy)"
        _write_cs_rows(run, paths, idx, os.path.splitext(out)[0] + ".cs", src, which)
        return "0-based indices into the original stack (.npy); the input's .cs rows, filtered"
    if fmt == "cs":
        if ext == ".cs":
            _write_cs_rows(run, paths, idx, out, src, which)
            return f"rows of {src}, filtered, every field kept"
        _write_new_cs(run, paths, idx, out, which)
        return "new cryoSPARC .cs from the run's poses, CTF and particle stack"
    if ext == ".star":
        chosen, apix = _replacement_poses(run, paths, idx, which, src)
        columns = None if chosen is None else star_pose_columns(subset_star(read_star(src), idx), chosen, apix)
        filter_star_rows(src, out, idx, paths.get("datadir") if from_run else None, columns=columns)
        return f"rows of {src} copied" + (" verbatim" if columns is None else ", pose columns replaced")
    _write_new_star(run, paths, idx, out, which)
    return "new RELION 3.1 file from the run's poses, CTF and particle stack"


def _write_cs_rows(run, paths: dict, idx: np.ndarray, out: str, src: str, which: str) -> None:
    """The rows ``idx`` of the ``.cs`` ``src``; ``alignments3D`` set from the chosen poses
    unless they are the file's own (:func:`_replacement_poses`)."""
    chosen, _ = _replacement_poses(run, paths, idx, which, src)
    if chosen is None:
        write_cs_subset(src, out, idx)
        return
    cs = read_cs(src)
    if idx.size and idx.max() >= len(cs):
        raise InputError(src, None, f"particle index {int(idx.max())} is beyond the file's {len(cs)} rows")
    table = with_cs_poses(cs[idx], chosen)
    with atomic_open(out, "wb") as fh:
        np.save(fh, table, allow_pickle=False)


def _locations(paths: dict, out: str) -> List[str]:
    """``rlnImageName`` of every original particle, stacks relative to ``out``'s directory."""
    return image_names_for(paths["particles"], paths.get("datadir"), os.path.dirname(os.path.abspath(out)))


def _write_new_star(run, paths: dict, idx: np.ndarray, out: str, which: Optional[str] = None) -> None:
    """A new RELION 3.1 file at ``out`` for the original particles ``idx``, from the run's
    inputs (``paths``) and the chosen poses (``which``)."""
    meta = _input_metadata(run, paths, idx)
    poses, ctf = meta.poses, meta.ctf
    apix = meta.pixel_size_angstrom or (run.pixel_size_angstrom * run.box_size / run.original_box_size)
    names = _locations(paths, out)
    if len(names) != len(poses):
        raise InputError(paths.get("poses") or paths["particles"], None,
                         f"{len(poses)} poses for {len(names)} particles")
    if which == "refined":
        poses = _replace_rows(poses, idx, refined_poses(run, idx))
    write_star_subset(out, idx, poses, ctf, names, apix)


def _replace_rows(poses: Poses, idx: np.ndarray, chosen: Poses) -> Poses:
    """``poses`` with rows ``idx`` replaced by ``chosen`` (same box)."""
    rotations, shifts = poses.rotations.copy(), poses.shifts_px.copy()
    rotations[idx], shifts[idx] = chosen.rotations, chosen.shifts_px
    return Poses(rotations, shifts, poses.box_size)


def _write_new_cs(run, paths: dict, idx: np.ndarray, out: str, which: Optional[str]) -> None:
    """A new cryoSPARC ``.cs`` at ``out`` for the original particles ``idx`` (stack paths
    absolute, so cryoSPARC finds them from wherever it imports the file)."""
    meta = _input_metadata(run, paths, idx)
    apix = meta.pixel_size_angstrom or (run.pixel_size_angstrom * run.box_size / run.original_box_size)
    chosen = refined_poses(run, idx) if which == "refined" else meta.poses.subset(idx)
    stack = open_particles(paths["particles"], datadir=paths.get("datadir"))
    blob_paths = [stack.files[int(stack.file_of[i])] for i in idx]
    ctf = None if meta.ctf is None else meta.ctf.subset(idx)
    write_cs(out, chosen, ctf, blob_paths, stack.index_in_file[idx], pixel_size_angstrom=apix,
             box_size=stack.box_size)
