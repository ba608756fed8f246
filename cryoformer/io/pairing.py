"""Which image each metadata row belongs to, and metadata made consistent with its stack.

A ``.star`` (``rlnImageName = 12@stack.mrcs``) or ``.cs`` (``blob/path``, ``blob/idx``) names
the image of every row; a cryoDRGN ``.pkl`` does not. When metadata is paired with a separate
particle source (``train x.mrcs --poses x.star``), :func:`match_rows` decides how its rows map
to the images:

* the metadata *is* the particle file, or has no names (``.pkl``): row ``i`` is image ``i``
  (cryoDRGN's rule);
* its names refer to the given stacks (same resolved path, or the same file name): every row
  is matched to the image it names; a permutation reorders the metadata into stack order;
  a row naming an image that is not among the particles, or two rows naming one image, is an
  :class:`InputError` naming the row;
* its names refer to other files only (the stack was written from the metadata, e.g. by
  ``cryoformer downsample x.star``, which writes images in row order): row order is the only
  link; accepted, with a note to log — unless the names show that it cannot be trusted: a
  single named stack whose indices are a non-identity permutation of ``0..N-1`` could equally
  be the source the given stack was copied from image by image, so that is refused with what
  to pass instead.

:func:`load_paired_metadata` reads poses and CTF for a particle source through this, and
expresses the CTF at the stack's box (``D₀``, Å/px at ``D₀``) after checking that its
physical box ``D · Å/px`` is the stack's (:data:`~cryoformer.io.validate.PHYSICAL_BOX_RTOL`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cryoformer.errors import InputError, PathLike
from cryoformer.io.cryosparc import cs_image_locations, read_cs
from cryoformer.io.dispatch import load_ctf, load_poses
from cryoformer.io.guard import same_file
from cryoformer.io.star import image_locations, read_star
from cryoformer.io.validate import PHYSICAL_BOX_RTOL, PLACEHOLDER_PIXEL_SIZE, check_one_pixel_size
from cryoformer.metadata import CtfParameters, Poses

__all__ = ["RowMatch", "metadata_locations", "match_rows", "match_metadata_rows", "PairedMetadata",
           "load_paired_metadata", "optics_groups"]


@dataclass(frozen=True)
class RowMatch:
    """How the rows of a metadata file map to images.

    Attributes
    ----------
    order : np.ndarray or None
        ``[N]`` int64: the metadata row of image ``i``; ``None`` when row ``i`` is image ``i``.
    how : str
        ``"same file"``, ``"names"`` (matched by image name) or ``"row order"``.
    note : str or None
        One line worth logging (metadata reordered, or paired by row order despite names).
    """

    order: Optional[np.ndarray]
    how: str
    note: Optional[str] = None

    def apply(self, meta):
        """``meta`` (anything with ``subset``: Poses, CtfParameters) in image order."""
        return meta if self.order is None or meta is None else meta.subset(self.order)


def _name_field(path: str) -> str:
    return "_rlnImageName" if path.lower().endswith(".star") else "blob/path"


def metadata_locations(path: PathLike, datadir: Optional[PathLike] = None) -> Optional[List[Tuple[str, int]]]:
    """``[(absolute stack path, 0-based index)]`` per row of a ``.star``/``.cs``; ``None`` for a
    ``.pkl`` or a file without image names."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".star":
        star = read_star(path)
        return image_locations(star, datadir) if star.has("rlnImageName") else None
    if ext == ".cs":
        cs = read_cs(path)
        if "blob/path" not in cs.dtype.names or "blob/idx" not in cs.dtype.names:
            return None
        return cs_image_locations(cs, datadir, cs_path=path)
    return None


def optics_groups(path: PathLike) -> Optional[np.ndarray]:
    """``[N]`` optics group of every row of a ``.star`` (``rlnOpticsGroup``), else ``None``."""
    path = os.fspath(path)
    if not path.lower().endswith(".star"):
        return None
    star = read_star(path)
    return star.particles["rlnOpticsGroup"].astype(str).to_numpy() if star.has("rlnOpticsGroup") else None


