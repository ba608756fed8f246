"""Fourier-slice projection and the MAP local pose search against known answers."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import math
import os

import numpy as np
import pytest
import torch

from cryoformer.io.cryodrgn import read_poses_pkl, write_poses_pkl
from cryoformer.io.mrc import read_volume
from cryoformer.metrics.pose_error import rotation_errors, shift_errors
from cryoformer.physics.fourier import fft2_center, frequency_grid_2d
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import axis_angle_to_matrix, matrix_to_axis_angle, random_rotations
from cryoformer.physics.slice_projector import FourierSliceProjector
from cryoformer.refinement import (Particles, PoseSearchConfig, backprojected_references, fit_prior_sigma,
                                   rotation_ball, search_poses, search_with_references)
from cryoformer.refinement.grids import half_band, information_band, search_levels
from cryoformer.simulation.perturb import perturb_poses
from cryoformer.trainer import TrainConfig
from cryoformer.trainer.data import load_particle_data

D = 32
BLOBS = [((3.0, -2.0, 1.0), 2.0, 1.0), ((-5.0, 4.0, -3.0), 1.6, 0.7), ((1.0, 6.0, 5.0), 1.8, 0.5)]


def blob_volume() -> torch.Tensor:
    """Three isotropic Gaussians (centre (x, y, z) px, σ px, amplitude), indexed [z, y, x]."""
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for (cx, cy, cz), s, a in BLOBS:
        vol += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol.float()


def analytic_slice(R: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Continuous FT of the blobs' projection at pose R: each blob lands at R·c in the image."""
    k = freqs.double()
    out = torch.zeros(R.shape[0], k.shape[0], dtype=torch.complex128)
    for (cx, cy, cz), s, a in BLOBS:
        p = R.double() @ torch.tensor([cx, cy, cz], dtype=torch.float64)  # [C, 3] image-frame centre
        amp = a * (2 * np.pi * s * s) ** 1.5 * torch.exp(-2 * np.pi ** 2 * s * s * (k * k).sum(-1))
        phase = -2 * np.pi * (p[:, :2] @ k.T)  # [C, M]
        out += amp * torch.polar(torch.ones_like(phase), phase)
    return out


def test_slices_match_analytic_and_real_space_projection():
    torch.manual_seed(0)
    R = random_rotations(5, generator=torch.Generator().manual_seed(3))
    k = frequency_grid_2d(D, 1.0)
    band = k.norm(dim=-1) <= 0.3
    proj = FourierSliceProjector(blob_volume(), match_trilinear=False)
    got = proj.slices(0, R, k[band])  # [5, M]
    want = analytic_slice(R, k[band])
    rel = (got.to(torch.complex128) - want).abs().norm() / want.abs().norm()
    # Trilinear interpolation of the phase ramp of blobs ~7 px off centre (after the gridding
    # correction): about a per cent at 2× padding, shrinking with the sample spacing.
    assert rel < 0.02
    fine = FourierSliceProjector(blob_volume(), padding=4, match_trilinear=False).slices(0, R, k[band])
    assert (fine.to(torch.complex128) - want).abs().norm() / want.abs().norm() < rel / 3
    # the same convention as the real-space projector and fft2_center (docs/conventions.md); the tent
    # damping of its trilinear sampling is what match_trilinear models
    real_space = fft2_center(project(blob_volume(), R))[:, band]
    rel = (got - real_space).abs().norm() / real_space.abs().norm()
    matched = FourierSliceProjector(blob_volume()).slices(0, R, k[band])
    rel_matched = (matched - real_space).abs().norm() / real_space.abs().norm()
    assert rel_matched < 0.02 and rel_matched < rel / 2
    # a mis-transposed rotation would be far off
    wrong = proj.slices(0, R.transpose(-1, -2), k[band])
    assert ((wrong.to(torch.complex128) - want).abs().norm() / want.abs().norm()) > 0.3


def test_projector_rejects_bad_shapes():
    with pytest.raises(ValueError, match="volumes"):
        FourierSliceProjector(torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="padding"):
        FourierSliceProjector(torch.zeros(4, 4, 4), padding=0)


@pytest.mark.parametrize("bad, match", [({"radius_rad": 0.0}, "radius_rad"),
                                        ({"coarse_step_rad": 1.0, "radius_rad": 0.5}, "coarse_step_rad"),
                                        ({"prior_sigma_rad": -0.1}, "prior_sigma_rad"),
                                        ({"n_references": 0}, "n_references")])
def test_search_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        PoseSearchConfig(**bad)


