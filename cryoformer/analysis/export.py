"""Write chosen particles back for RELION, cryoSPARC and cryoDRGN.

Selections are made on the run's particles (rows of ``z.npy``, cluster labels, a lasso in the
latent scatter); exports always refer to the **original** particle stack, so rows are mapped
through the run's ``particle_indices`` (the training ``--ind`` subset) first
(:func:`to_original_indices`).

Formats
-------
* ``star``: a RELION file with only the chosen particles. When the input was a ``.star``, its
  particle rows are copied *verbatim* (every column, number formatting, optics block and
  comments kept; :func:`filter_star_rows`); otherwise a RELION 3.1 file is written from the
  poses, CTF and image locations.
* ``cs-index``: a ``.npy`` of 0-based indices into the original stack (cryoSPARC users feed it
  to a particle-selection script); when the input was a ``.cs``, the filtered ``.cs`` too.
* ``pkl``: a cryoDRGN index pickle (``--ind`` of every cryoDRGN command): an int64 array.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import starfile

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.atomic import atomic_open, atomic_path
from cryoformer.io.cryosparc import cs_image_locations, read_cs
from cryoformer.io.pairing import load_paired_metadata
from cryoformer.io.particles import open_particles, stack_paths_from_txt
from cryoformer.io.safe_pickle import load_pickle, save_pickle
from cryoformer.io.star import image_locations, read_star, write_star

__all__ = ["EXPORT_FORMATS", "select_clusters", "load_selection", "to_original_indices",
           "filter_star_rows", "write_star_subset", "write_cs_subset", "write_index_npy",
           "write_index_pkl", "image_names_for", "run_paths", "export_run"]

EXPORT_FORMATS = ("star", "cs-index", "pkl")


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


def _column(lines: List[str], start: int, end: int, name: str) -> Tuple[Optional[int], int]:
    """0-based column of ``name`` (``_rlnImageName``) in the loop header of ``lines[start:end]``,
    and the number of columns."""
    labels = [line.split()[0] for line in lines[start:end] if line.strip().startswith("_")]
    return (labels.index(name) if name in labels else None), len(labels)


def filter_star_rows(source: PathLike, out: PathLike, indices: np.ndarray,
                     datadir: Optional[PathLike] = None) -> int:
    """Copy a particle ``.star`` keeping only the particle rows ``indices`` (0-based), verbatim.

    Every other line (optics block, headers, comments) is copied unchanged, and each kept row is
    the original line, so the result differs from the input only by the dropped rows — except
    ``rlnImageName``, which is rewritten with absolute stack paths when the relative ones would
    not reach the same stacks from ``out``'s directory (:func:`moved_image_names`). The row
    count found in the text is checked against :func:`cryoformer.io.read_star`; files whose
    rows cannot be told apart line by line (key/value blocks) are rewritten through
    ``starfile`` instead, keeping every column. Returns the number of rows written.
    """
    source = os.path.abspath(require_file(source, "star file"))
    star = read_star(source)
    names = moved_image_names(star, out, datadir)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.max() >= len(star):
        raise InputError(source, None, f"particle index {int(idx.max())} is beyond the file's "
                         f"{len(star)} particles")
    with open(source, "r", encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    blocks = _star_blocks(lines)
    block_names = [b[0] for b in blocks]
    pick = "particles" if "particles" in block_names else next(
        (n for n in block_names if n != "optics"), None)
    block = next((b for b in blocks if b[0] == pick), None)
    rows = None if block is None else _loop_rows(lines, block[1], block[2])
    column, n_columns = (None, 0) if block is None else _column(lines, block[1], block[2], "_rlnImageName")
    # Rows are edited by whitespace-separated fields, so only where every row splits into
    # exactly the header's columns (no quoted values with spaces); otherwise through starfile.
    if (rows is None or len(rows) != len(star)
            or (names is not None and (column is None or any(len(lines[r].split()) != n_columns
                                                             for r in rows)))):
        return _rewrite_star_rows(source, out, idx, pick, names)
    if names is not None:
        for i, r in enumerate(rows):
            fields = lines[r].split()
            fields[column] = names[i]
            lines[r] = " ".join(fields) + "\n"
    drop = set(rows) - {rows[i] for i in idx}
    with atomic_open(out, "w") as fh:
        fh.writelines(line for j, line in enumerate(lines) if j not in drop)
        if lines and not lines[-1].endswith("\n"):
            fh.write("\n")
    return int(idx.size)


def _rewrite_star_rows(source: str, out: PathLike, idx: np.ndarray, block: Optional[str],
                       names: Optional[List[str]] = None) -> int:
    """Fallback of :func:`filter_star_rows` through ``starfile`` (all blocks kept); ``names``
    replace ``rlnImageName`` when given."""
    raw = starfile.read(source, always_dict=True)
    key = block if block in raw else next(k for k in raw if k != "optics")
    table = raw[key]
    if isinstance(table, dict):  # single-particle key/value block
        table = pd.DataFrame([table])
    if names is not None:
        table = table.copy()
        table["rlnImageName"] = names
    raw[key] = table.iloc[idx].reset_index(drop=True)
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


def export_run(run, rows: np.ndarray, fmt: str, out: PathLike, source: Optional[PathLike] = None) -> dict:
    """Write the run particles ``rows`` for another tool (formats in the module docstring).

    Parameters
    ----------
    run : TrainedRun
    rows : np.ndarray
        ``[M]`` rows of the run's particles (order of ``z.npy``).
    fmt : {"star", "cs-index", "pkl"}
    out : path
        Output file (``.star``, ``.npy``, ``.pkl``).
    source : path, optional
        Original metadata to copy rows from (``.star`` or ``.cs``); default the training input.

    Returns
    -------
    dict
        ``{"n_particles", "indices" (first few), "files": [...], "how"}``.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(None, "--format", f"must be one of {EXPORT_FORMATS}, got {fmt!r}")
    idx = to_original_indices(rows, run.particle_indices)
    paths = run_paths(run)
    src = os.fspath(source) if source is not None else paths.get("particles")
    ext = os.path.splitext(src or "")[1].lower()
    out = os.fspath(out)
    files, how = [out], ""
    if fmt == "pkl":
        write_index_pkl(out, idx)
        how = "cryoDRGN index pickle (0-based indices into the original stack)"
    elif fmt == "cs-index":
        write_index_npy(out, idx)
        how = "0-based indices into the original stack (.npy)"
        if ext == ".cs":
            cs_out = os.path.splitext(out)[0] + ".cs"
            write_cs_subset(src, cs_out, idx)
            files.append(cs_out)
            how += "; the input's .cs rows, filtered"
    elif ext == ".star":
        filter_star_rows(src, out, idx, paths.get("datadir") if source is None else None)
        how = f"rows of {src} copied verbatim"
    else:
        _write_new_star(run, paths, idx, out, ext)
        how = "new RELION 3.1 file from the run's poses, CTF and particle stack"
    return {"n_particles": int(idx.size), "files": files, "how": how}


def _write_new_star(run, paths: dict, idx: np.ndarray, out: str, ext: str) -> None:
    """A new RELION 3.1 file at ``out`` for the original particles ``idx``, from the run's
    inputs (``paths``, the training particles having extension ``ext``)."""
    stack = open_particles(paths["particles"], datadir=paths.get("datadir"))
    # Poses / CTF given with the particles (.cs input) when no separate file was used.
    pose_path = paths.get("poses") or paths["particles"]
    ctf_path = paths.get("ctf") or (paths["particles"] if ext == ".cs" else None)
    # Rows paired with the stack's images by name (a shuffled .star), as in training.
    meta = load_paired_metadata(stack, paths["particles"], pose_path, ctf_path,
                                paths.get("datadir"), rows=idx)
    poses, ctf = meta.poses, meta.ctf
    apix = meta.pixel_size_angstrom or (run.pixel_size_angstrom * run.box_size / stack.box_size)
    names = image_names_for(paths["particles"], paths.get("datadir"),
                            os.path.dirname(os.path.abspath(out)))
    if len(names) != len(poses):
        raise InputError(pose_path, None, f"{len(poses)} poses for {len(names)} particles")
    write_star_subset(out, idx, poses, ctf, names, apix)