def _file_ids(names: Sequence[str], files: Sequence[str]) -> np.ndarray:
    """For each of ``names``, the index in ``files`` of the same file (resolved path, else a
    unique equal base name), or -1."""
    real = {os.path.realpath(f): k for k, f in enumerate(files)}
    bases: dict = {}
    for k, f in enumerate(files):
        bases.setdefault(os.path.basename(f), []).append(k)
    out = np.full(len(names), -1, dtype=np.int64)
    for j, name in enumerate(names):
        k = real.get(os.path.realpath(name))
        if k is None:
            same = bases.get(os.path.basename(name), [])
            k = same[0] if len(same) == 1 else None
        if k is not None:
            out[j] = k
    return out


def _count_error(n_images: int, n_rows: int, images_desc: str, meta_path: str, named: bool) -> InputError:
    fix = (" (to use the particles a .star/.cs lists, pass it as PARTICLES: it names its images)"
           if named and n_rows < n_images else "")
    return InputError(meta_path, None, f"has {n_rows} particles but {images_desc} holds {n_images} images; "
                      f"they must match one to one{fix}")


def _match(files: Sequence[str], file_of: np.ndarray, index: np.ndarray, images_desc: str,
           meta_path: str, locations: Optional[List[Tuple[str, int]]], n_rows: int) -> RowMatch:
    """The core of :func:`match_rows` on plain arrays (``files[file_of[i]]``, ``index[i]``)."""
    n = int(file_of.shape[0])
    if n_rows != n:
        raise _count_error(n, n_rows, images_desc, meta_path, locations is not None)
    if locations is None:
        return RowMatch(None, "row order")
    field_name = _name_field(meta_path)
    names = sorted({name for name, _ in locations})
    name_id = {name: j for j, name in enumerate(names)}
    meta_name = np.fromiter((name_id[name] for name, _ in locations), dtype=np.int64, count=n_rows)  # [N]
    meta_index = np.fromiter((k for _, k in locations), dtype=np.int64, count=n_rows)  # [N]
    to_source = _file_ids(names, files)  # [names] source file id or -1
    meta_file = to_source[meta_name]  # [N]
    if (meta_file == file_of).all() and (meta_index == index).all():
        return RowMatch(None, "names")
    if (to_source < 0).all():
        return _row_order(names, meta_name, meta_index, images_desc, meta_path, field_name)
    unknown = np.nonzero(meta_file < 0)[0]
    if unknown.size:
        r = int(unknown[0])
        raise InputError(meta_path, field_name, f"row {r + 1} names image {meta_index[r] + 1} of "
                         f"{names[meta_name[r]]}, which is not among the particles ({images_desc}); "
                         f"{unknown.size} rows name other files: pass the metadata file itself as PARTICLES "
                         "(it names its images) or the stacks it names")
    # Match (stack, index) keys: [N] int64 on both sides.
    width = int(max(index.max(initial=0), meta_index.max(initial=0))) + 1
    source_key = file_of * width + index
    meta_key = meta_file * width + meta_index
    by_key = np.argsort(source_key, kind="stable")
    sorted_keys = source_key[by_key]
    if (np.diff(sorted_keys) == 0).any():
        i = int(by_key[np.nonzero(np.diff(sorted_keys) == 0)[0][0]])
        raise InputError(meta_path, field_name, f"the particles ({images_desc}) list image {index[i] + 1} of "
                         f"{os.path.basename(files[file_of[i]])} more than once (symmetry-expanded?), and "
                         "this file lists them in another order, so its rows cannot be matched to images "
                         "by name; pass this file itself as PARTICLES")
    pos = np.clip(np.searchsorted(sorted_keys, meta_key), 0, n - 1)
    found = sorted_keys[pos] == meta_key
    if not found.all():
        r = int(np.nonzero(~found)[0][0])
        fid = int(meta_file[r])
        held = int(np.sum(file_of == fid))
        raise InputError(meta_path, field_name, f"row {r + 1} names image {meta_index[r] + 1} of "
                         f"{os.path.basename(files[fid])}, which is not among the particles ({images_desc}: "
                         f"{held} images of that stack); the metadata describes other images")
    image = by_key[pos]  # [N] image of each metadata row
    counts = np.bincount(image, minlength=n)
    if (counts > 1).any():
        i = int(np.nonzero(counts > 1)[0][0])
        rows = np.nonzero(image == i)[0][:2] + 1
        raise InputError(meta_path, field_name, f"rows {rows[0]} and {rows[1]} both name image {index[i] + 1} "
                         f"of {os.path.basename(files[file_of[i]])}; each image needs exactly one row")
    order = np.empty(n, dtype=np.int64)
    order[image] = np.arange(n)
    if (order == np.arange(n)).all():
        return RowMatch(None, "names")
    return RowMatch(order, "names", f"{os.path.basename(meta_path)} lists the images of {images_desc} in "
                    f"another order; its rows were matched to the images by {field_name}")


