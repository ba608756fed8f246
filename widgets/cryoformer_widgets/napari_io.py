"""napari reader and writer for MRC files (npe2 commands ``read_mrc`` and ``write_mrc``).

Reader
------
* ``.mrc`` / ``.map`` holding a 3-D map → one 3-D image layer, ``scale`` = voxel size (Å), axes
  ``z, y, x``, so several maps (and the run explorer's layers) overlay in physical units.
* a volume stack (``[C, D, D, D]``, e.g. the attention maps ``attn_kmeans_XX.mrc`` written by
  ``cryoformer analyze``) → one 4-D image with a ``channel`` slider.
* ``.mrcs`` particle stacks (and any MRC with one section, e.g. a micrograph) → a 3-D "image of
  images" ``[N, y, x]`` (a slider over particles), memory-mapped so that stacks larger than
  memory open instantly; contrast limits come from the first images, so napari never scans the
  whole stack.

A header without a pixel size (0 Å) gives ``scale`` 1 in pixels. Bad files raise
:class:`cryoformer.errors.InputError`, whose message starts with the file name; napari shows it
as a notification.

Writer
------
:func:`write_mrc` saves an image layer as a float32 MRC through
:func:`cryoformer.io.mrc.write_volume` (atomic: a failed write leaves no partial file). The voxel
size is the layer's ``scale`` along its spatial axes, converted to Å when the layer has length
units (napari's default unit, ``pixel``, is read as Å: MRC has no unit-free voxel size).

No Qt import here: both work with a headless ``napari.components.ViewerModel``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, List, Optional, Sequence, Union

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from cryoformer.errors import InputError, require_file
from cryoformer.io.mrc import read_volume, read_volume_stack, write_volume

__all__ = ["MRC_SUFFIXES", "get_reader", "read_mrc", "read_image_stack", "write_mrc",
           "voxel_size_from_meta"]

MRC_SUFFIXES = (".mrc", ".mrcs", ".map")
STACK_SUFFIXES = (".mrcs",)
_CONTRAST_SAMPLE = 64  # images used for the contrast limits of a stack (cheap, representative)

LayerData = tuple  # (data, kwargs, layer_type), napari's LayerDataTuple


def _suffix(path: Union[str, os.PathLike]) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def get_reader(path: Union[str, Sequence[str]]) -> Optional[Callable[..., List[LayerData]]]:
    """npe2 reader hook: :func:`read_mrc` for MRC files, ``None`` for anything else.

    Parameters
    ----------
    path : str or list of str
        What napari was asked to open (a list when several files are opened together).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if paths and all(_suffix(p) in MRC_SUFFIXES for p in paths):
        return read_mrc
    return None


def read_mrc(path: Union[str, Sequence[str]]) -> List[LayerData]:
    """Read MRC maps / stacks as napari layer data (one layer per file).

    Returns
    -------
    list of (data, kwargs, "image")
        ``data`` is ``[z, y, x]`` (a map), ``[C, z, y, x]`` (a volume stack) or ``[N, y, x]``
        (an image stack, memory-mapped); ``kwargs`` carries ``name``, ``scale`` (Å per voxel on
        spatial axes, 1 on the image/channel axis), ``units``, ``axis_labels``, and
        ``metadata["voxel_size_angstrom"]``.

    Raises
    ------
    InputError
        Missing, truncated, complex-valued or otherwise unreadable file (message names it).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [_read_one(os.fspath(p)) for p in paths]


def _spatial_kwargs(path: str, voxel: float, ndim_spatial: int, leading: Optional[str]) -> dict:
    """Layer kwargs for ``ndim_spatial`` spatial axes of ``voxel`` Å after an optional index axis."""
    known = voxel > 0
    step = float(voxel) if known else 1.0
    unit = "angstrom" if known else "pixel"
    labels = ("z", "y", "x")[-ndim_spatial:]
    scale, units = [step] * ndim_spatial, [unit] * ndim_spatial
    if leading is not None:
        labels, scale, units = (leading,) + labels, [1.0] + scale, ["pixel"] + units
    return {"name": os.path.basename(path), "scale": scale, "units": units,
            "axis_labels": labels,
            "metadata": {"source_path": os.path.abspath(path),
                         "voxel_size_angstrom": float(voxel) if known else None}}


def _read_one(path: str) -> LayerData:
    require_file(path, "MRC file")
    if _suffix(path) in STACK_SUFFIXES or _header(path)["nz"] == 1:
        data, apix = read_image_stack(path)
        if data.shape[0] == 1:  # one section: a plain 2-D image (e.g. a micrograph)
            kwargs = _spatial_kwargs(path, apix, 2, None)
            kwargs["contrast_limits"] = _robust_limits(data[0])
            return np.asarray(data[0]), kwargs, "image"
        kwargs = _spatial_kwargs(path, apix, 2, "image")
        kwargs["contrast_limits"] = _robust_limits(data[:_CONTRAST_SAMPLE])
        return data, kwargs, "image"
    if _header(path)["is_volume_stack"]:
        stack, voxel = read_volume_stack(path, require_cubic=False)
        return stack, _spatial_kwargs(path, voxel, 3, "channel"), "image"
    volume, voxel = read_volume(path, require_cubic=False)
    return volume, _spatial_kwargs(path, voxel, 3, None), "image"


def _header(path: str) -> dict:
    """Header fields the reader dispatches on; InputError when the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # header oddities are not errors here
            with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
                h = mrc.header
                return {"nx": int(h.nx), "ny": int(h.ny), "nz": int(h.nz), "mode": int(h.mode),
                        "offset": int(h.nbytes) + int(h.nsymbt),
                        "dtype": data_dtype_from_header(h),
                        "voxel": float(mrc.voxel_size.x),
                        "is_volume_stack": int(h.ispg) == 401 and int(h.mz) not in (0, int(h.nz))}
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, None, f"not a readable MRC file ({exc})") from exc


