"""Rotation representations and conversions (torch, batched, differentiable).

Every function works on tensors with arbitrary leading batch dimensions ``[...]`` and keeps
the dtype and device of its input. Matrices are *active* rotations acting on column vectors
(``y = R @ x``); the pose matrix ``R`` of docs/conventions.md is used as ``P(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz``.

Relations to other conventions (verified numerically in ``tests/test_rotations.py``):

* RELION ``(rot, tilt, psi)`` → ``R``: :func:`euler_relion_to_matrix` equals RELION's
  ``Euler_angles2matrix`` and cryoDRGN's ``R_from_relion``; with SciPy,
  ``R = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T``
  (intrinsic ZYZ, then transposed).
* Quaternions are ``(w, x, y, z)`` (scalar first); SciPy's ``from_quat`` is scalar last.
* Axis-angle vectors give the standard Rodrigues matrix (SciPy ``from_rotvec``, cryoDRGN
  ``lie_tools.expmap``). cryoSPARC's ``alignments3D/pose`` is the axis-angle vector of ``Rᵀ``:
  readers of ``.cs`` files must transpose (as cryoDRGN's ``parse_pose_csparc`` does).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "euler_relion_to_matrix",
    "matrix_to_euler_relion",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "sixd_to_matrix",
    "matrix_to_sixd",
    "random_rotations",
    "geodesic_distance",
]


def _as_float_tensor(x) -> torch.Tensor:
    """Tensor view of ``x``; non-floating input becomes float32 (the package default)."""
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float32)


def euler_relion_to_matrix(euler_deg: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles to rotation matrices.

    Parameters
    ----------
    euler_deg : torch.Tensor
        ``[..., 3]`` angles ``(rot, tilt, psi)`` in degrees (``rlnAngleRot``, ``rlnAngleTilt``,
        ``rlnAnglePsi``).

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` matrix ``A = Rz'(psi) Ry'(tilt) Rz'(rot)`` with primed (passive,
        i.e. transposed) elementary rotations, element for element RELION's
        ``Euler_angles2matrix``.
    """
    e = torch.deg2rad(_as_float_tensor(euler_deg))
    ca, cb, cg = torch.cos(e[..., 0]), torch.cos(e[..., 1]), torch.cos(e[..., 2])
    sa, sb, sg = torch.sin(e[..., 0]), torch.sin(e[..., 1]), torch.sin(e[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1),
        torch.stack([sc, ss, cb], dim=-1),
    ]
    return torch.stack(rows, dim=-2)  # [..., 3, 3]


