"""Pose-refinement view: poses and errors across epochs, against known perturbations."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cryoformer.io import read_poses_pkl
from cryoformer.metrics.pose_error import rotation_errors, shift_errors
from cryoformer.physics.projector import project
from cryoformer.physics.rotations import random_rotations
from cryoformer_widgets.pose_data import PoseHistory, direction_angles, viewing_directions

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def history(tiny_run):
    return PoseHistory(tiny_run)


def test_input_errors_equal_the_known_perturbation(history, tiny_dataset):
    rows = tiny_dataset.run_rows
    assert history.n_particles == rows.size and history.box0 == 32
    assert history.reference == "ground truth"
    err = history.errors("input")
    # poses are stored as float32 rotation matrices: errors are exact to ~1e-6 rad
    np.testing.assert_allclose(err.rotation_rad, tiny_dataset.angles_rad[rows], atol=2e-5)
    np.testing.assert_allclose(err.shift_px, np.linalg.norm(tiny_dataset.shift_offsets_px[rows], axis=1),
                               atol=1e-4)
    assert err.summary["rotation_median_rad"] == pytest.approx(np.median(tiny_dataset.angles_rad[rows]), abs=2e-5)


def test_refined_errors_match_core_pose_error(history, tiny_run, tiny_dataset):
    assert history.refine_poses and history.pretrain_epochs == 1
    assert history.epochs == [0, 1]
    assert history.phase(0) == "pose-only pre-training" and history.phase(1) == "joint"
    truth = read_poses_pkl(tiny_dataset.sim / "gt" / "poses.pkl", box_size=32)
    rows = tiny_dataset.run_rows
    for epoch in history.epochs:
        refined = read_poses_pkl(os.path.join(tiny_run, "poses", f"epoch_{epoch:03d}.pkl"), box_size=32)
        err = history.errors(epoch)
        np.testing.assert_allclose(err.rotation_rad, rotation_errors(refined.rotations, truth.rotations[rows]))
        np.testing.assert_allclose(err.shift_px, shift_errors(refined.shifts_px, truth.shifts_px[rows]))


def test_curves_come_from_pose_errors_csv_and_agree_with_recomputation(history, tiny_run, tmp_path):
    curves = history.curves()
    assert list(curves.stage) == ["input", "pretrained", "train"] and list(curves.epoch) == [0, 0, 1]
    assert set(curves.source) == {"pose_errors.csv"}
    for stage, epoch in (("input", "input"), ("pretrained", 0), ("train", 1)):
        row = curves[curves.stage == stage].iloc[0]
        s = history.errors(epoch).summary
        assert row.rotation_median_deg == pytest.approx(s["rotation_median_deg"], rel=1e-5)
        assert row.shift_median_px == pytest.approx(s["shift_median_px"], rel=1e-4, abs=1e-5)
    # a run without pose_errors.csv: the same curves, computed from poses/epoch_XXX.pkl
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    os.unlink(copy / "pose_errors.csv")
    computed = PoseHistory(str(copy)).curves()
    assert set(computed.source) == {"computed"} and list(computed.stage) == list(curves.stage)
    np.testing.assert_allclose(computed.rotation_median_deg, curves.rotation_median_deg, rtol=1e-5)
    np.testing.assert_allclose(computed.shift_median_px, curves.shift_median_px, rtol=1e-4, atol=1e-5)


def gaussian_blobs(D: int, centres_px: np.ndarray, sigma: float = 1.2) -> torch.Tensor:
    """Volume [z, y, x] with Gaussian blobs at pixel coordinates (x, y, z) relative to the centre."""
    g = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    vol = torch.zeros(D, D, D)
    for cx, cy, cz in centres_px:
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2))
    return vol


def test_viewing_direction_is_the_projection_axis():
    """Two blobs placed along the viewing direction project onto one spot; across it, two."""
    R = random_rotations(4, generator=torch.Generator().manual_seed(5)).numpy()
    d = viewing_directions(R)  # [4, 3]
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, atol=1e-6)
    D = 32
    for Ri, di in zip(R, d):
        along = gaussian_blobs(D, np.stack([7 * di, -7 * di]))
        perp = np.cross(di, [1.0, 0, 0]) if abs(di[0]) < 0.9 else np.cross(di, [0, 1.0, 0])
        perp /= np.linalg.norm(perp)
        across = gaussian_blobs(D, np.stack([7 * perp, -7 * perp]))
        img_along = project(along, torch.as_tensor(Ri[None], dtype=torch.float32))[0]
        img_across = project(across, torch.as_tensor(Ri[None], dtype=torch.float32))[0]
        peak = np.unravel_index(int(torch.argmax(img_along)), (D, D))
        assert abs(peak[0] - D // 2) <= 1 and abs(peak[1] - D // 2) <= 1  # both blobs on the centre
        assert img_along.max() > 1.8 * img_across.max()
    az, el = direction_angles(np.array([[0, 0, 1.0], [0, 1.0, 0], [-1.0, 0, 0]]))
    np.testing.assert_allclose(el, [np.pi / 2, 0, 0], atol=1e-12)
    np.testing.assert_allclose(az[1:], [np.pi / 2, np.pi])


def test_view_slider_updates_the_figure(tiny_run):
    ipywidgets = pytest.importorskip("ipywidgets")
    from cryoformer_widgets import PoseRefinementView  # needs ipywidgets (the Jupyter extra), skipped above

    view = PoseRefinementView(tiny_run)
    assert isinstance(view, ipywidgets.VBox)
    assert (view.epoch.min, view.epoch.max, view.epoch.value) == (0, 1, 1)
    last = bytes(view.image.value)
    assert last.startswith(PNG) and "epoch 1 (joint)" in view.summary.value
    view.epoch.value = 0
    assert bytes(view.image.value).startswith(PNG) and bytes(view.image.value) != last
    assert "epoch 0 (pose-only pre-training)" in view.summary.value
    assert "input poses" in view.summary.value and view.message.value == ""
    median = np.degrees(view.history.errors(0).summary["rotation_median_rad"])
    assert f"{median:.3g}°" in view.summary.value


def test_view_without_refined_poses_and_bad_runs(tiny_run, tmp_path):
    pytest.importorskip("ipywidgets")
    from cryoformer_widgets import PoseRefinementView  # needs ipywidgets (the Jupyter extra), skipped above

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "poses")
    view = PoseRefinementView(str(copy))
    assert view.epoch.disabled and "no refined poses" in view.message.value
    assert bytes(view.image.value).startswith(PNG) and "input poses" in view.summary.value
    bad = PoseRefinementView(str(tmp_path))  # not a run: reported in the widget
    assert bad.history is None and "not a cryoformer training run" in bad.message.value


def test_view_of_a_pose_search_run(tiny_dataset, tmp_path):
    """A --pose-search run has refined poses from epoch 1 on (no epoch 0): the slider spans
    them, and each epoch's errors are the search's."""
    pytest.importorskip("ipywidgets")
    from cryoformer.cli import main
    from cryoformer_widgets import PoseRefinementView  # needs ipywidgets (the Jupyter extra), skipped above

    run_dir = tmp_path / "search_run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny run: threads would only add overhead
    try:
        assert main(["train", str(tiny_dataset.sim / "particles.star"), "-o", str(run_dir),
                     "--poses", str(tiny_dataset.input_poses), "--ind", str(tiny_dataset.ind),
                     "--gt-poses", str(tiny_dataset.sim / "gt" / "poses.pkl"), "--pose-search",
                     "--pose-search-start", "1", "--epochs", "2", "-b", "12", "--box", "16", "--zdim", "3",
                     "--seed", "0", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    view = PoseRefinementView(str(run_dir))
    assert (view.epoch.min, view.epoch.max, view.epoch.value) == (1, 2, 2)
    assert bytes(view.image.value).startswith(PNG) and view.message.value == ""
    view.epoch.value = 1
    median = np.degrees(view.history.errors(1).summary["rotation_median_rad"])
    assert f"{median:.3g}°" in view.summary.value
