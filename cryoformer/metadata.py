"""Per-particle metadata shared by every part of the package: poses and CTF parameters.

Conventions (docs/conventions.md)
---------------------
* ``rotations[i]`` is the 3×3 matrix ``R`` of particle ``i`` as cryoDRGN's pose ``.pkl`` stores it
  and as RELION's ZYZ Euler matrix of ``(rot, tilt, psi)`` gives it. The clean image is
  ``P(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz`` moved in the image plane by ``−s``.
* ``shifts_px[i]`` is ``s`` in pixels of the box ``box_size``: RELION ``rlnOriginX/Y`` (px),
  cryoDRGN ``trans × D``, cryoSPARC ``alignments3D/shift``.
* CTF parameters use the cryoDRGN ``.pkl`` column order (N×9): box size, pixel size (Å),
  defocus U (Å), defocus V (Å), astigmatism angle (deg), voltage (kV), spherical
  aberration (mm), amplitude contrast, phase shift (deg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

CTF_COLUMNS = (
    "box_size",
    "pixel_size_angstrom",
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "astigmatism_angle_deg",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "phase_shift_deg",
)


@dataclass(frozen=True)
class Poses:
    """Particle poses.

    Attributes
    ----------
    rotations : np.ndarray
        ``[N, 3, 3]`` float32 rotation matrices (docs/conventions.md convention).
    shifts_px : np.ndarray
        ``[N, 2]`` float32 in-plane shifts ``(sx, sy)`` in pixels of ``box_size``.
    box_size : int or None
        Box size ``D`` in pixels the shifts refer to (needed to write cryoDRGN fractions).
    """

    rotations: np.ndarray
    shifts_px: np.ndarray
    box_size: Optional[int] = None

    def __post_init__(self) -> None:
        rot = np.ascontiguousarray(self.rotations, dtype=np.float32)
        shifts = np.ascontiguousarray(self.shifts_px, dtype=np.float32)
        if rot.ndim != 3 or rot.shape[1:] != (3, 3):
            raise ValueError(f"rotations must be [N, 3, 3], got {rot.shape}")
        if shifts.shape != (rot.shape[0], 2):
            raise ValueError(f"shifts_px must be [{rot.shape[0]}, 2], got {shifts.shape}")
        object.__setattr__(self, "rotations", rot)
        object.__setattr__(self, "shifts_px", shifts)

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    def subset(self, indices: Sequence[int]) -> "Poses":
        """Poses of the particles ``indices`` (any numpy index)."""
        idx = np.asarray(indices)
        return Poses(self.rotations[idx], self.shifts_px[idx], self.box_size)


@dataclass(frozen=True)
class CtfParameters:
    """CTF parameters of ``N`` particles, stored as the cryoDRGN ``[N, 9]`` float32 array.

    Attributes
    ----------
    array : np.ndarray
        ``[N, 9]`` in the column order of :data:`CTF_COLUMNS`.
    bfactor_angstrom2 : np.ndarray or None
        Optional ``[N]`` envelope B-factor in Å² (not part of the cryoDRGN file).
    """

    array: np.ndarray
    bfactor_angstrom2: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        arr = np.ascontiguousarray(self.array, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != 9:
            raise ValueError(f"CTF array must be [N, 9], got {arr.shape}")
        object.__setattr__(self, "array", arr)
        if self.bfactor_angstrom2 is not None:
            b = np.ascontiguousarray(self.bfactor_angstrom2, dtype=np.float32).reshape(-1)
            if b.shape[0] != arr.shape[0]:
                raise ValueError("bfactor_angstrom2 must have one value per particle")
            object.__setattr__(self, "bfactor_angstrom2", b)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def column(self, name: str) -> np.ndarray:
        """One column by name, e.g. ``column("defocus_u_angstrom")`` → ``[N]``."""
        return self.array[:, CTF_COLUMNS.index(name)]

    @property
    def box_size(self) -> int:
        return int(round(float(self.array[0, 0])))

    @property
    def pixel_size_angstrom(self) -> float:
        return float(self.array[0, 1])

    def subset(self, indices: Sequence[int]) -> "CtfParameters":
        idx = np.asarray(indices)
        b = None if self.bfactor_angstrom2 is None else self.bfactor_angstrom2[idx]
        return CtfParameters(self.array[idx], b)

    @classmethod
    def from_columns(cls, n: int, bfactor_angstrom2: Optional[np.ndarray] = None, **columns) -> "CtfParameters":
        """Build from named columns (scalars broadcast to ``n`` particles).

        Every name of :data:`CTF_COLUMNS` must be given.
        """
        missing = [c for c in CTF_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"missing CTF columns: {missing}")
        arr = np.empty((n, 9), dtype=np.float32)
        for j, name in enumerate(CTF_COLUMNS):
            arr[:, j] = np.broadcast_to(np.asarray(columns[name], dtype=np.float32), (n,))
        return cls(arr, bfactor_angstrom2)
