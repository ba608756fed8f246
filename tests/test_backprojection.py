"""Direct Fourier inversion inverts the image formation of docs/conventions.md; gold-standard FSC,
the solvent mask and the grouping of the back-projected references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoformer.metrics.fsc import fsc
from cryoformer.physics.backprojection import FourierBackprojector
from cryoformer.physics.ctf import apply_ctf, ctf_images
from cryoformer.physics.fourier import fft2_center
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations
from cryoformer.refinement.references import merge_small_groups, solvent_mask

from test_pose_search import D, blob_volume


def _images(n: int, seed: int, noise_sigma: float = 0.0):
    """Images of the blobs as docs/conventions.md forms them: projection at (R, s), CTF (varied
    defocus), white noise."""
    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(n, generator=g)
    shifts = (torch.rand(n, 2, generator=g) - 0.5) * 4  # ±2 px
    params = np.zeros((n, 9), dtype=np.float32)
    params[:, 0], params[:, 1] = D, 2.5
    params[:, 2] = params[:, 3] = np.linspace(6000, 16000, n)  # Å: the CTF zeros move
    params[:, 5], params[:, 6], params[:, 7] = 300, 2.7, 0.1
    ctf = ctf_images(params, D)  # [n, D, D]
    images = apply_ctf(project(blob_volume(), rot, shifts), ctf)
    images = images + noise_sigma * torch.randn(images.shape, generator=g)
    return rot, shifts, ctf, images


def _reconstruct(rot, shifts, ctf, images, groups=None):
    bp = FourierBackprojector(D, 1 if groups is None else int(groups.max()) + 1)
    n = len(images)
    groups = torch.zeros(n, dtype=torch.long) if groups is None else groups
    for s in range(0, n, 50):  # in batches, as the trainer streams them
        sl = slice(s, s + 50)
        bp.insert(fft2_center(images[sl])[:, bp.band], ctf[sl][:, bp.band], rot[sl], shifts[sl],
                  groups[sl], torch.arange(n)[sl] % 2)
    return bp.reconstruct()


def test_noise_free_images_give_back_the_volume():
    rot, shifts, ctf, images = _images(300, seed=0)
    rec = _reconstruct(rot, shifts, ctf, images)
    truth = blob_volume().numpy()
    freq, curve = fsc(rec.maps[0].numpy(), truth)
    # (above 0.3 cycles/px the blobs' spectrum is below 1 % of its peak)
    assert curve[(freq > 0) & (freq <= 0.3)].min() > 0.95
    # the scale is the volume's, not arbitrary: a least-squares slope of 1 inside the blobs
    m, t = rec.maps[0].numpy().ravel(), truth.ravel()
    inside = t > 0.05 * t.max()
    slope = float((m[inside] * t[inside]).sum() / (t[inside] ** 2).sum())
    assert 0.9 < slope < 1.1
    # two halves of noise-free data agree; the map is their joint estimate
    assert rec.fsc[0][1:10].min() > 0.95  # shells to 0.28 cycles/px
    assert rec.half_maps.shape == (1, 2, D, D, D)


def test_wrong_shift_sign_or_rotation_transpose_ruins_it():
    # the conventions are not symmetric: each mistake is caught by the reconstruction
    rot, shifts, ctf, images = _images(200, seed=1)
    truth = blob_volume().numpy()

    def mid_fsc(rec):
        freq, curve = fsc(rec.maps[0].numpy(), truth)
        return float(curve[(freq > 0.1) & (freq <= 0.3)].mean())

    assert mid_fsc(_reconstruct(rot, shifts, ctf, images)) > 0.95
    assert mid_fsc(_reconstruct(rot, -shifts, ctf, images)) < 0.8
    assert mid_fsc(_reconstruct(rot.transpose(1, 2), shifts, ctf, images)) < 0.5


def test_gold_standard_fsc_tracks_the_noise():
    rot, shifts, ctf, images = _images(400, seed=2, noise_sigma=3.0)
    rec = _reconstruct(rot, shifts, ctf, images)
    curve = rec.fsc[0]
    assert curve[1:4].min() > 0.8  # low frequencies: the blobs dominate
    assert curve[D // 2 - 4:].max() < 0.5  # near Nyquist: the noise does
    res = rec.resolution_px()[0]
    assert 2.0 < res < 16.0
    # the Wiener-filtered map is closer to the truth than the halves' noise would allow unfiltered
    freq, vs_truth = fsc(rec.maps[0].numpy(), blob_volume().numpy())
    assert vs_truth[(freq > 0) & (freq < 0.1)].min() > 0.9


def test_groups_are_reconstructed_separately():
    rot, shifts, ctf, images = _images(200, seed=3)
    groups = torch.zeros(200, dtype=torch.long)
    groups[100:] = 1
    images[100:] *= -1  # group 1 sees the negative of the volume
    rec = _reconstruct(rot, shifts, ctf, images, groups)
    assert rec.maps.shape == (2, D, D, D)
    c = np.corrcoef(rec.maps[0].numpy().ravel(), rec.maps[1].numpy().ravel())[0, 1]
    assert c < -0.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="box_size"):
        FourierBackprojector(2)
    with pytest.raises(ValueError, match="n_groups"):
        FourierBackprojector(16, 0)


def test_solvent_mask_covers_the_molecule_and_little_else():
    vol = blob_volume().numpy()
    mask = solvent_mask(vol)
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask[vol > 0.2 * vol.max()].min() > 0.95  # the molecule is kept whole
    assert mask.mean() < 0.2  # most of the box (solvent) is removed


def test_an_empty_group_gives_a_zero_map_not_nan():
    rot, shifts, ctf, images = _images(40, seed=4)
    bp = FourierBackprojector(D, 2)  # group 1 receives nothing
    bp.insert(fft2_center(images)[:, bp.band], ctf[:, bp.band], rot, shifts,
              torch.zeros(40, dtype=torch.long), torch.arange(40) % 2)
    rec = bp.reconstruct()
    assert torch.isfinite(rec.maps).all() and torch.isfinite(rec.half_maps).all()
    assert float(rec.maps[1].abs().max()) == 0.0 and float(rec.maps[0].abs().max()) > 0
    with pytest.raises(ValueError, match="groups"):
        bp.insert(fft2_center(images)[:, bp.band], ctf[:, bp.band], rot, shifts,
                  torch.full((40,), 2), torch.arange(40) % 2)
    with pytest.raises(ValueError, match="halves"):
        bp.insert(fft2_center(images)[:, bp.band], ctf[:, bp.band], rot, shifts,
                  torch.zeros(40, dtype=torch.long), torch.full((40,), 2))


def test_small_groups_join_the_nearest_large_one():
    latents = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 10.0), np.full((3, 2), 9.0)])
    groups = np.array([0] * 50 + [5] * 50 + [7] * 3)  # labels need not be contiguous
    merged = merge_small_groups(groups, latents, min_size=10)
    np.testing.assert_array_equal(merged, [0] * 50 + [1] * 53)  # the 3 near (10, 10) joined it
    assert (merge_small_groups(groups, latents, min_size=200) == 0).all()  # all small: one group
