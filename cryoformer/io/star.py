"""RELION ``.star`` particle files: reading (3.0, 3.1, 5), poses, CTF, image locations, writing.

Layouts handled by :func:`read_star`
------------------------------------
* RELION 3.0: one ``data_`` block (any name), every column per particle, as a loop or a
  single-row key/value block. Pixel size is ``rlnDetectorPixelSize`` (µm) · 1e4 /
  ``rlnMagnification`` unless ``rlnPixelSize`` / ``rlnImagePixelSize`` is given.
* RELION 3.1 and 5: ``data_optics`` + ``data_particles`` (either order; ``data_`` +
  ``data_optics`` is accepted too). Particles reference their optics group through
  ``rlnOpticsGroup``; the optics columns are merged into every particle row, so a file with
  two optics groups of different pixel sizes gives each particle its own pixel size.
  RELION 5 extras (``rlnImageDimensionality``, tomography columns, further blocks) are kept
  and ignored.

Column names are normalised to ``rlnName`` (no leading underscore) whatever the ``starfile``
version does; error messages name them as they appear in the file (``_rlnName``).

Units: origins ``rlnOriginX/Y`` in pixels (3.0) or ``rlnOriginX/YAngst`` in Å (3.1+), Euler
angles in degrees (RELION's ZYZ ``rot, tilt, psi``), defocus in Å, Cs in mm, voltage in kV.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import starfile

from cryoformer.errors import InputError, PathLike, require_file
from cryoformer.io._rotations import euler_to_matrix, matrix_to_euler
from cryoformer.io.atomic import atomic_path
from cryoformer.io.validate import check_finite_rows
from cryoformer.metadata import CtfParameters, Poses

__all__ = [
    "RelionStar", "read_star", "poses_from_star", "ctf_from_star", "write_star", "image_locations",
    "star_pixel_size", "star_pixel_size_column", "star_origin_units", "star_pose_columns", "subset_star",
]

# Keep names that look numeric as text. Older starfile releases lack the option; names then
# still parse (they contain "@"), and image_locations converts them to str anyway.
_STRING_COLUMNS = (
    {"parse_as_string": ["rlnImageName", "rlnMicrographName"]}
    if "parse_as_string" in inspect.signature(starfile.read).parameters
    else {}
)


@dataclass(frozen=True, eq=False)  # DataFrames have no boolean equality
class RelionStar:
    """A parsed particle ``.star`` file.

    Attributes
    ----------
    particles : pandas.DataFrame
        One row per particle, columns ``rlnName`` (no underscore), optics columns merged in.
    optics : pandas.DataFrame or None
        The ``data_optics`` block (RELION 3.1+), else ``None``.
    version : str
        ``"3.0"`` (single block) or ``"3.1+"`` (optics block present).
    path : str
        Absolute path of the file (relative image paths are resolved against its directory).
    """

    particles: pd.DataFrame
    optics: Optional[pd.DataFrame]
    version: str
    path: str

    def __len__(self) -> int:
        return len(self.particles)

    def has(self, column: str) -> bool:
        """Whether the particles table has ``column`` (``rlnName`` or ``_rlnName``)."""
        return column.lstrip("_") in self.particles.columns


def _normalise(block) -> pd.DataFrame:
    """A starfile block (DataFrame, or dict for a key/value block) as a DataFrame ``rlnName``."""
    df = pd.DataFrame([block]) if isinstance(block, dict) else block.copy()
    df.columns = [str(c).lstrip("_") for c in df.columns]
    return df.reset_index(drop=True)


def _pick_particles_block(blocks: Dict[str, pd.DataFrame], path: str) -> pd.DataFrame:
    if "particles" in blocks:
        return blocks["particles"]
    others = {name: df for name, df in blocks.items() if name != "optics"}
    with_images = [name for name, df in others.items() if "rlnImageName" in df.columns]
    if len(with_images) == 1:
        return others[with_images[0]]
    if len(others) == 1:
        return next(iter(others.values()))
    if not others:
        raise InputError(path, None, "no particle data block found (expected data_particles or data_)")
    names = ", ".join(f"data_{n}" for n in others)
    raise InputError(path, None, f"cannot tell which data block holds the particles among {names}")


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame, path: str) -> pd.DataFrame:
    """Copy each particle's optics-group values into its row (particle values win)."""
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(path, "_rlnOpticsGroup", "the data_optics block has no rlnOpticsGroup column")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(path, "_rlnOpticsGroup", f"particles do not say which of the {len(optics)} "
                             "optics groups they belong to")
        particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    # Compare as strings: one block may parse the group ids as int, the other as str.
    table = optics.assign(_key=optics["rlnOpticsGroup"].astype(str)).set_index("_key")
    if table.index.has_duplicates:
        raise InputError(path, "_rlnOpticsGroup", "data_optics defines the same optics group twice")
    keys = particles["rlnOpticsGroup"].astype(str)
    unknown = sorted(set(keys) - set(table.index))
    if unknown:
        raise InputError(path, "_rlnOpticsGroup", f"particles reference optics group(s) {unknown[:5]} "
                         "that data_optics does not define")
    merged = particles.copy()
    for column in table.columns:
        if column not in merged.columns and column != "rlnOpticsGroup":
            merged[column] = keys.map(table[column]).to_numpy()
    return merged


