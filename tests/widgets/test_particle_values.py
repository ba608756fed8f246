"""Per-particle values read from a run's metadata (no GUI): known answers from tiny files."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from cryoformer.io import load_ctf, load_poses, read_poses_pkl, read_star
from cryoformer.metadata import Poses
from cryoformer.physics.rotations import euler_relion_to_matrix
from cryoformer.trainer import load_run
from cryoformer_widgets.particle_values import (CATEGORICAL, CONTINUOUS, ParticleMetadata, as_particle_value,
                                                colour_levels, read_run_metadata, robust_limits,
                                                robust_view_box, values_from_metadata)

# rot, tilt, psi (deg; tilt away from 0/180, where only rot ± psi is defined), origin x, y (Å),
# defocus U, V (Å)
ROWS = np.array([[10.0, 40.0, -30.0, 2.0, 0.0, 12000.0, 11000.0],
                 [-120.0, 95.0, 150.0, 0.0, -4.0, 20000.0, 20000.0],
                 [170.0, 160.0, 5.0, 3.0, 4.0, 15000.0, 16000.0]])
APIX = 2.0


def _star(path):
    lines = ["data_optics", "loop_", "_rlnOpticsGroup #1", "_rlnImagePixelSize #2", "_rlnImageSize #3",
             "_rlnVoltage #4", "_rlnSphericalAberration #5", "_rlnAmplitudeContrast #6",
             f"1 {APIX} 64 300 2.7 0.1", "", "data_particles", "loop_", "_rlnImageName #1",
             "_rlnAngleRot #2", "_rlnAngleTilt #3", "_rlnAnglePsi #4", "_rlnOriginXAngst #5",
             "_rlnOriginYAngst #6", "_rlnDefocusU #7", "_rlnDefocusV #8", "_rlnDefocusAngle #9",
             "_rlnOpticsGroup #10"]
    lines += [f"{i + 1:06d}@stack.mrcs " + " ".join(f"{v:.4f}" for v in row) + " 0.0 1" for i, row in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_values_from_a_star_file(tmp_path):
    star = _star(tmp_path / "p.star")
    meta = ParticleMetadata(ctf=load_ctf(star).array, input_poses=load_poses(star))
    values = values_from_metadata(meta)
    assert set(values) == {"defocus_angstrom", "astigmatism_angstrom", "rot_deg", "tilt_deg", "psi_deg", "shift_px"}
    assert all(v.kind == CONTINUOUS and v.values.dtype == np.float32 for v in values.values())
    np.testing.assert_allclose(values["defocus_angstrom"].values, [11500, 20000, 15500], rtol=1e-6)
    np.testing.assert_allclose(values["astigmatism_angstrom"].values, [1000, 0, 1000], rtol=1e-6)
    for col, name in enumerate(("rot_deg", "tilt_deg", "psi_deg")):
        np.testing.assert_allclose(values[name].values, ROWS[:, col], atol=1e-3)
    np.testing.assert_allclose(values["shift_px"].values, np.hypot(ROWS[:, 3], ROWS[:, 4]) / APIX, atol=1e-5)
    assert "pose_change_deg" not in values and "held_out" not in values


def test_pose_change_after_refinement():
    R = euler_relion_to_matrix(torch.tensor(ROWS[:, :3])).numpy()
    turn = euler_relion_to_matrix(torch.tensor([[0.0, 0.0, 7.0], [0.0, 0.0, -20.0], [0.0, 0.0, 0.0]])).numpy()
    before = Poses(R, np.zeros((3, 2)), 64)
    after = Poses(turn @ R, np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -1.0]]), 64)
    values = values_from_metadata(ParticleMetadata(input_poses=before, refined_poses=after,
                                                   heldout=np.array([True, False, False])))
    np.testing.assert_allclose(values["pose_change_deg"].values, [7, 20, 0], atol=1e-3)
    np.testing.assert_allclose(values["shift_change_px"].values, [5, 0, 1], atol=1e-6)
    assert values["held_out"].kind == CATEGORICAL and values["held_out"].values.tolist() == [1, 0, 0]


def test_read_run_metadata_pairs_rows_as_training_did(tiny_run, tiny_dataset):
    run = load_run(tiny_run)
    meta, notes = read_run_metadata(run)
    assert notes == []
    star = read_star(tiny_dataset.sim / "particles.star")
    dfu = star.particles["rlnDefocusU"].to_numpy(float)[tiny_dataset.run_rows]
    dfv = star.particles["rlnDefocusV"].to_numpy(float)[tiny_dataset.run_rows]
    values = values_from_metadata(meta)
    np.testing.assert_allclose(values["defocus_angstrom"].values, (dfu + dfv) / 2, rtol=1e-6)
    given = read_poses_pkl(tiny_dataset.input_poses, box_size=32)
    np.testing.assert_allclose(meta.input_poses.rotations, given.rotations[tiny_dataset.run_rows], atol=1e-6)
    np.testing.assert_allclose(meta.input_poses.shifts_px, given.shifts_px[tiny_dataset.run_rows], atol=1e-5)
    assert meta.refined_poses is not None and "pose_change_deg" in values  # trained with --refine-poses


def test_missing_metadata_is_not_offered(tiny_run, tmp_path):
    run = load_run(tiny_run)
    moved = dataclasses.replace(run, paths=dict(run.paths, particles=str(tmp_path / "gone.star"), poses=None,
                                                ctf=None), refined_poses_path=None)
    meta, notes = read_run_metadata(moved)
    assert meta.ctf is None and meta.input_poses is None and values_from_metadata(meta) == {}
    assert len(notes) == 1 and "gone.star" in notes[0]


def test_user_arrays_are_validated():
    idx = np.array([2, 5, 7])
    v = as_particle_value("score", np.array([0.5, np.nan, 2.0]), idx)
    assert v.kind == CONTINUOUS and np.isnan(v.values[1])
    v = as_particle_value("score", np.arange(10, dtype=float), idx)  # one per original particle
    assert v.values.tolist() == [2, 5, 7]
    v = as_particle_value("state", np.array([0, 2, 1]), idx)
    assert v.kind == CATEGORICAL and v.values.dtype == np.int64
    assert as_particle_value("flag", np.array([True, False, True]), idx).values.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="particle 2 is inf"):
        as_particle_value("score", np.array([0.0, 1.0, np.inf]), idx)
    with pytest.raises(ValueError, match="4 values, but the run has 3 particles"):
        as_particle_value("score", np.zeros(4), idx)
    with pytest.raises(ValueError, match="particle 1 has -1"):
        as_particle_value("state", np.array([0, -1, 1]), idx)
    with pytest.raises(ValueError, match="all NaN"):
        as_particle_value("score", np.full(3, np.nan), idx)
    with pytest.raises(ValueError, match="numbers expected"):
        as_particle_value("names", np.array(["a", "b", "c"]), idx)
    with pytest.raises(ValueError, match="shape"):
        as_particle_value("score", np.zeros((3, 2)), idx)
    with pytest.raises(ValueError, match="non-empty name"):
        as_particle_value(" ", np.zeros(3), idx)


def test_robust_limits_view_box_and_levels():
    values = np.concatenate([np.arange(1001, dtype=float), [1e9, np.nan]])
    lo, hi = robust_limits(values)
    assert lo == pytest.approx(np.percentile(values[:-1], 1)) and hi == pytest.approx(np.percentile(values[:-1], 99))
    assert hi < 1100  # one outlier does not stretch the colours
    assert robust_limits(np.full(5, 3.0)) == (2.5, 3.5) and robust_limits(np.full(2, np.nan)) == (0.0, 1.0)
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(0, 1, (10_000, 2)), [[1e6, -1e6]] * 5])
    x0, x1, y0, y1 = robust_view_box(xy)
    assert -0.06 < x0 < 0 and 1 < x1 < 1.06 and -0.06 < y0 < 0 and 1 < y1 < 1.06
    assert robust_view_box(np.zeros((3, 2))) == [-0.05, 0.05, -0.05, 0.05]
    levels = colour_levels(np.array([-5.0, 0.0, 0.5, 1.0, 7.0, np.nan]), 0.0, 1.0)
    assert levels.tolist() == [0, 0, 127, 254, 254, 255]


def test_heldout_losses_colour_the_heldout_particles(tiny_run, tmp_path):
    """``heldout_mse``: each held-out image's loss at the run's epoch, on the right particle (the
    file's order is that of heldout_indices.npy, original stack indices); NaN for the others."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    run = load_run(str(copy))
    rows = np.asarray(run.particle_indices)
    held = np.array([rows[7], rows[2]])  # not in the run's order
    np.save(copy / "heldout_indices.npy", held)
    (copy / "heldout_loss").mkdir(exist_ok=True)
    np.save(copy / "heldout_loss" / f"epoch_{run.epoch:03d}.npy", np.array([0.7, 0.3], np.float32))
    meta, notes = read_run_metadata(load_run(str(copy)))
    assert notes == []
    value = values_from_metadata(meta)["heldout_mse"]
    assert value.kind == CONTINUOUS
    expected = np.full(rows.size, np.nan, np.float32)
    expected[7], expected[2] = 0.7, 0.3
    np.testing.assert_array_equal(value.values, expected)
    # a file that does not match the held-out list is said, not misread
    np.save(copy / "heldout_loss" / f"epoch_{run.epoch:03d}.npy", np.array([0.7], np.float32))
    meta, notes = read_run_metadata(load_run(str(copy)))
    assert meta.heldout_mse is None and len(notes) == 1 and "1 values for 2 images" in notes[0]