def matrix_to_euler_relion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to RELION Euler angles (inverse of :func:`euler_relion_to_matrix`).

    Parameters
    ----------
    R : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 3]`` ``(rot, tilt, psi)`` in degrees, ``tilt ∈ [0, 180]``, ``rot, psi ∈
        [-180, 180]``. At gimbal lock (``sin(tilt)`` below ``sqrt(eps)`` of the dtype) only
        ``rot + psi`` (tilt 0) or ``psi - rot`` (tilt 180) is defined; ``rot = 0`` is returned
        there, as RELION's ``Euler_matrix2angles`` does.
    """
    R = _as_float_tensor(R)
    # |sin tilt| (tilt ∈ [0, π] makes it ≥ 0); the clamp keeps the sqrt's gradient finite at 0.
    sb = torch.sqrt((R[..., 0, 2] ** 2 + R[..., 1, 2] ** 2).clamp(min=torch.finfo(R.dtype).tiny))
    tilt = torch.atan2(sb, R[..., 2, 2])
    # Below sqrt(eps) the generic formulas divide rounding noise by sin(tilt); the
    # gimbal-lock formulas are then more accurate (their error is O(sin tilt)).
    locked = sb < math.sqrt(torch.finfo(R.dtype).eps)
    one, zero = torch.ones_like(sb), torch.zeros_like(sb)
    # Feed atan2 harmless arguments in the branch torch.where discards, so no NaN gradient
    # leaks from atan2(0, 0).
    rot = torch.atan2(torch.where(locked, zero, R[..., 2, 1]), torch.where(locked, one, R[..., 2, 0]))
    psi = torch.atan2(torch.where(locked, zero, R[..., 1, 2]), torch.where(locked, one, -R[..., 0, 2]))
    # tilt≈0: A ≈ Rz'(rot+psi), so A[0,0] = cos(rot+psi), A[0,1] = sin(rot+psi).
    # tilt≈180: A[0,0] = -cos(psi-rot), A[1,0] = sin(psi-rot).
    up = R[..., 2, 2] > 0
    psi_locked = torch.where(
        up,
        torch.atan2(R[..., 0, 1], R[..., 0, 0]),
        torch.atan2(R[..., 1, 0], -R[..., 0, 0]),
    )
    rot = torch.where(locked, zero, rot)
    psi = torch.where(locked, psi_locked, psi)
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))  # [..., 3]


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` → ``[..., 3, 3]`` cross-product matrix ``K`` with ``K @ u = v × u``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2
    )


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Axis-angle (rotation) vectors to matrices by Rodrigues' formula.

    Parameters
    ----------
    v : torch.Tensor
        ``[..., 3]`` rotation vectors: direction = axis, norm = angle in radians.

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` ``I + a K + b K²`` with ``K = [v]×``, ``a = sin θ / θ`` and
        ``b = (1 - cos θ) / θ²``, both replaced by their Taylor series for tiny ``θ`` so that
        values and gradients stay finite at ``v = 0``.
    """
    v = _as_float_tensor(v)
    theta2 = (v * v).sum(-1)  # [...]
    small = theta2 < 1e-6
    # Evaluate the closed forms on a safe angle so the discarded branch has finite gradients.
    t = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1 - theta2 / 6, torch.sin(t) / t)
    # 2 sin²(θ/2)/θ² avoids the cancellation in 1 - cos θ for small θ.
    b = torch.where(small, 0.5 - theta2 / 24, 2 * torch.sin(t / 2) ** 2 / (t * t))
    K = _skew(v)  # [..., 3, 3]
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to axis-angle vectors.

    Parameters
    ----------
    R : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 3]`` rotation vectors with angle (norm) in ``[0, π]`` radians.
    """
    q = matrix_to_quaternion(R)  # [..., 4], w ≥ 0
    w, xyz = q[..., 0], q[..., 1:]
    n2 = (xyz * xyz).sum(-1)
    small = n2 < 1e-12
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    # angle / |xyz| with angle = 2 atan2(|xyz|, w); its limit at |xyz| → 0 is 2/w (w ≈ 1 there).
    scale = torch.where(small, 2 / w.clamp(min=0.5), 2 * torch.atan2(n, w) / n)
    return xyz * scale[..., None]


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions ``(w, x, y, z)`` to rotation matrices.

    Parameters
    ----------
    q : torch.Tensor
        ``[..., 4]`` quaternions, scalar first; need not be normalised (``q`` and ``c·q``
        give the same rotation).

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` rotation matrices.
    """
    q = _as_float_tensor(q)
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)  # normalises implicitly
    rows = [
        torch.stack([1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y)], -1),
        torch.stack([s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x)], -1),
        torch.stack([s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)  # [..., 3, 3]


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``(w, x, y, z)`` with ``w ≥ 0``.

    Uses the best conditioned of the four standard formulas (Shepperd's method) per matrix.

    Parameters
    ----------
    R : torch.Tensor
        ``[..., 3, 3]`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``[..., 4]`` unit quaternions, scalar first, sign fixed by ``w ≥ 0``.
    """
    R = _as_float_tensor(R)
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4w², 4x², 4y², 4z²; they sum to 4, so the largest is ≥ 1.
    t = torch.stack(
        [1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], -1
    )  # [..., 4]
    # The clamp only touches candidates that are never selected (selected ones have t ≥ 1);
    # it keeps their square roots and divisions finite for autograd.
    h = torch.sqrt(t.clamp(min=0.1))  # [..., 4] = 2|w|, 2|x|, 2|y|, 2|z|
    # 4wx, 4wy, 4wz (up to the common factor) from the antisymmetric part.
    d0, d1, d2 = r21 - r12, r02 - r20, r10 - r01
    cand = torch.stack(
        [
            torch.stack([h[..., 0] ** 2, d0, d1, d2], -1) / (2 * h[..., 0:1]),
            torch.stack([d0, h[..., 1] ** 2, r01 + r10, r02 + r20], -1) / (2 * h[..., 1:2]),
            torch.stack([d1, r01 + r10, h[..., 2] ** 2, r12 + r21], -1) / (2 * h[..., 2:3]),
            torch.stack([d2, r02 + r20, r12 + r21, h[..., 3] ** 2], -1) / (2 * h[..., 3:4]),
        ],
        -2,
    )  # [..., 4 candidates, 4]
    best = t.argmax(-1)  # [...]
    idx = best[..., None, None].expand(*best.shape, 1, 4)
    q = torch.gather(cand, -2, idx).squeeze(-2)  # [..., 4]
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def sixd_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """6-D representation (two 3-vectors, S²×S²) to rotation matrices by Gram–Schmidt.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., 6]``: ``a1 = x[..., :3]``, ``a2 = x[..., 3:]`` (any non-parallel vectors).

    Returns
    -------
    torch.Tensor
        ``[..., 3, 3]`` whose **rows** are ``b1 = a1/|a1|``, ``b2 = normalize(a2 - (b1·a2) b1)``
        and ``b3 = b1 × b2`` (as cryoDRGN's ``s2s2_to_SO3``).
    """
    x = _as_float_tensor(x)
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)  # [..., 3, 3]


def matrix_to_sixd(R: torch.Tensor) -> torch.Tensor:
    """The first two rows of ``R`` flattened: ``[..., 3, 3]`` → ``[..., 6]``.

    Inverse of :func:`sixd_to_matrix` on rotation matrices.
    """
    R = _as_float_tensor(R)
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def random_rotations(
    n: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``n`` rotations drawn uniformly (Haar measure) on SO(3).

    A normalised 4-D standard Gaussian is uniform on S³, and S³ → SO(3) carries the uniform
    measure to the Haar measure.

    Parameters
    ----------
    n : int
        Number of rotations.
    generator : torch.Generator, optional
        Source of randomness (for reproducibility); numbers are drawn on its device.
    dtype, device
        Of the result.

    Returns
    -------
    torch.Tensor
        ``[n, 3, 3]`` rotation matrices.
    """
    gen_device = generator.device if generator is not None else device
    q = torch.randn(n, 4, generator=generator, dtype=dtype, device=gen_device)  # [n, 4]
    return quaternion_to_matrix(q).to(device=device)


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle in radians of the rotation ``R1ᵀ R2`` (the geodesic distance on SO(3)).

    Computed as ``atan2(sin θ, cos θ)`` with ``cos θ = (tr M - 1)/2`` clamped to ``[-1, 1]``
    and ``sin θ = |vee(M - Mᵀ)|/2``: unlike ``acos`` alone this stays accurate for tiny
    angles (float32 ``acos`` cannot resolve θ below ~3e-4) and has finite gradients
    everywhere.

    Parameters
    ----------
    R1, R2 : torch.Tensor
        ``[..., 3, 3]`` rotation matrices (broadcast against each other).

    Returns
    -------
    torch.Tensor
        ``[...]`` angles in ``[0, π]`` radians.
    """
    R1, R2 = _as_float_tensor(R1), _as_float_tensor(R2)
    M = R1.transpose(-1, -2) @ R2  # [..., 3, 3]
    cos = ((M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1) / 2).clamp(-1.0, 1.0)
    w = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    # Clamp before the sqrt so its gradient stays finite when M is symmetric (θ = 0 or π).
    sin = torch.sqrt((w * w).sum(-1).clamp(min=torch.finfo(w.dtype).tiny)) / 2
    return torch.atan2(sin, cos)