def read_star(path: PathLike) -> RelionStar:
    """Read a RELION 3.0, 3.1 or 5 particle ``.star`` file.

    Raises
    ------
    InputError
        Missing file, unparsable text, no particle block, or particles referencing an optics
        group that is not defined.
    """
    path = os.path.abspath(require_file(path, "star file"))
    try:
        raw = starfile.read(path, always_dict=True, **_STRING_COLUMNS)
    except Exception as exc:  # the parser raises assorted errors on malformed text
        raise InputError(path, None, f"not a readable STAR file ({type(exc).__name__}: {exc})") from exc
    blocks = {str(name): _normalise(block) for name, block in raw.items()}
    if not blocks:
        raise InputError(path, None, "not a STAR file: no data_ block found")
    optics = blocks.get("optics")
    particles = _pick_particles_block(blocks, path)
    if optics is not None:
        particles = _merge_optics(particles, optics, path)
    return RelionStar(particles, optics, "3.0" if optics is None else "3.1+", path)


def _column(star: RelionStar, name: str, dtype=np.float64) -> np.ndarray:
    """Numeric column ``name`` as ``[N]`` array; InputError naming it if missing or non-numeric."""
    if name not in star.particles.columns:
        raise InputError(star.path, f"_{name}", "required column is missing")
    try:
        values = pd.to_numeric(star.particles[name], errors="raise").to_numpy(dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise InputError(star.path, f"_{name}", f"expected numbers ({exc})") from exc
    check_finite_rows(values, star.path, f"_{name}")
    return values


def _optional(star: RelionStar, name: str, default=None):
    return _column(star, name) if name in star.particles.columns else default


def star_pixel_size(star: RelionStar, override: Optional[float] = None) -> np.ndarray:
    """Per-particle pixel size ``[N]`` in Å: override, rlnImagePixelSize, rlnPixelSize, or
    rlnDetectorPixelSize (µm) · 1e4 / rlnMagnification (RELION 3.0)."""
    n = len(star)
    if override is not None:
        if not float(override) > 0:
            raise InputError(None, "--Apix", f"the pixel size must be > 0 Å, got {override:g}")
        return np.full(n, float(override))
    column = star_pixel_size_column(star)
    if column == "_rlnDetectorPixelSize":
        apix = _column(star, "rlnDetectorPixelSize") * 1e4 / _column(star, "rlnMagnification")
    elif column is not None:
        apix = _column(star, column.lstrip("_"))
    else:
        raise InputError(star.path, "_rlnImagePixelSize", "pixel size not found (no rlnImagePixelSize, "
                         "rlnPixelSize or rlnDetectorPixelSize + rlnMagnification); pass the pixel size "
                         "explicitly")
    bad = np.nonzero(~(apix > 0))[0]
    if bad.size:
        raise InputError(star.path, column, f"particle {int(bad[0])} has a pixel size of {apix[bad[0]]:g} Å; "
                         f"expected > 0 ({bad.size} of {n} particles); pass the pixel size explicitly (--Apix)")
    return apix


def star_pixel_size_column(star: RelionStar) -> Optional[str]:
    """The column :func:`star_pixel_size` reads (``_rlnImagePixelSize``, ``_rlnPixelSize`` or
    ``_rlnDetectorPixelSize`` with ``_rlnMagnification``), ``None`` if there is none."""
    for name in ("rlnImagePixelSize", "rlnPixelSize"):
        if star.has(name):
            return f"_{name}"
    if star.has("rlnDetectorPixelSize") and star.has("rlnMagnification"):
        return "_rlnDetectorPixelSize"
    return None


def _box_size(star: RelionStar, override: Optional[int], required: bool,
              default: Optional[int] = None) -> Optional[int]:
    if override is not None:
        return int(override)
    if not star.has("rlnImageSize"):
        if default is not None:
            return int(default)
        if required:
            raise InputError(star.path, "_rlnImageSize", "box size not found; pass the box size (-D) explicitly")
        return None
    values = _column(star, "rlnImageSize")
    sizes = np.unique(values)
    if sizes.size != 1:
        groups = star.particles["rlnOpticsGroup"].astype(str).to_numpy() if star.has("rlnOpticsGroup") else None
        parts = []
        for size in sizes[:6]:
            rows = np.nonzero(values == size)[0]
            where = f"optics group {groups[rows[0]]}: " if groups is not None else ""
            parts.append(f"{where}{int(size)} px ({rows.size} particles, first {int(rows[0])})")
        raise InputError(star.path, "_rlnImageSize", f"the particles have {sizes.size} different box sizes "
                         f"({'; '.join(parts)}); cryoformer needs one box: select one optics group "
                         "(relion_star_handler --select rlnOpticsGroup --minval 1 --maxval 1) or rescale "
                         "the images to one box and pixel size (relion_image_handler --rescale_angpix A "
                         "--new_box D)")
    return int(sizes[0])


def _star_box(star: RelionStar) -> Optional[int]:
    """The file's ``rlnImageSize`` (px), ``None`` where it records none."""
    return _box_size(star, None, required=False)


def _known_pixel_size(star: RelionStar) -> Optional[np.ndarray]:
    """The file's own per-particle pixel size ``[N]`` (Å), ``None`` where it records none."""
    return None if star_pixel_size_column(star) is None else star_pixel_size(star)


def star_origin_units(star: RelionStar, box_size: Optional[int] = None,
                      pixel_size_angstrom: Optional[float] = None,
                      angstrom: Optional[bool] = None) -> Tuple[bool, np.ndarray]:
    """How the file's origins relate to shifts in pixels of the images the poses are for.

    The one conversion between ``rlnOriginX/Y[Angst]`` and ``Poses.shifts_px``, used both ways:
    ``origin = shifts_px × factor`` (writing) and ``shifts_px = origin / factor`` (reading).
    The images may be a downsampled copy of those the file describes (same physical box):

    * origins in Å (``rlnOriginX/YAngst``, RELION 3.1+): ``factor`` is the Å/px of the images:
      ``pixel_size_angstrom``, else the file's pixel size × ``rlnImageSize / box_size``, else
      the file's pixel size (InputError if the file has none);
    * origins in px of the file's images (``rlnOriginX/Y``, RELION 3.0): ``factor`` is
      ``pixel_size_angstrom`` / the file's pixel size when both are known, else
      ``rlnImageSize / box_size`` when both are known, else 1.

    Parameters
    ----------
    star : RelionStar
    box_size : int, optional
        Box (px) of the images the shifts are in.
    pixel_size_angstrom : float, optional
        Å/px of those images.
    angstrom : bool, optional
        Which kind of origin; default: Å when the file has ``rlnOriginX/YAngst`` or no pixel
        origins and an optics block (RELION 3.1+), else px.

    Returns
    -------
    (bool, np.ndarray)
        Whether the origins are in Å, and ``factor`` ``[N]``.
    """
    if angstrom is None:
        angstrom = (star.has("rlnOriginXAngst") or star.has("rlnOriginYAngst")
                    or (star.version != "3.0" and not (star.has("rlnOriginX") or star.has("rlnOriginY"))))
    n = len(star)
    star_box = _star_box(star)
    rescale = star_box / box_size if box_size is not None and star_box is not None else 1.0
    if angstrom:
        if pixel_size_angstrom is not None:
            return True, star_pixel_size(star, pixel_size_angstrom)
        return True, star_pixel_size(star) * rescale  # InputError naming the column if none
    own = None if pixel_size_angstrom is None else _known_pixel_size(star)
    if own is not None:
        return False, star_pixel_size(star, pixel_size_angstrom) / own
    return False, np.full(n, float(rescale))


def poses_from_star(star: RelionStar, box_size: Optional[int] = None,
                    pixel_size_angstrom: Optional[float] = None) -> Poses:
    """Poses from Euler angles and origins (docs/conventions.md: ``s`` = ``rlnOriginX/Y`` in px).

    Parameters
    ----------
    star : RelionStar
    box_size : int, optional
        Box (px) of the images the poses are for; overrides ``rlnImageSize`` and is recorded in
        the result (``None`` if neither is known). When it differs from ``rlnImageSize`` (a
        downsampled stack), origins are rescaled to pixels of that box.
    pixel_size_angstrom : float, optional
        Å/px of the images the poses are for; overrides the file's pixel size. Origins in Å
        are divided by it; origins in px (RELION 3.0) are rescaled by the file's pixel size /
        this one.

    Returns
    -------
    Poses
        Rotations from ``rlnAngleRot/Tilt/Psi`` (RELION ZYZ matrix), shifts in pixels of the
        images (zeros when the file has no origins); see :func:`star_origin_units`.
    """
    angles = np.stack([_column(star, f"rlnAngle{a}") for a in ("Rot", "Tilt", "Psi")], axis=1)
    rotations = euler_to_matrix(angles)
    n = len(star)
    if star.has("rlnOriginXAngst") or star.has("rlnOriginYAngst"):
        _, factor = star_origin_units(star, box_size, pixel_size_angstrom, angstrom=True)
        shifts = np.stack([_column(star, "rlnOriginXAngst"), _column(star, "rlnOriginYAngst")], axis=1)
        shifts = shifts / factor[:, None]
    elif star.has("rlnOriginX") or star.has("rlnOriginY"):
        _, factor = star_origin_units(star, box_size, pixel_size_angstrom, angstrom=False)
        shifts = np.stack([_column(star, "rlnOriginX"), _column(star, "rlnOriginY")], axis=1)
        shifts = shifts / factor[:, None]
    else:
        shifts = np.zeros((n, 2))
    return Poses(rotations, shifts, _box_size(star, box_size, required=False))


def star_pose_columns(star: RelionStar, poses: Poses, pixel_size_angstrom: Optional[float] = None
                      ) -> Dict[str, np.ndarray]:
    """``poses`` as the pose columns of ``star``'s rows, in the file's own conventions.

    The inverse of :func:`poses_from_star`: ``rlnAngleRot/Tilt/Psi`` (deg) and
    ``rlnOriginX/YAngst`` (Å, RELION 3.1+) or ``rlnOriginX/Y`` (px of the file's images,
    RELION 3.0), from shifts in px of images of box ``poses.box_size`` at
    ``pixel_size_angstrom`` Å/px (see :func:`star_origin_units`).

    Parameters
    ----------
    star : RelionStar
        The file the rows belong to; ``len(poses)`` must equal ``len(star)`` (pass the star's
        rows the poses are for, e.g. a subset made with :func:`subset_star`).
    poses : Poses
    pixel_size_angstrom : float, optional

    Returns
    -------
    dict
        Column name (no underscore) → ``[N]`` float64 values.
    """
    if len(poses) != len(star):
        raise ValueError(f"{len(poses)} poses for {len(star)} star rows")
    angstrom, factor = star_origin_units(star, poses.box_size, pixel_size_angstrom)
    euler = matrix_to_euler(poses.rotations).astype(np.float64)  # [N, 3] deg
    origin = poses.shifts_px.astype(np.float64) * factor[:, None]  # [N, 2] Å or file px
    suffix = "Angst" if angstrom else ""
    return {"rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
            f"rlnOriginX{suffix}": origin[:, 0], f"rlnOriginY{suffix}": origin[:, 1]}


def subset_star(star: RelionStar, rows: Sequence[int]) -> RelionStar:
    """The particles ``rows`` (0-based) of ``star``, optics and path kept."""
    idx = np.asarray(rows, dtype=np.int64)
    return RelionStar(star.particles.iloc[idx].reset_index(drop=True), star.optics, star.version, star.path)


def ctf_from_star(star: RelionStar, box_size: Optional[int] = None, pixel_size_angstrom: Optional[float] = None,
                  voltage_kv: Optional[float] = None, spherical_aberration_mm: Optional[float] = None,
                  amplitude_contrast: Optional[float] = None, phase_shift_deg: Optional[float] = None,
                  default_box_size: Optional[int] = None) -> CtfParameters:
    """CTF parameters as cryoDRGN's ``parse_ctf_star`` builds them.

    Every given override replaces the file's values for all particles. Required unless
    overridden: ``rlnImageSize``, a pixel size (see :func:`star_pixel_size`), ``rlnVoltage``,
    ``rlnSphericalAberration``, ``rlnAmplitudeContrast``; always required: ``rlnDefocusU``,
    ``rlnDefocusV``, ``rlnDefocusAngle``. ``rlnPhaseShift`` defaults to 0; ``rlnCtfBfactor``
    (Å²) becomes ``bfactor_angstrom2`` when present. ``default_box_size`` is used when the
    file records no ``rlnImageSize`` (RELION 3.0) and ``box_size`` is not given.
    """
    n = len(star)

    def value(override, name, default=None):
        if override is not None:
            return np.full(n, float(override))
        if default is not None and not star.has(name):
            return np.full(n, float(default))
        return _column(star, name)

    columns = dict(
        box_size=_box_size(star, box_size, required=True, default=default_box_size),
        pixel_size_angstrom=star_pixel_size(star, pixel_size_angstrom),
        defocus_u_angstrom=_column(star, "rlnDefocusU"),
        defocus_v_angstrom=_column(star, "rlnDefocusV"),
        astigmatism_angle_deg=_column(star, "rlnDefocusAngle"),
        voltage_kv=value(voltage_kv, "rlnVoltage"),
        spherical_aberration_mm=value(spherical_aberration_mm, "rlnSphericalAberration"),
        amplitude_contrast=value(amplitude_contrast, "rlnAmplitudeContrast"),
        phase_shift_deg=value(phase_shift_deg, "rlnPhaseShift", default=0.0),
    )
    return CtfParameters.from_columns(n, bfactor_angstrom2=_optional(star, "rlnCtfBfactor"), **columns)


def write_star(path: PathLike, poses: Optional[Poses], ctf: Optional[CtfParameters], image_names: Sequence[str],
               pixel_size_angstrom: float, extra_columns: Optional[Dict[str, Sequence]] = None) -> None:
    """Write a RELION 3.1 particle file (``data_optics`` + ``data_particles``) atomically.

    Parameters
    ----------
    path : str or path-like
    poses : Poses or None
        Written as ``rlnAngleRot/Tilt/Psi`` (deg) and ``rlnOriginX/YAngst`` (= shifts_px × pixel size).
    ctf : CtfParameters or None
        Voltage, Cs and amplitude contrast go to the optics block (one group per distinct
        combination); defocus, angle, phase shift and B-factor per particle.
    image_names : sequence of str
        ``rlnImageName`` per particle, e.g. ``"000001@particles.mrcs"`` (1-based index).
    pixel_size_angstrom : float
        ``rlnImagePixelSize`` (Å/px) of the images.
    extra_columns : dict, optional
        Further per-particle columns, named with or without the leading underscore.
    """
    names = [str(s) for s in image_names]
    n = len(names)
    for what, obj in (("poses", poses), ("ctf", ctf)):
        if obj is not None and len(obj) != n:
            raise ValueError(f"{what} has {len(obj)} rows but there are {n} image names")
    if ctf is not None and not np.allclose(ctf.column("pixel_size_angstrom"), pixel_size_angstrom, rtol=1e-4):
        raise ValueError("CTF pixel size differs from pixel_size_angstrom")
    box = poses.box_size if poses is not None and poses.box_size is not None else (
        ctf.box_size if ctf is not None else None)
    optics, group = _optics_block(ctf, n, pixel_size_angstrom, box)
    particles = _particles_block(names, group, poses, ctf, pixel_size_angstrom, extra_columns)
    with atomic_path(path, suffix=".star") as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, float_format="%.6f")


