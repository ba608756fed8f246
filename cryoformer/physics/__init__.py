"""Image-formation physics: rotations, Fourier tools, projection, CTF and noise.

All functions are torch, batched over leading dimensions, differentiable where it makes sense,
float32 by default and device-agnostic. Conventions: docs/conventions.md and ``docs/architecture.md``.
"""

from cryoformer.physics.ctf import apply_ctf, compute_ctf, ctf_images, electron_wavelength_angstrom
from cryoformer.physics.fourier import (
    fft2_center,
    fourier_crop,
    frequency_grid_2d,
    ifft2_center,
    shift_images,
)
from cryoformer.physics.noise import add_noise, particle_support_mask, signal_variance
from cryoformer.physics.projector import project, rotated_sample_points, to_normalized
from cryoformer.physics.rotations import (
    axis_angle_to_matrix,
    euler_relion_to_matrix,
    geodesic_distance,
    matrix_to_axis_angle,
    matrix_to_euler_relion,
    matrix_to_quaternion,
    matrix_to_sixd,
    quaternion_to_matrix,
    random_rotations,
    sixd_to_matrix,
)

__all__ = [
    "add_noise",
    "apply_ctf",
    "axis_angle_to_matrix",
    "compute_ctf",
    "ctf_images",
    "electron_wavelength_angstrom",
    "euler_relion_to_matrix",
    "fft2_center",
    "fourier_crop",
    "frequency_grid_2d",
    "geodesic_distance",
    "ifft2_center",
    "matrix_to_axis_angle",
    "matrix_to_euler_relion",
    "matrix_to_quaternion",
    "matrix_to_sixd",
    "particle_support_mask",
    "project",
    "quaternion_to_matrix",
    "random_rotations",
    "rotated_sample_points",
    "shift_images",
    "signal_variance",
    "sixd_to_matrix",
    "to_normalized",
]