def test_search_config_from_degrees_and_band_limit():
    cfg = PoseSearchConfig.from_degrees(20.0, 2.0, reference="model", n_references=3)
    assert cfg.radius_rad == np.radians(20.0) and cfg.prior_sigma_rad == np.radians(2.0)
    assert cfg.reference == "model" and cfg.groups() == 3
    assert PoseSearchConfig.from_degrees(20.0).prior_sigma_rad is None  # fitted
    # the model's maps hold nothing beyond the training box's Nyquist; back-projected maps do
    assert cfg.band_limit(64, model_box_size=32) == 0.25 and cfg.band_limit(64) == 0.5
    assert PoseSearchConfig().band_limit(64, model_box_size=32) == 0.5
    assert PoseSearchConfig(max_frequency=0.3).band_limit(64, 32) == 0.3


def test_information_band_keeps_the_shells_that_inform_the_pose():
    freqs = torch.arange(33, dtype=torch.float64) / 64  # shells 0 … 0.5 cycles/px
    flat_to_0p2 = (freqs <= 0.2).double()  # a map with nothing beyond 0.2 cycles/px
    band = information_band(freqs, flat_to_0p2, 0.999, 0.5)
    assert 12 / 64 <= band <= 13 / 64  # the last non-empty shell, 12/64, and half a shell
    assert information_band(freqs, flat_to_0p2, 1.0, 0.5) == 0.5  # 1: the whole band
    assert information_band(freqs, torch.zeros(33), 0.999, 0.4) == 0.4  # an empty map says nothing
    assert information_band(freqs, torch.ones(33), 0.999, 0.3) <= 0.3  # never beyond the cap
    # weighted by k³: a flat spectrum needs nearly the whole band, not the first half of the shells
    assert information_band(freqs, torch.ones(33), 0.9, 0.5) > 0.45


def test_band_limited_search_matches_the_full_band_on_a_smooth_map(sharp_dataset, single_thread):
    """A reference with nothing at high frequency (low-passed as a Wiener filter would) is scored
    on a narrower band, and the poses found are those of the whole band."""
    data = _data(sharp_dataset)
    vols, labels = _true_maps(sharp_dataset)
    smooth = torch.fft.irfftn(torch.fft.rfftn(vols, dim=(-3, -2, -1))
                              * _gaussian_filter(vols.shape[-1]), s=vols.shape[-3:], dim=(-3, -2, -1))
    n = 12
    sub = dataclasses.replace(data, indices=data.indices[:n], poses=data.poses.subset(np.arange(n)),
                              ctf=data.ctf.subset(np.arange(n)))
    runs = {f: search_with_references(smooth, labels[:n], _particles(sub), sub.poses.rotations, sub.poses.shifts_px,
                                      PoseSearchConfig(information_fraction=f), progress=False)
            for f in (1.0, 0.999)}
    full = np.median(rotation_errors(runs[1.0].rotations, data.gt_poses.rotations[:n]))
    cut = np.median(rotation_errors(runs[0.999].rotations, data.gt_poses.rotations[:n]))
    start = np.median(rotation_errors(sub.poses.rotations, data.gt_poses.rotations[:n]))
    # measured 0.159 → 0.119 (whole band) and 0.129 rad (cut): the cut band's noise estimate
    # leaves out the image's unmatched high frequencies, which weakens the prior a little
    assert cut < 0.9 * start and cut < 1.25 * full
    band = information_band(*FourierSliceProjector(smooth).shell_power(), 0.999, 0.5)
    assert band < 0.3  # the band was cut: nothing of the smooth map is left beyond it


def _gaussian_filter(d: int, sigma_cycles: float = 0.08) -> torch.Tensor:
    """``exp(−k²/(2σ²))`` on the rfftn grid of a ``d``-voxel box (k in cycles/voxel)."""
    f = torch.fft.fftfreq(d)
    r = torch.fft.rfftfreq(d)
    k2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + r[None, None, :] ** 2
    return torch.exp(-k2 / (2 * sigma_cycles ** 2))


def test_search_config_level_spacings():
    # half the previous spacing per level (the default), down to final_step_rad
    steps = PoseSearchConfig(radius_rad=0.36).rotation_steps()
    np.testing.assert_allclose(steps, [0.06, 0.03, 0.015, 0.0075])
    # a third with refine_factor=3 (the grids before)
    steps = PoseSearchConfig(radius_rad=0.36, final_step_rad=0.007, refine_factor=3).rotation_steps()
    np.testing.assert_allclose(steps, [0.06, 0.02, 0.02 / 3])
    assert len(PoseSearchConfig(fine_levels=1).rotation_steps()) == 2
    with pytest.raises(ValueError, match="refine_factor"):
        PoseSearchConfig(refine_factor=1)