def _optics_block(ctf: Optional[CtfParameters], n: int, pixel_size_angstrom: float,
                  box: Optional[int]) -> Tuple[pd.DataFrame, np.ndarray]:
    """The ``data_optics`` table and the 0-based optics group of each of the ``n`` particles.

    One group per distinct (voltage, Cs, amplitude contrast); a single group without CTF.
    """
    if ctf is not None:
        optics_values = ctf.array[:, 5:8].astype(np.float64)
        unique, group = np.unique(optics_values, axis=0, return_inverse=True)
    else:
        unique, group = np.zeros((1, 0)), np.zeros(n, dtype=int)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(unique))],
        "rlnOpticsGroup": np.arange(1, len(unique) + 1),
        "rlnImagePixelSize": float(pixel_size_angstrom),
    })
    if box is not None:
        optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    if ctf is not None:
        optics["rlnVoltage"], optics["rlnSphericalAberration"], optics["rlnAmplitudeContrast"] = unique.T
    return optics, group


def _particles_block(names: List[str], group: np.ndarray, poses: Optional[Poses], ctf: Optional[CtfParameters],
                     pixel_size_angstrom: float, extra_columns: Optional[Dict[str, Sequence]]) -> pd.DataFrame:
    """The ``data_particles`` table: image name, optics group (1-based), pose, CTF, extra columns."""
    n = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": np.asarray(group).reshape(-1) + 1})
    if poses is not None:
        euler = matrix_to_euler(poses.rotations)
        particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = euler.T
        origin = poses.shifts_px.astype(np.float64) * float(pixel_size_angstrom)
        particles["rlnOriginXAngst"], particles["rlnOriginYAngst"] = origin.T
    if ctf is not None:
        particles["rlnDefocusU"] = ctf.column("defocus_u_angstrom")
        particles["rlnDefocusV"] = ctf.column("defocus_v_angstrom")
        particles["rlnDefocusAngle"] = ctf.column("astigmatism_angle_deg")
        particles["rlnPhaseShift"] = ctf.column("phase_shift_deg")
        if ctf.bfactor_angstrom2 is not None:
            particles["rlnCtfBfactor"] = ctf.bfactor_angstrom2
    for name, values in (extra_columns or {}).items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"extra column {name} must have shape ({n},), got {values.shape}")
        particles[name.lstrip("_")] = values
    return particles