def _row_order(names: List[str], meta_name: np.ndarray, meta_index: np.ndarray, images_desc: str,
               meta_path: str, field_name: str) -> RowMatch:
    """Names that mention none of the particle stacks: row order, unless that is ambiguous."""
    n = meta_index.size
    shown = os.path.basename(names[0]) + (f" and {len(names) - 1} other stacks" if len(names) > 1 else "")
    if len(names) == 1 and np.array_equal(np.sort(meta_index), np.arange(n)) \
            and not np.array_equal(meta_index, np.arange(n)):
        r = int(np.nonzero(meta_index != np.arange(n))[0][0])
        raise InputError(meta_path, field_name, f"the rows name the images of {shown} in another order (row "
                         f"{r + 1} is its image {meta_index[r] + 1}), but the particles given are "
                         f"{images_desc}, which the names do not mention, so it is ambiguous whether "
                         f"{images_desc} follows this file's rows (as `cryoformer downsample` of this file "
                         f"writes it) or the image order of {shown} (a copy of that stack). Pass this file "
                         "itself as PARTICLES (--datadir where its stacks are), or, if the images follow "
                         "its rows, convert it with `cryoformer parse-poses` / `parse-ctf` to .pkl files, "
                         "which are paired by row order")
    return RowMatch(None, "row order", f"{os.path.basename(meta_path)} names its images in {shown}, not in "
                    f"{images_desc}: its rows are paired with the images by row order (right when the "
                    "stack was written from it, e.g. by `cryoformer downsample`)")


def _describe(source, particles_path: Optional[PathLike]) -> str:
    if particles_path is not None:
        return os.path.basename(os.fspath(particles_path))
    return os.path.basename(source.files[0]) + (f" and {len(source.files) - 1} other stacks"
                                                if len(source.files) > 1 else "")


def match_rows(source, particles_path: Optional[PathLike], meta_path: PathLike, n_rows: int,
               datadir: Optional[PathLike] = None) -> RowMatch:
    """How the ``n_rows`` rows of ``meta_path`` map to the images of ``source`` (module docstring).

    Parameters
    ----------
    source : ImageSource
        The particles (from :func:`cryoformer.io.open_particles`).
    particles_path : path or None
        The file ``source`` was opened from (a metadata file identical to it pairs row by row).
    meta_path : path
        ``.pkl`` / ``.star`` / ``.cs``.
    n_rows : int
        Rows read from ``meta_path``.
    datadir : path, optional
        Where relative image names of ``meta_path`` are found (as for the particles).

    Raises
    ------
    InputError
        Count mismatch; a row naming an image not among the particles; two rows for one image;
        an ambiguous pairing (see the module docstring).
    """
    meta_path = os.fspath(meta_path)
    desc = _describe(source, particles_path)
    if particles_path is not None and same_file(particles_path, meta_path):
        if n_rows != len(source):
            raise _count_error(len(source), n_rows, desc, meta_path, False)
        return RowMatch(None, "same file")
    return _match(source.files, source.file_of, source.index_in_file, desc, meta_path,
                  metadata_locations(meta_path, datadir), n_rows)