def test_fine_levels_cover_one_cell_of_the_previous_grid():
    """Each fine level's ball reaches every point of the previous level's cell around its seed
    (half the cell's diagonal), so no rotation between two levels' grids is skipped."""
    for factor in (2, 3):
        cfg = PoseSearchConfig(radius_rad=0.36, refine_factor=factor)
        freqs = torch.zeros(1, 2)
        levels = search_levels(cfg, 64, 0.5, freqs, torch.ones(1))
        steps = cfg.rotation_steps()
        for prev, level, step in zip(steps, levels[1:], steps[1:]):
            vectors = matrix_to_axis_angle(level.rotations)  # [C, 3]
            assert float(vectors.norm(dim=1).max()) <= prev * math.sqrt(3) / 2 + 1e-6
            # a cubic grid of spacing `step` reaching the cell's corners
            assert float(vectors.abs().max()) >= prev / 2 - 1e-6
            assert len(level.rotations) == {2: 27, 3: 81}[factor]


def test_cropped_projector_slices_the_same():
    """Slices within the band are the same (to float32 rounding) from the spectra cropped to
    that band."""
    torch.manual_seed(0)
    vol = torch.randn(2, 16, 16, 16)
    full = FourierSliceProjector(vol)
    crop = full.cropped(0.2)
    assert crop.spectra.shape[-1] < full.spectra.shape[-1]
    k = frequency_grid_2d(16, 1.0).reshape(-1, 2)
    k = k[k.norm(dim=-1) <= 0.2]
    rot = axis_angle_to_matrix(torch.randn(7, 3))
    # the same samples and weights; only the rounding of the grid's [-1, 1] coordinates differs
    want = full.slices(1, rot, k)
    assert float((crop.slices(1, rot, k) - want).abs().max()) < 1e-4 * float(want.abs().max())
    with pytest.raises(ValueError, match="cropped"):
        crop.shell_power()


def test_rotation_ball_is_centred_and_bounded():
    ball = rotation_ball(0.06, 0.36)
    assert torch.equal(ball[0], torch.zeros(3))
    assert float(ball.norm(dim=1).max()) <= 0.36 + 1e-6
    assert len(ball) == 3 * 0 + len({tuple(v) for v in ball.tolist()})  # no duplicates
    # the grid around the origin: 6 per unit distance -> about (4π/3)·6³ points
    assert 850 < len(ball) < 960


def test_fit_prior_sigma_recovers_a_known_width():
    rng = np.random.default_rng(0)
    ball = rotation_ball(0.05, 0.5).double().numpy()  # [C, 3] rotation vectors around the input
    angles = np.linalg.norm(ball, axis=1)[None].repeat(300, 0)  # [N, C]
    for true_sigma, lo, hi in ((0.1, 0.085, 0.12), (0.05, 0.04, 0.062)):
        # True offsets drawn from the prior, each seen through a sharp likelihood on the ball.
        offsets = rng.normal(0.0, true_sigma, size=(300, 3))
        log_lik = -((ball[None] - offsets[:, None]) ** 2).sum(-1) / (2 * 0.02 ** 2)  # [N, C]
        assert lo < fit_prior_sigma(log_lik, angles) < hi


@pytest.fixture(scope="module")
def sharp_dataset(tmp_path_factory):
    """The hinged molecule at D = 32 (2.5 Å/px), SNR 100, ground truth poses perturbed as the paper does."""
    from cryoformer.cli import main

    out = tmp_path_factory.mktemp("pose_search")
    assert main(["simulate", "-o", str(out), "-n", "40", "-D", str(D), "--Apix", "2.5", "--n-states", "2",
                 "--snr", "100", "--shift-range", "2", "--seed", "2"]) == 0
    gt = read_poses_pkl(os.path.join(out, "gt", "poses.pkl"), box_size=D)
    write_poses_pkl(perturb_poses(gt, 0.1, 1.0, seed=4), os.path.join(out, "perturbed.pkl"))
    return out


def _data(out, box=None):
    cfg = TrainConfig.from_flat(particles=os.path.join(out, "particles.mrcs"), poses=os.path.join(out, "perturbed.pkl"),
                      ctf=os.path.join(out, "ctf.pkl"), gt_poses=os.path.join(out, "gt", "poses.pkl"),
                      outdir=os.path.join(out, "unused"), box_size=box)
    return load_particle_data(cfg)


def _particles(data):
    """The search's view of trainer data: its images at the original box."""
    full = dataclasses.replace(data, box_size=data.original_box)
    return Particles(full.images, len(data), data.original_box, None if data.ctf is None else data.ctf.array)