def _parse_image_name(entry: str, star: RelionStar, row: int) -> Tuple[str, int]:
    """``"000012@stack.mrcs"`` → ``("stack.mrcs", 11)``; a bare file name is image 0."""
    if "@" not in entry:
        return entry, 0
    index, _, name = entry.partition("@")
    try:
        index1 = int(index)
    except ValueError:
        index1 = 0
    if index1 < 1 or not name:
        raise InputError(star.path, "_rlnImageName", f"row {row + 1}: {entry!r} is not of the form "
                         "<1-based index>@<stack file>")
    return name, index1 - 1


def image_locations(star: RelionStar, datadir: Optional[PathLike] = None) -> List[Tuple[str, int]]:
    """Where each particle's image is: ``[(absolute stack path, 0-based index), ...]``.

    Relative stack paths are resolved against ``datadir`` when given (falling back to the
    file's base name inside ``datadir``, as cryoDRGN does), else against the star file's
    directory and, failing that, its parent directories: RELION writes paths relative to the
    project directory, which is usually two levels above ``Job/job012/particles.star``.
    Existence is not required here; :func:`cryoformer.io.open_particles` checks it.
    """
    if not star.has("rlnImageName"):
        raise InputError(star.path, "_rlnImageName", "required column is missing")
    base = os.path.dirname(star.path) if datadir is None else os.path.abspath(os.fspath(datadir))
    resolved: Dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in resolved:
            candidate = os.path.abspath(os.path.join(base, name))
            if datadir is not None and not os.path.exists(candidate):
                fallback = os.path.join(base, os.path.basename(name))
                if os.path.exists(fallback):
                    candidate = fallback
            elif datadir is None and not os.path.exists(candidate):
                parent = os.path.abspath(base)
                for _ in range(3):  # the RELION project directory, at most three levels up
                    parent = os.path.dirname(parent)
                    if os.path.exists(os.path.join(parent, name)):
                        candidate = os.path.join(parent, name)
                        break
            resolved[name] = candidate
        return resolved[name]

    out = []
    for row, entry in enumerate(star.particles["rlnImageName"].astype(str)):
        name, index = _parse_image_name(entry.strip(), star, row)
        out.append((resolve(name), index))
    return out
