"""Lazy, memory-mapped particle image sources and an atomic chunked stack writer.

An :class:`ImageSource` maps particle ``i`` to ``(stack file, index in stack)`` and reads
images on demand through ``mrcfile.mmap`` (read-only), so stacks larger than memory can be
used for training. The pages of images already copied out are released from the process
(they stay in the kernel's page cache), so a pass over a 30 GB stack does not leave it
resident (docs/benchmarks.md, "A stack larger than memory"). Stack headers are read once when
the source is opened, which is where missing stacks, non-square images and out-of-range
indices are reported. At most
:data:`MAX_OPEN_STACKS` stacks are kept mapped at a time (a RELION project can have one stack
per micrograph, more than the open-file limit).

Images are returned as ``[n, D, D]`` float32 ``[y, x]`` arrays (docs/conventions.md).
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple

import mrcfile
import numpy as np

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io.atomic import atomic_path
from cryoformer.io.cryosparc import cs_image_locations, read_cs
from cryoformer.io.guard import require_free_space
from cryoformer.io.star import image_locations, read_star, star_pixel_size
from cryoformer.io.validate import check_images

__all__ = ["ImageSource", "open_particles", "StackWriter", "write_stack", "MAX_OPEN_STACKS"]

MAX_OPEN_STACKS = 64
# Images copied out of a memory-mapped stack before their pages are released (ImageSource.images):
# with 2 MiB folios, at most 32 MiB of a stack is briefly resident for images spread over it.
RELEASE_GROUP = 16


def _stack_header(path: str, referenced_by: Optional[str], field: Optional[str]) -> Tuple[int, int, float]:
    """``(n_images, D, pixel size Å)`` of a stack from its header; InputError if unusable."""
    who, what = (path, None) if referenced_by is None else (referenced_by, field)
    if not os.path.isfile(path):
        raise InputError(who, what, f"image stack {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
                h = mrc.header
                nx, ny, nz, mode = int(h.nx), int(h.ny), int(h.nz), int(h.mode)
                apix = float(mrc.voxel_size.x)
                data_bytes = os.path.getsize(path) - mrc.header.nbytes - int(h.nsymbt)
    except (ValueError, OSError) as exc:
        raise InputError(path, None, f"not a readable MRC image stack ({exc})") from exc
    if nx != ny:
        raise InputError(path, None, f"images are {nx}×{ny} pixels but square images are required")
    itemsize = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}.get(mode)
    if itemsize is None:
        raise InputError(path, "mode", f"MRC mode {mode} is not a real-valued image stack")
    if data_bytes < nx * ny * nz * itemsize:
        raise InputError(path, None, f"file is truncated: the header promises {nz} images of {nx}×{ny} "
                         f"but only {max(data_bytes, 0)} data bytes are present")
    return nz, nx, apix


class ImageSource:
    """Particle images from one or more MRC stacks, read lazily.

    Use :func:`open_particles` to build one. Picklable (open maps are not carried over), so it
    can be handed to ``torch.utils.data.DataLoader`` workers.

    Attributes
    ----------
    box_size : int
        Image size ``D`` in pixels.
    pixel_size_angstrom : float or None
        Å/px from the metadata (star/cs) or the first stack header; ``None`` if unrecorded.
    files : list of str
        Absolute paths of the stacks.
    stack_pixel_sizes : list of (float or None)
        Å/px each stack's header records (``None`` where it records none).
    """

    def __init__(self, files: Sequence[str], file_of: np.ndarray, index_in_file: np.ndarray,
                 box_size: int, pixel_size_angstrom: Optional[float],
                 stack_pixel_sizes: Optional[Sequence[Optional[float]]] = None):
        self.files = list(files)
        self._file_of = np.asarray(file_of, dtype=np.int64)
        self._index = np.asarray(index_in_file, dtype=np.int64)
        self.box_size = int(box_size)
        self.pixel_size_angstrom = pixel_size_angstrom
        self.stack_pixel_sizes = list(stack_pixel_sizes) if stack_pixel_sizes is not None else [None] * len(files)
        self._open: "OrderedDict[int, object]" = OrderedDict()

    @property
    def file_of(self) -> np.ndarray:
        """``[N]`` int64: which of :attr:`files` holds particle ``i``."""
        return self._file_of

    @property
    def index_in_file(self) -> np.ndarray:
        """``[N]`` int64: 0-based index of particle ``i`` in its stack."""
        return self._index

    def __len__(self) -> int:
        return int(self._file_of.shape[0])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _data(self, file_id: int) -> np.ndarray:
        """The mapped ``[n, D, D]`` data of stack ``file_id`` (LRU cache of open maps)."""
        if file_id in self._open:
            self._open.move_to_end(file_id)
        else:
            if len(self._open) >= MAX_OPEN_STACKS:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._open[file_id] = mrcfile.mmap(self.files[file_id], mode="r", permissive=False)
        data = self._open[file_id].data
        return data.reshape((-1,) + data.shape[-2:])

    def stack_data(self, file_id: int) -> np.ndarray:
        """The read-only memory map ``[n, D, D]`` (file dtype) of stack ``files[file_id]``; give
        the pages back with :meth:`release` once the images are copied out."""
        return self._data(file_id)

    def release(self, file_id: int, rows: np.ndarray) -> None:
        """Drop images ``rows`` (sorted, in-file indices) of stack ``files[file_id]`` from this
        process's resident memory; they stay in the kernel's page cache (:func:`_release_pages`)."""
        if file_id in self._open:
            _release_pages(self._data(file_id), np.asarray(rows, dtype=np.int64))

    def images(self, indices: Sequence[int]) -> np.ndarray:
        """Images ``indices`` (any order, repeats allowed) as ``[n, D, D]`` float32, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        idx = idx % max(n, 1)
        out = np.empty((idx.size, self.box_size, self.box_size), dtype=np.float32)
        files = self._file_of[idx]
        for file_id in np.unique(files):
            where = np.nonzero(files == file_id)[0]
            local = self._index[idx[where]]
            # Read each needed image once, in increasing order (sequential on disk).
            uniq, inverse = np.unique(local, return_inverse=True)
            data = self._data(int(file_id))
            # rows already in increasing order, each once (a chunk, a sorted batch): no reordering copy
            in_order = uniq.size == local.size and bool(np.all(where == np.arange(where[0], where[0] + where.size)))
            in_order = in_order and bool(np.all(np.diff(local) > 0))
            read = out[where[0]:where[0] + where.size] if in_order else \
                np.empty((uniq.size,) + data.shape[1:], dtype=np.float32)  # [u, D, D]
            # A fault maps a whole folio of the page cache (up to 2 MiB) into the process, so
            # 256 images spread over a stack briefly made 200 MiB of it resident before the
            # release: images are copied and released RELEASE_GROUP at a time.
            for lo in range(0, uniq.size, RELEASE_GROUP):
                rows = uniq[lo:lo + RELEASE_GROUP]
                read[lo:lo + rows.size] = data[rows]
                _release_pages(data, rows)
            if not in_order:
                out[where] = read[inverse]
        return out

    def chunks(self, chunk_size: int = 1024, check: bool = True) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(start, images[start:start + chunk_size])`` over the whole source in order.

        With ``check`` (default) a chunk holding a NaN or infinite pixel raises
        :class:`InputError` naming the stack and the particles, before it is yielded: a copy
        or downsampled stack never carries NaN on.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        for start in range(0, len(self), chunk_size):
            positions = np.arange(start, min(start + chunk_size, len(self)))
            images = self.images(positions)
            if check:
                check_images(self, images, positions)
            yield start, images

    def close(self) -> None:
        """Unmap every open stack (reading again reopens them)."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _release_pages(data: np.ndarray, rows: np.ndarray) -> None:
    """Drop the pages of images ``rows`` (sorted) of a mapped stack ``data`` ``[n, D, D]`` from
    this process's memory once they are copied out.

    A mapped file's pages count in the process's resident memory once touched: one pass over a
    30 GB stack (the latents after every epoch) left 23 GB resident on a 24 GB machine. The
    pages stay in the kernel's page cache, so reading them again costs no disk access; they
    simply stop being this process's. Does nothing where the mapping is not reachable."""
    mapping = getattr(data, "_mmap", None)
    base = data
    while mapping is None and getattr(base, "base", None) is not None:
        base = base.base
        mapping = getattr(base, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not rows.size:
        return
    offset = int(getattr(base, "offset", 0))  # the data's start in the file (after the headers)
    item = int(np.prod(data.shape[1:])) * data.dtype.itemsize  # bytes per image
    starts = offset + rows.astype(np.int64) * item  # [r]
    ends = starts + item
    # whole pages only: a page shared with a neighbouring image that is not being released
    # would be dropped too, which is harmless (it is re-read from the cache when needed)
    first = (starts // mmap.PAGESIZE) * mmap.PAGESIZE
    last = np.minimum(-(-ends // mmap.PAGESIZE) * mmap.PAGESIZE, len(mapping))
    lo, hi = int(first[0]), int(last[0])
    for a, b in zip(first[1:].tolist(), last[1:].tolist()):
        if a > hi:  # a gap: release the run so far
            mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            lo = a
        hi = max(hi, b)
    mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _from_locations(locations: Sequence[Tuple[str, int]], meta_path: str, field: str,
                    pixel_size_angstrom: Optional[float]) -> ImageSource:
    """Build a source from ``(file, index)`` pairs, validating every referenced stack."""
    files: List[str] = []
    file_ids = {}
    file_of = np.empty(len(locations), dtype=np.int64)
    index = np.empty(len(locations), dtype=np.int64)
    for i, (name, k) in enumerate(locations):
        if name not in file_ids:
            file_ids[name] = len(files)
            files.append(name)
        file_of[i], index[i] = file_ids[name], k
    if not files:
        raise InputError(meta_path, field, "no particles listed")
    headers = [_stack_header(f, meta_path, field) for f in files]
    sizes = {h[1] for h in headers}
    if len(sizes) != 1:
        _refuse_mixed_sizes(files, headers, file_of, meta_path, field)
    counts = np.array([h[0] for h in headers])
    bad = np.nonzero((index < 0) | (index >= counts[file_of]))[0]
    if bad.size:
        i = int(bad[0])
        raise InputError(meta_path, field, f"particle {i + 1} asks for image {index[i] + 1} of "
                         f"{files[file_of[i]]}, which holds {counts[file_of[i]]} images")
    if pixel_size_angstrom is None and headers[0][2] > 0:
        pixel_size_angstrom = headers[0][2]
    return ImageSource(files, file_of, index, sizes.pop(), pixel_size_angstrom,
                       [h[2] if h[2] > 0 else None for h in headers])


def _refuse_mixed_sizes(files: Sequence[str], headers, file_of: np.ndarray, meta_path: str,
                        field: Optional[str]) -> None:
    """InputError listing each image size with a stack and its particle count."""
    by_size: "OrderedDict[int, List[int]]" = OrderedDict()
    for fid, h in enumerate(headers):
        by_size.setdefault(h[1], []).append(fid)
    counts = np.bincount(file_of, minlength=len(files))
    parts = [f"{size} px ({int(counts[ids].sum())} particles, e.g. {os.path.basename(files[ids[0]])})"
             for size, ids in by_size.items()]
    raise InputError(meta_path, field or "image size", f"the stacks hold images of {len(by_size)} "
                     f"different sizes: {'; '.join(parts)}; one model has one box: select particles of one size "
                     "(e.g. one optics group: relion_star_handler --select rlnOpticsGroup --minval 1 "
                     "--maxval 1) or rescale every stack to one box and pixel size "
                     "(relion_image_handler --rescale_angpix A --new_box D)")


def stack_paths_from_txt(path: str, datadir: Optional[PathLike]) -> List[str]:
    """Absolute stack paths listed in a ``.txt`` (one per line, ``#`` comments and blank lines
    skipped), relative to the ``.txt``'s directory or to ``datadir``."""
    base = os.path.dirname(os.path.abspath(path)) if datadir is None else os.fspath(datadir)
    with open(path, "r", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    return [os.path.abspath(os.path.join(base, line)) for line in lines if line and not line.startswith("#")]


def open_particles(path: PathLike, datadir: Optional[PathLike] = None) -> ImageSource:
    """Open particle images lazily.

    Parameters
    ----------
    path : str or path-like
        ``.mrcs`` / ``.mrc`` stack; ``.txt`` list of stacks (one per line, relative to the
        ``.txt`` or to ``datadir``); ``.star`` (``rlnImageName``); ``.cs`` (``blob/path``,
        ``blob/idx``).
    datadir : str or path-like, optional
        Directory to resolve relative stack paths of ``.txt``/``.star``/``.cs`` against.

    Raises
    ------
    InputError
        Unknown extension, missing or unreadable stack, non-square images, or an index
        beyond the end of its stack (naming the metadata file and field).
    """
    path = require_file(path, "particle file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".mrcs", ".mrc", ".st", ".map"):
        n, box, apix = _stack_header(path, None, None)
        return ImageSource([os.path.abspath(path)], np.zeros(n, np.int64), np.arange(n), box,
                           apix if apix > 0 else None, [apix if apix > 0 else None])
    if ext == ".txt":
        stacks = stack_paths_from_txt(path, datadir)
        locations = []
        for stack in stacks:
            n = _stack_header(stack, path, None)[0]
            locations.extend((stack, k) for k in range(n))
        return _from_locations(locations, path, None, None)
    if ext == ".star":
        star = read_star(path)
        try:
            apix = float(star_pixel_size(star)[0])
        except InputError:
            apix = None
        return _from_locations(image_locations(star, datadir), star.path, "_rlnImageName", apix)
    if ext == ".cs":
        cs = read_cs(path)
        apix = float(cs["blob/psize_A"][0]) if "blob/psize_A" in cs.dtype.names and len(cs) else None
        return _from_locations(cs_image_locations(cs, datadir, cs_path=path), path, "blob/path", apix)
    raise InputError(path, None, f"unknown particle file extension {ext!r} (expected .mrcs, .mrc, .txt, .star or .cs)")


class StackWriter:
    """Write an ``[n, D, D]`` float32 MRC stack chunk by chunk, atomically.

    The stack is memory-mapped on a temporary name beside ``path`` and renamed onto ``path``
    when the ``with`` block ends without error and every image was written; otherwise the
    temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> with StackWriter("out.mrcs", n_images=len(src), box_size=D, pixel_size_angstrom=1.3) as w:
    ...     for start, chunk in src.chunks():
    ...         w.write(chunk, start)
    """

    def __init__(self, path: PathLike, n_images: int, box_size: int, pixel_size_angstrom: float):
        if n_images < 1 or box_size < 1:
            raise ValueError("n_images and box_size must be positive")
        self.path = os.fspath(path)
        self.n_images, self.box_size = int(n_images), int(box_size)
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self._written = np.zeros(self.n_images, dtype=bool)
        self._next = 0
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares (float64)

    def __enter__(self) -> "StackWriter":
        image_bytes = 4 * self.box_size * self.box_size
        # Known size: a full disk is reported now, not half way through.
        require_free_space(self.path, self.n_images * image_bytes + 1024)
        self._atomic = atomic_path(self.path, suffix=os.path.splitext(self.path)[1])
        tmp = self._atomic.__enter__()
        try:
            # The header is written through mrcfile; the images with ordinary writes at their
            # offsets. Writing through a memory map instead turns a full disk into SIGBUS,
            # which kills the process and leaves the temporary file behind.
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(np.zeros((1, self.box_size, self.box_size), dtype=np.float32))
                # ispg 0 (a stack of 2-D images, as RELION writes .mrcs; mz = 1) before the
                # voxel size, which sets the cell from mx, my, mz. Only nz and the statistics
                # of this header change when the stack is complete.
                mrc.set_image_stack()
                mrc.voxel_size = self.pixel_size_angstrom
                self._header = mrc.header.copy()
                self._data_offset = int(mrc.header.nbytes) + int(mrc.header.nsymbt)
            self._file = open(tmp, "r+b")
            self._file.truncate(self._data_offset)
            self._tmp = tmp
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, images: np.ndarray, start: Optional[int] = None) -> None:
        """Write ``images`` ``[k, D, D]`` at ``start`` (default: after the previous write)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        start = self._next if start is None else int(start)
        stop = start + images.shape[0]
        if images.shape[1:] != (self.box_size, self.box_size) or start < 0 or stop > self.n_images:
            raise ValueError(f"cannot write images of shape {images.shape} at {start} into a stack of "
                             f"{self.n_images}×{self.box_size}×{self.box_size}")
        if not np.isfinite(images).all():
            bad = start + int(np.nonzero(~np.isfinite(images).reshape(images.shape[0], -1).all(1))[0][0])
            raise ValueError(f"{self.path}: image {bad} has NaN or infinite pixels; not written")
        os.pwrite(self._file.fileno(), np.ascontiguousarray(images).tobytes(),
                  self._data_offset + start * 4 * self.box_size * self.box_size)
        self._written[start:stop] = True
        self._next = stop
        if images.size:
            s = self._stats
            s[0], s[1] = min(s[0], float(images.min())), max(s[1], float(images.max()))
            s[2] += float(images.sum(dtype=np.float64))
            s[3] += float(np.square(images, dtype=np.float64).sum())

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and not self._written.all():
                missing = int((~self._written).sum())
                raise RuntimeError(f"{self.path}: {missing} of {self.n_images} images were never written")
            self._file.close()
            if exc_type is None:
                self._finish_header()
        except BaseException:
            self._file.close()
            self._atomic.__exit__(*sys.exc_info())
            raise
        # Renames on success; on error removes the temporary file and re-raises the exception.
        return bool(self._atomic.__exit__(exc_type, exc, tb))

    def _finish_header(self) -> None:
        # Statistics come from the running sums: recomputing them would read the whole stack.
        h = self._header
        h.nz = self.n_images
        count = self.n_images * self.box_size * self.box_size
        mean = self._stats[2] / count
        h.dmin, h.dmax, h.dmean = self._stats[0], self._stats[1], mean
        h.rms = float(np.sqrt(max(self._stats[3] / count - mean * mean, 0.0)))
        with open(self._tmp, "r+b") as handle:
            handle.write(h.tobytes())
            handle.flush()
            os.fsync(handle.fileno())


def write_stack(path: PathLike, images: np.ndarray, pixel_size_angstrom: float) -> None:
    """Write ``images`` ``[n, D, D]`` as a float32 MRC stack atomically."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [n, D, D], got shape {images.shape}")
    with StackWriter(path, images.shape[0], images.shape[1], pixel_size_angstrom) as writer:
        for start in range(0, images.shape[0], 4096):
            writer.write(images[start:start + 4096], start)