def _true_maps(out):
    """The ground-truth state maps ``[K, D, D, D]`` and each particle's state ``[N]``."""
    vols = torch.stack([torch.from_numpy(read_volume(p)[0]) for p in
                        sorted(glob.glob(os.path.join(out, "gt", "state_*.mrc")))]).float()
    return vols, np.load(os.path.join(out, "gt", "state.npy"))


def test_search_with_true_maps_recovers_poses(sharp_dataset, single_thread):
    data = _data(sharp_dataset)
    vols, labels = _true_maps(sharp_dataset)
    start = (data.poses.rotations.copy(), data.poses.shifts_px.copy())
    res = search_with_references(vols, labels, _particles(data), data.poses.rotations, data.poses.shifts_px,
                                 PoseSearchConfig(max_frequency=0.5), progress=False)
    # the caller's starting poses are left as they were
    np.testing.assert_array_equal(data.poses.rotations, start[0])
    np.testing.assert_array_equal(data.poses.shifts_px, start[1])
    before = np.median(rotation_errors(data.poses.rotations, data.gt_poses.rotations))
    after = np.median(rotation_errors(res.rotations, data.gt_poses.rotations))
    assert before > 0.1 and after < before / 4
    s_before = np.median(shift_errors(data.poses.shifts_px, data.gt_poses.shifts_px))
    s_after = np.median(shift_errors(res.shifts_px, data.gt_poses.shifts_px))
    assert s_after < s_before / 3
    assert 0.03 < res.prior_sigma_rad < 0.4 and res.log_posterior_gain > 0 and res.noise_power > 0
    np.testing.assert_allclose(np.linalg.det(res.rotations), 1.0, atol=1e-4)

    # a fixed strong prior keeps the poses near the input; the wrong map does not help
    stuck = search_with_references(vols, labels, _particles(data), data.poses.rotations, data.poses.shifts_px,
                                   PoseSearchConfig(max_frequency=0.5, prior_sigma_rad=0.002,
                                                    fine_levels=0), progress=False)
    assert np.median(rotation_errors(stuck.rotations, data.poses.rotations)) < 0.01
    blank = search_with_references(torch.roll(vols, 8, dims=-1), labels, _particles(data), data.poses.rotations,
                                   data.poses.shifts_px, PoseSearchConfig(max_frequency=0.5), progress=False)
    assert np.median(rotation_errors(blank.rotations, data.gt_poses.rotations)) > 2 * after


@pytest.mark.gpu
def test_search_on_cuda_matches_cpu(sharp_dataset):
    """The same search on the GPU: the same poses up to floating-point summation order."""
    data = _data(sharp_dataset)
    vols, labels = _true_maps(sharp_dataset)
    cfg = PoseSearchConfig(max_frequency=0.5)
    cpu = search_with_references(vols, labels, _particles(data), data.poses.rotations, data.poses.shifts_px, cfg,
                                 progress=False)
    gpu = search_with_references(vols, labels, _particles(data), data.poses.rotations, data.poses.shifts_px, cfg,
                                 progress=False, device=torch.device("cuda"))
    assert gpu.prior_sigma_rad == pytest.approx(cpu.prior_sigma_rad, rel=0.15)
    assert gpu.noise_power == pytest.approx(cpu.noise_power, rel=1e-3)
    # a near-tie between two grid points may resolve differently: most poses agree to the
    # finest step (0.007 rad), and the errors against the truth are alike
    moved = rotation_errors(gpu.rotations, cpu.rotations)
    assert np.mean(moved < 0.008) > 0.9
    err_cpu = np.median(rotation_errors(cpu.rotations, data.gt_poses.rotations))
    err_gpu = np.median(rotation_errors(gpu.rotations, data.gt_poses.rotations))
    assert err_gpu == pytest.approx(err_cpu, rel=0.1, abs=0.003)


def test_search_reads_full_box_when_training_box_is_smaller(sharp_dataset, single_thread):
    data = _data(sharp_dataset, box=16)
    vols = torch.from_numpy(read_volume(os.path.join(sharp_dataset, "gt", "state_000.mrc"))[0]).float()[None]
    sub = dataclasses.replace(data, indices=data.indices[:5], poses=data.poses.subset(np.arange(5)),
                              ctf=data.ctf.subset(np.arange(5)))
    log = io.StringIO()  # a batch job's log: plain progress lines, no carriage-return redraws
    with contextlib.redirect_stderr(log):
        res = search_with_references(vols, np.zeros(5, dtype=np.int64), _particles(sub), sub.poses.rotations,
                                     sub.poses.shifts_px, PoseSearchConfig(fine_levels=0), progress="lines")
    assert res.rotations.shape == (5, 3, 3) and res.shifts_px.shape == (5, 2)
    assert "pose search: step 5/5 (100%)" in log.getvalue() and "\r" not in log.getvalue()
    with pytest.raises(ValueError, match="references"):
        search_with_references(vols[:, :16, :16, :16], np.zeros(5, dtype=np.int64), _particles(sub),
                               sub.poses.rotations, sub.poses.shifts_px, progress=False)
    with pytest.raises(ValueError, match="labels"):
        search_with_references(vols, np.ones(5, dtype=np.int64), _particles(sub), sub.poses.rotations,
                               sub.poses.shifts_px, progress=False)