def read_image_stack(path: Union[str, os.PathLike]):
    """Memory-map an MRC image stack.

    Returns
    -------
    data : np.memmap
        ``[N, y, x]`` read-only, in the file's dtype (float32, float16, int8, int16 or uint16).
    pixel_size_angstrom : float
        From the header; 0.0 when unrecorded.

    Raises
    ------
    InputError
        Unreadable header, a complex or unknown mode, or fewer data bytes than the header
        promises (a truncated transfer).
    """
    path = require_file(os.fspath(path), "MRC stack")
    h = _header(path)
    if h["mode"] not in (0, 1, 2, 6, 12):
        raise InputError(path, "mode", f"MRC mode {h['mode']} is not a real-valued image stack")
    shape = (h["nz"], h["ny"], h["nx"])
    need = int(np.prod(shape)) * h["dtype"].itemsize
    have = os.path.getsize(path) - h["offset"]
    if have < need:
        raise InputError(path, None, f"file is truncated: the header promises {shape[0]} images of "
                         f"{shape[2]}×{shape[1]} ({need} bytes) but {max(have, 0)} data bytes are present")
    data = np.memmap(path, dtype=h["dtype"], mode="r", offset=h["offset"], shape=shape)
    return data, h["voxel"]


def _robust_limits(images: np.ndarray) -> tuple:
    """0.5–99.5 percentile contrast of some images: noisy particles would wash out at min/max."""
    sample = np.asarray(images, dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def voxel_size_from_meta(meta: dict, n_spatial: int, path: str = "") -> float:
    """Isotropic voxel size (Å) of a layer from its ``scale`` (and ``units``, when lengths).

    Parameters
    ----------
    meta : dict
        The layer state napari hands a writer (``scale``, optionally ``units``).
    n_spatial : int
        Number of trailing spatial axes (2 for an image, 3 for a map).
    path : str
        For the error message.

    Raises
    ------
    InputError
        Anisotropic or non-positive spatial scale (MRC stores one voxel size).
    """
    scale = [float(s) for s in (meta.get("scale") or [1.0] * n_spatial)][-n_spatial:]
    units = list(meta.get("units") or [])[-n_spatial:]
    sizes = []
    for i, step in enumerate(scale):
        unit = units[i] if i < len(units) else None
        sizes.append(_to_angstrom(step, unit))
    if min(sizes) <= 0:
        raise InputError(path, "scale", f"voxel size must be positive, got {sizes} Å")
    if not np.allclose(sizes, sizes[0], rtol=1e-4):
        raise InputError(path, "scale", f"anisotropic voxels {sizes} Å cannot be stored in an MRC header")
    return float(sizes[0])


@functools.lru_cache(maxsize=1)
def _unit_registry():
    import pint  # napari's dependency (this module imports without it); a registry takes ~0.1 s: built once

    return pint.UnitRegistry()


def _to_angstrom(step: float, unit: Any) -> float:
    """``step`` in ``unit`` → Å when ``unit`` is a length (pint unit or name), else unchanged."""
    if unit is None:
        return step
    try:
        import pint  # napari's dependency (this module imports without it)

        # A pint unit (what napari layers carry) converts in its own registry.
        quantity = step * (unit if isinstance(unit, pint.Unit) else _unit_registry().Unit(str(unit)))
        if quantity.dimensionality == {"[length]": 1}:
            return float(quantity.to("angstrom").magnitude)
    except Exception:  # an unknown unit name: keep the number (documented: read as Å)
        pass
    return step


def write_mrc(path: str, data: Any, meta: dict) -> List[str]:
    """npe2 single-layer writer: save an image layer as a float32 MRC map (atomic).

    Parameters
    ----------
    path : str
        Destination ``.mrc`` / ``.map``.
    data : array-like
        ``[y, x]`` (written as one section), ``[z, y, x]`` (a map) or ``[C, z, y, x]`` (a
        volume stack); a multiscale layer writes its full-resolution level.
    meta : dict
        Layer state; ``scale`` (and ``units``) give the voxel size, ``rgb`` must be false.

    Returns
    -------
    list of str
        ``[path]``.

    Raises
    ------
    InputError
        RGB data, an unsupported dimensionality, or anisotropic voxels.
    """
    path = os.fspath(path)
    if meta.get("multiscale"):
        data = data[0]
    if meta.get("rgb"):
        raise InputError(path, None, "RGB images cannot be saved as an MRC map")
    arr = np.asarray(data)
    if arr.ndim not in (2, 3, 4):
        raise InputError(path, None, f"MRC holds 2-D images, 3-D maps or stacks of maps; "
                         f"this layer is {arr.ndim}-D {list(arr.shape)}")
    n_spatial = 2 if arr.ndim == 2 else 3
    voxel = voxel_size_from_meta(meta, n_spatial, path)
    write_volume(path, arr[None] if arr.ndim == 2 else arr, voxel)
    return [path]
