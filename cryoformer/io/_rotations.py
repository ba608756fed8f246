"""numpy wrappers around :mod:`cryoformer.physics.rotations` for the file readers and writers.

The readers work in numpy; the conversions live (once) in the torch module. Converting in
float64 keeps Euler → matrix → Euler round trips well below the 1e-5 the file formats print.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoformer.physics import rotations as torch_rotations


def _call(name: str, array: np.ndarray) -> np.ndarray:
    out = getattr(torch_rotations, name)(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)))
    return out.numpy()


def euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION ``(rot, tilt, psi)`` degrees ``[N, 3]`` → ``[N, 3, 3]`` float64 (docs/conventions.md ``R``)."""
    return _call("euler_relion_to_matrix", euler_deg)


def matrix_to_euler(rotations: np.ndarray) -> np.ndarray:
    """``[N, 3, 3]`` → RELION ``(rot, tilt, psi)`` in degrees ``[N, 3]`` float64."""
    return _call("matrix_to_euler_relion", rotations)


def axis_angle_to_matrix(vectors: np.ndarray) -> np.ndarray:
    """Rotation vectors ``[N, 3]`` (radians) → Rodrigues matrices ``[N, 3, 3]`` float64."""
    return _call("axis_angle_to_matrix", vectors)


def matrix_to_axis_angle(rotations: np.ndarray) -> np.ndarray:
    """``[N, 3, 3]`` → rotation vectors ``[N, 3]`` (radians, angle in ``[0, π]``) float64."""
    return _call("matrix_to_axis_angle", rotations)