def match_metadata_rows(reference_path: PathLike, meta_path: PathLike, n_reference: int, n_rows: int,
                        datadir: Optional[PathLike] = None) -> RowMatch:
    """How the rows of ``meta_path`` map to the rows of another metadata file (e.g. CTF rows to
    pose rows in ``cryoformer project``): by image names when both carry them, else by row order."""
    reference_path, meta_path = os.fspath(reference_path), os.fspath(meta_path)
    desc = os.path.basename(reference_path)
    if same_file(reference_path, meta_path):
        if n_rows != n_reference:
            raise _count_error(n_reference, n_rows, desc, meta_path, False)
        return RowMatch(None, "same file")
    ref = metadata_locations(reference_path, datadir)
    if ref is None:
        if n_rows != n_reference:
            raise _count_error(n_reference, n_rows, desc, meta_path, False)
        return RowMatch(None, "row order")
    files = sorted({name for name, _ in ref})
    ids = {name: k for k, name in enumerate(files)}
    file_of = np.array([ids[name] for name, _ in ref], dtype=np.int64)
    index = np.array([k for _, k in ref], dtype=np.int64)
    return _match(files, file_of, index, desc, meta_path, metadata_locations(meta_path, datadir), n_rows)


@dataclass(frozen=True)
class PairedMetadata:
    """Poses and CTF of a particle source, in image order, checked against the stack.

    Attributes
    ----------
    poses : Poses or None
        Shifts in pixels of the stack's box ``D₀``.
    ctf : CtfParameters or None
        Every row at the stack's box: column 0 = ``D₀``, column 1 = Å/px at ``D₀`` (the
        physical box of the file is kept), so every consumer may use either column.
    pixel_size_angstrom : float or None
        Å/px of the stack at ``D₀``: from the CTF when given, else from the source.
    notes : tuple of str
        Lines to log once every check has passed (how rows were paired, which pixel size won).
    """

    poses: Optional[Poses]
    ctf: Optional[CtfParameters]
    pixel_size_angstrom: Optional[float]
    notes: Tuple[str, ...] = field(default=())


def _header_pixel_sizes(source, rows: np.ndarray) -> Tuple[np.ndarray, bool]:
    """``[M]`` Å/px the stack header of each of ``rows`` records (NaN where it records none or
    the 1 Å placeholder), and whether any of them is the placeholder."""
    per_file = np.array([np.nan if s is None or s == PLACEHOLDER_PIXEL_SIZE else s
                         for s in source.stack_pixel_sizes], dtype=np.float64)
    files = source.file_of[rows]
    placeholder = any(source.stack_pixel_sizes[f] == PLACEHOLDER_PIXEL_SIZE for f in np.unique(files))
    return per_file[files], placeholder


def _stack_consistent_ctf(ctf: CtfParameters, ctf_path: str, source, rows: np.ndarray,
                          notes: List[str]) -> Tuple[CtfParameters, float]:
    """``ctf`` re-expressed at the stack's box, after checking the physical boxes agree."""
    d0 = source.box_size
    try:
        physical = check_one_pixel_size(ctf, ctf_path, rows)  # Å
    except InputError:  # read the groups (another pass over a big star) only to name them
        check_one_pixel_size(ctf, ctf_path, rows, group_labels=optics_groups(ctf_path))
        raise
    arr = ctf.array.astype(np.float64)  # [N, 9]
    header, placeholder = _header_pixel_sizes(source, rows)  # [M]
    row_box = arr[rows, 0] * arr[rows, 1]  # [M] Å
    with np.errstate(invalid="ignore"):
        bad = np.nonzero(np.abs(row_box / (d0 * header) - 1.0) > PHYSICAL_BOX_RTOL)[0]
    if bad.size:
        i = int(rows[bad[0]])
        d, apix, h = arr[i, 0], arr[i, 1], float(header[bad[0]])
        stack = os.path.basename(source.files[int(source.file_of[i])])
        raise InputError(ctf_path, "pixel size", f"particle {i}: the CTF is for D={d:g} px at {apix:g} Å/px, "
                         f"a box of {d * apix:.1f} Å, but {stack} holds {d0} px images at {h:g} Å/px (its "
                         f"header), a box of {d0 * h:.1f} Å ({bad.size} of {rows.size} particles disagree); a "
                         "downsampled stack keeps the physical box. Regenerate the CTF for these images "
                         f"(`cryoformer parse-ctf STAR -D {d0} --Apix {h:g}`), or fix the stack header if it "
                         "is wrong")
    first = int(rows[0])
    if np.isnan(header).all():
        if int(round(arr[first, 0])) != d0:
            notes.append(f"{os.path.basename(ctf_path)}: CTF for D={arr[first, 0]:g} px at {arr[first, 1]:g} "
                         f"Å/px and the stack records no pixel size: taking the {d0} px images to be the same "
                         f"{physical:.1f} Å box, downsampled ({physical / d0:.4g} Å/px)")
        elif placeholder and abs(physical / d0 - PLACEHOLDER_PIXEL_SIZE) > PHYSICAL_BOX_RTOL:
            notes.append(f"the stack header says 1 Å/px, which several tools write when they do not know "
                         f"it; using the CTF's {physical / d0:.4g} Å/px")
    out = ctf.array.copy()
    out[:, 1] = (arr[:, 0] * arr[:, 1] / d0).astype(np.float32)  # same physical box at D₀
    out[:, 0] = d0
    return CtfParameters(out, ctf.bfactor_angstrom2), physical / d0


