"""The contrast-convention check (cryoformer.physics.contrast) on simulated particles.

Data: the embedded hinged molecule at D = 32, 6 Å/px, projected once per module at random
rotations, CTF from ``simulate``'s default ranges; each test adds its own noise. Thresholds were
measured over seeds 0–5 (bench/bench_contrast.py measures the same at D = 64): 400 images at
SNR 0.1 give |z| = 15.7–18.3 against the margin 6; pure noise |z| ≤ 1.3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoformer.metadata import CtfParameters, Poses
from cryoformer.physics.contrast import (
    DEFAULT_MARGIN_Z,
    ContrastEstimate,
    contrast_statistic,
    estimate_contrast,
    estimate_contrast_from_source,
    summarize_contrast,
)
from cryoformer.physics.ctf import apply_ctf, ctf_images
from cryoformer.physics.fourier import shift_images
from cryoformer.physics.noise import particle_support_mask
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations
from cryoformer.simulation.simulate import CtfRanges

D, APIX, N = 32, 6.0, 400

# Small tensors: one torch thread is faster and steadier on a loaded machine (conftest).
pytestmark = pytest.mark.usefixtures("single_thread")


def _ctf_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    r = CtfRanges()
    dfu = rng.uniform(r.defocus_min_angstrom, r.defocus_max_angstrom, n)
    return CtfParameters.from_columns(
        n, box_size=D, pixel_size_angstrom=APIX, defocus_u_angstrom=dfu,
        defocus_v_angstrom=dfu - rng.uniform(0, r.astigmatism_max_angstrom, n),
        astigmatism_angle_deg=rng.uniform(0, 180, n), voltage_kv=r.voltage_kv,
        spherical_aberration_mm=r.spherical_aberration_mm, amplitude_contrast=r.amplitude_contrast,
        phase_shift_deg=r.phase_shift_deg).array


@pytest.fixture(scope="module")
def particles():
    """Centred clean projections ``[N, D, D]``, CTF rows ``[N, 9]`` and the hinged map."""
    from cryoformer.simulation.sources import maps_from_hinged_molecule

    vol = torch.from_numpy(maps_from_hinged_molecule(1, D, APIX).volumes[0])  # [D, D, D]
    rotations = random_rotations(N, generator=torch.Generator().manual_seed(0))  # [N, 3, 3]
    clean = project(vol, rotations)  # [N, D, D]
    return {"clean": clean, "ctf": _ctf_rows(N, np.random.default_rng(0)), "volume": vol.numpy()}


def _stack(clean, ctf, shifts, snr, sign, seed):
    """``sign · (projection moved by −s) ⊛ CTF + noise`` at ``snr``, as ``simulate`` forms them."""
    moved = clean if shifts is None else shift_images(clean, torch.from_numpy(shifts))
    signal = moved if ctf is None else apply_ctf(moved, ctf_images(ctf, D))
    sigma = math.sqrt(float(signal[particle_support_mask(moved)].var()) / snr)
    noise = torch.randn(signal.shape, generator=torch.Generator().manual_seed(seed))
    return sign * signal + sigma * noise


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("convention,sign", [("relion", -1.0), ("cryodrgn", 1.0)])
def test_both_conventions_detected(particles, convention, sign, seed):
    shifts = np.random.default_rng(seed + 10).uniform(-2, 2, (N, 2)).astype(np.float32)
    images = _stack(particles["clean"], particles["ctf"], shifts, 0.1, sign, seed)
    est = estimate_contrast(images.numpy(), particles["ctf"], shifts)
    assert est.convention == convention
    assert est.invert_data is (convention == "relion")
    assert abs(est.z_score) > 2 * DEFAULT_MARGIN_Z  # measured 15.7–18.3
    assert est.n_images == N


@pytest.mark.parametrize("seed", range(5))
def test_pure_noise_is_undecided(particles, seed):
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal((N, D, D)).astype(np.float32))
    shifts = rng.uniform(-2, 2, (N, 2)).astype(np.float32)
    est = estimate_contrast(noise, particles["ctf"], shifts)
    assert est.convention == "undecided"
    assert est.invert_data is None
    assert abs(est.z_score) < 4.0  # a standard normal number; measured ≤ 1.3


def test_constant_offset_and_scale_do_not_matter(particles):
    images = _stack(particles["clean"], particles["ctf"], None, 0.1, -1.0, 3)
    u = contrast_statistic(images, particles["ctf"])
    u2 = contrast_statistic(3.0 * images + 100.0, particles["ctf"])  # detector gain and offset
    assert torch.allclose(u, u2, rtol=1e-3, atol=1e-3)
    assert contrast_statistic(torch.zeros(2, D, D)).tolist() == [0.0, 0.0]  # blank: no verdict


@pytest.mark.parametrize("seed", [0, 1])
def test_without_ctf(particles, seed):
    """CTF-free images: bright particles are ``+projection`` (used as they are)."""
    images = _stack(particles["clean"], None, None, 0.1, 1.0, seed)
    assert estimate_contrast(images, None, None).convention == "cryodrgn"
    assert estimate_contrast(-images, None, None).convention == "relion"
    # Phase-flipping CTF-free images with somebody's CTF would be wrong physics: the verdict
    # must come from the images alone when ctf is None.
    assert abs(estimate_contrast(images, None).z_score) > 2 * DEFAULT_MARGIN_Z  # measured ~50


def test_shifts_recentre_the_particle(particles):
    """Particles far off centre (s = (D/4, 0), so the particle sits at x = −8 px): with the
    pose's shift the right verdict; ignored, too weak; applied the wrong way round (the
    particle moved a further 8 px instead of back), the opposite sign."""
    shifts = np.tile(np.array([[D / 4, 0.0]], np.float32), (N, 1))
    images = _stack(particles["clean"], particles["ctf"], shifts, 0.1, -1.0, 0)
    right = estimate_contrast(images, particles["ctf"], shifts)
    ignored = estimate_contrast(images, particles["ctf"], None)
    wrong_way = estimate_contrast(images, particles["ctf"], -shifts)
    assert right.convention == "relion" and right.z_score < -2 * DEFAULT_MARGIN_Z  # measured −17
    assert abs(ignored.z_score) < abs(right.z_score) / 2  # measured −4.5
    assert wrong_way.z_score > 0  # measured +8


def test_summary_needs_enough_images():
    strong = np.full(30, 1.0) + np.linspace(-0.1, 0.1, 30)
    assert summarize_contrast(strong).convention == "undecided"  # fewer than MIN_IMAGES
    est = summarize_contrast(np.concatenate([strong, strong]))
    assert est.convention == "cryodrgn" and est.n_images == 60
    assert summarize_contrast(np.array([np.nan] * 100)).convention == "undecided"
    assert isinstance(est, ContrastEstimate) and "cryodrgn" in est.summary()


def test_stack_on_disk_in_the_other_convention(tmp_path, particles):
    """``simulate --contrast cryodrgn`` output, read through an ImageSource with its metadata:
    detected as cryoDRGN convention (train's default inversion would be wrong), also from a
    subset of rows and from a Fourier-cropped copy whose metadata stayed at the original box."""
    from cryoformer.io import open_particles, read_ctf_pkl, read_poses_pkl, write_stack
    from cryoformer.physics.fourier import fourier_crop
    from cryoformer.simulation.simulate import SimulationConfig, simulate_dataset

    vol = particles["volume"][None]  # [1, D, D, D]
    cfg = SimulationConfig(n_particles=300, snr=0.1, shift_range_px=3.0, contrast="cryodrgn", seed=4)
    res = simulate_dataset(vol, APIX, cfg, str(tmp_path / "sim"), progress=False)
    poses = read_poses_pkl(res.files["poses"], box_size=D)
    ctf = read_ctf_pkl(res.files["ctf"])
    with open_particles(res.files["particles"]) as src:
        est = estimate_contrast_from_source(src, poses, ctf)
        assert est.convention == "cryodrgn" and est.invert_data is False and est.n_images == 300
        rows = np.arange(50, 250)
        sub = estimate_contrast_from_source(src, poses.subset(rows), ctf.subset(rows), rows=rows,
                                            max_images=160, seed=1)
        assert sub.convention == "cryodrgn" and sub.n_images == 160  # z 9.2–12.7 (seeds 4–7)
        small = fourier_crop(torch.from_numpy(src.images(np.arange(300))), 16).numpy()
    write_stack(str(tmp_path / "small.mrcs"), small, APIX * 2)
    with open_particles(str(tmp_path / "small.mrcs")) as src:
        # Shifts stay in px of the 32 px box (poses.box_size) and are rescaled; CTF rows keep
        # the 32 px box and 6 Å/px, i.e. the same physical box.
        small_est = estimate_contrast_from_source(src, Poses(poses.rotations, poses.shifts_px, D), ctf)
        assert small_est.convention == "cryodrgn"
    with pytest.raises(ValueError):
        estimate_contrast_from_source(src, poses.subset(np.arange(10)), ctf)