def test_backprojected_references_are_gold_standard_pairs(sharp_dataset, single_thread):
    data = _data(sharp_dataset)
    n, D_ = len(data), data.original_box
    groups = np.arange(n) % 3  # three groups, each split into two halves by particle parity
    vols, labels, res = backprojected_references(_particles(data), data.gt_poses.rotations,
                                                 data.gt_poses.shifts_px, groups)
    assert vols.shape == (6, D_, D_, D_) and res.shape == (3,)
    np.testing.assert_array_equal(labels, 2 * groups + np.arange(n) % 2)
    # each half map is built from its own particles: at the true poses, a half map of group 0
    # resembles the true state maps (SNR-100 images), and the two halves of a group agree
    truth = read_volume(os.path.join(sharp_dataset, "gt", "state_000.mrc"))[0]
    c = np.corrcoef(vols[0].numpy().ravel(), truth.ravel())[0, 1]
    assert c > 0.6
    assert np.corrcoef(vols[0].numpy().ravel(), vols[1].numpy().ravel())[0, 1] > 0.8
    assert (res > 2.0).all()


def test_search_poses_with_a_decoder_needs_no_trainer(sharp_dataset, single_thread):
    """The model-reference search from a plain decoder: latents that name the true states decode
    to the true maps, so it finds what the search against the true maps finds."""
    data = _data(sharp_dataset)
    vols, states = _true_maps(sharp_dataset)
    latents = np.eye(2, dtype=np.float32)[states]  # [N, 2]: one-hot state

    def decode(z):  # [k, 2] → [k, D, D, D]: the state maps mixed by the latent
        return torch.einsum("ks,sxyz->kxyz", z, vols)

    cfg = PoseSearchConfig(reference="model", n_references=2, max_frequency=0.5, fine_levels=0)
    res = search_poses(_particles(data), data.poses.rotations, data.poses.shifts_px, latents, cfg,
                       decode=decode, model_box_size=16, progress=False)
    truth = search_with_references(vols, states, _particles(data), data.poses.rotations, data.poses.shifts_px,
                                   cfg, progress=False)
    assert np.median(rotation_errors(res.rotations, truth.rotations)) < 1e-4
    assert res.noise_power == pytest.approx(truth.noise_power, rel=1e-4)
    with pytest.raises(ValueError, match="decoder"):
        search_poses(_particles(data), data.poses.rotations, data.poses.shifts_px, latents, cfg, progress=False)
    with pytest.raises(ValueError, match="one latent per particle"):
        search_poses(_particles(data), data.poses.rotations, data.poses.shifts_px, latents[:3], cfg,
                     decode=decode, progress=False)


@pytest.mark.parametrize("D", [32, 33])
@pytest.mark.parametrize("kmax", [0.2, 0.5])
def test_half_band_sums_equal_the_whole_disc(D, kmax):
    """Weighted sums over the half band equal the sums over the whole disc for real images:
    the squared norm, and the cross term with a shifted real image (Hermitian pairs)."""
    g = torch.Generator().manual_seed(D)
    a, b = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g)
    fa, fb = fft2_center(a), fft2_center(b)
    k = frequency_grid_2d(D, 1.0)
    disc = k.norm(dim=-1) <= kmax
    band, w = half_band(D, kmax)
    assert int(w.sum()) == int(disc.sum()) and int(band.sum()) < 0.6 * int(disc.sum())
    s = torch.tensor([0.7, -1.3])
    phase = torch.polar(torch.ones(D, D), -2 * torch.pi * (k.float() @ s))  # [D, D]
    whole = (fa.conj() * fb * phase)[disc].real.sum()
    half = ((fa.conj() * fb * phase)[band].real * w).sum()
    assert torch.allclose(half, whole, rtol=1e-4, atol=1e-2)
    assert torch.allclose((fa.abs().square()[band] * w).sum(), fa.abs().square()[disc].sum(), rtol=1e-5)