def load_paired_metadata(source, particles_path: PathLike, poses_path: Optional[PathLike] = None,
                         ctf_path: Optional[PathLike] = None, datadir: Optional[PathLike] = None,
                         rows: Optional[np.ndarray] = None, cs_class: Optional[int] = None) -> PairedMetadata:
    """Read poses and CTF for ``source``, pair their rows with its images, check them against it.

    Parameters
    ----------
    source : ImageSource
    particles_path : path
        What ``source`` was opened from.
    poses_path, ctf_path : path, optional
        ``.pkl`` / ``.star`` / ``.cs``. A ``.pkl`` CTF keeps its own ``(D, Å/px)`` (only the
        physical box must match, as in cryoDRGN); a ``.star``/``.cs`` its ``rlnImageSize`` /
        ``blob/shape`` (the stack's box when it records none).
    datadir : path, optional
        Where relative image names of the metadata are found.
    rows : np.ndarray, optional
        ``[M]`` particles that will be used (``--ind``): pixel sizes must agree among them only.
    cs_class : int, optional
        The class whose poses to read from a cryoSPARC ``.cs`` with per-class alignments
        (:func:`~cryoformer.io.dispatch.load_poses`).

    Raises
    ------
    InputError
        See :func:`match_rows`; the CTF's physical box differs from the stack's
        (header pixel size × ``D₀``, when the header records one); the used particles have
        several pixel sizes (:func:`~cryoformer.io.validate.check_one_pixel_size`).
    """
    particles_path = os.fspath(particles_path)
    d0 = source.box_size
    rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    notes: List[str] = []
    ctf, apix, ctf_match = None, source.pixel_size_angstrom, None
    if ctf_path is not None:
        ctf_path = os.fspath(ctf_path)
        raw = load_ctf(ctf_path, default_box_size=d0)
        ctf_match = match_rows(source, particles_path, ctf_path, len(raw), datadir)
        notes += [ctf_match.note] if ctf_match.note else []
        ctf, apix = _stack_consistent_ctf(ctf_match.apply(raw), ctf_path, source, rows, notes)
    poses = None
    if poses_path is not None:
        poses_path = os.fspath(poses_path)
        # Origins in Å become pixels of the stack's own pixel size (a downsampled stack too).
        raw = load_poses(poses_path, box_size=d0, pixel_size_angstrom=apix, cs_class=cs_class)
        if ctf_match is not None and same_file(poses_path, ctf_path) and len(raw) == len(ctf):
            match = ctf_match  # one file: its names were matched already
        else:
            match = match_rows(source, particles_path, poses_path, len(raw), datadir)
        if match.note and match.note not in notes:
            notes.append(match.note)
        poses = match.apply(raw)
    return PairedMetadata(poses, ctf, apix, tuple(notes))
