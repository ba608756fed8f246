"""Pose refinement (paper §3.2): pre-training phase, joint phase, per-epoch poses and errors."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.model import CryoFormer
from cryoformer.trainer import list_epochs, load_run, train

from test_trainer_helpers import N_PARTICLES, make_dataset, max_param_diff, tiny_model_config, train_config


def test_refine_poses_phases_and_outputs(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    cfg = train_config(data_dir, tmp_path / "run", epochs=2, refine_poses=True, pose_pretrain_epochs=3,
                       pose_weight=0.5, pose_warmup_epochs=1, pose_lr_scale=0.25,
                       gt_poses=os.path.join(data_dir, "gt", "poses.pkl"))
    model_cfg = tiny_model_config(use_orientation_encoder=True)
    result = train(cfg, model_cfg, progress=False)
    assert result.stopped == "finished" and result.step == (3 + 2) * 6
    run = tmp_path / "run"
    assert list_epochs(run) == [0, 1, 2]  # epoch 0 = after pose pre-training
    for e in (0, 1, 2):
        poses = read_poses_pkl(run / "poses" / f"epoch_{e:03d}.pkl", box_size=16)
        assert poses.rotations.shape == (N_PARTICLES, 3, 3) and np.isfinite(poses.shifts_px).all()
        det = np.linalg.det(poses.rotations)
        np.testing.assert_allclose(det, 1.0, atol=1e-4)
    errors = pd.read_csv(run / "pose_errors.csv")
    assert list(errors.stage) == ["input", "pretrained", "train", "train"]
    assert list(errors.epoch) == [0, 0, 1, 2]
    assert errors.rotation_median_rad.iloc[0] < 1e-5  # the input poses are the ground truth here
    for col in ("rotation_median_rad", "rotation_mean_square_rad2", "shift_median_px", "shift_mean_square_px2"):
        assert np.isfinite(errors[col]).all()
    log = pd.read_csv(run / "log.csv")
    pre = log[(log.kind == "epoch") & (log.phase == "pretrain")]
    assert list(pre.epoch) == [1, 2, 3] and (pre.mse == 0).all()
    assert pre.pose_loss.iloc[-1] < pre.pose_loss.iloc[0]  # the encoder learns the input poses
    joint = log[(log.kind == "epoch") & (log.phase == "train")]
    assert (joint.mse > 0).all()
    # epoch 1 is the warm-up: rendered at the input poses, no pose loss; epoch 2 is joint
    assert list(joint.pose_loss > 0) == [False, True]
    assert log[log.kind == "pose"].rotation_median_rad.notna().all()
    warm, joint_run = load_run(run, epoch=1).model.state_dict(), load_run(run, epoch=2).model.state_dict()

    # pre-training moved the orientation encoder only
    pretrained_run = load_run(run, epoch=0)
    pretrained = pretrained_run.model.state_dict()
    torch.manual_seed(cfg.optimisation.seed)  # the trainer's initialisation
    init = CryoFormer(pretrained_run.model_config).state_dict()
    enc = {k for k in init if k.startswith("orientation_encoder.")}
    assert max_param_diff({k: init[k] for k in enc}, {k: pretrained[k] for k in enc}) > 1e-4
    rest = [k for k in init if k not in enc]
    assert max_param_diff({k: init[k] for k in rest}, {k: pretrained[k] for k in rest}) == 0
    # the warm-up trained the map only; the joint epoch moved the encoder too
    assert max_param_diff({k: pretrained[k] for k in enc}, {k: warm[k] for k in enc}) == 0
    assert max_param_diff({k: pretrained[k] for k in rest}, {k: warm[k] for k in rest}) > 1e-4
    assert max_param_diff({k: warm[k] for k in enc}, {k: joint_run[k] for k in enc}) > 1e-6


@pytest.mark.parametrize("reference, groups", [("backprojection", None), ("backprojection", 3), ("model", None)])
def test_pose_search_refines_perturbed_poses(tmp_path, reference, groups):
    """--pose-search: poses move, are written per epoch, survive a resume."""
    from cryoformer.io.cryodrgn import write_poses_pkl
    from cryoformer.metrics.pose_error import rotation_errors
    from cryoformer.simulation.perturb import perturb_poses

    data_dir = make_dataset(tmp_path / "data")
    gt_path = os.path.join(data_dir, "gt", "poses.pkl")
    gt = read_poses_pkl(gt_path, box_size=16)
    noisy = os.path.join(tmp_path, "perturbed.pkl")
    write_poses_pkl(perturb_poses(gt, 0.1, 1.0, seed=3), noisy)
    cfg = train_config(data_dir, tmp_path / "run", epochs=2, poses=noisy, pose_search=True,
                       pose_search_start=1, gt_poses=gt_path, pose_search_reference=reference,
                       pose_search_groups=groups)
    result = train(cfg, tiny_model_config(), progress=False)
    assert result.stopped == "finished"
    run = tmp_path / "run"
    errors = pd.read_csv(run / "pose_errors.csv")
    assert list(errors.stage) == ["input", "search", "search"]
    previous = read_poses_pkl(noisy, box_size=16)
    for e in (1, 2):
        poses = read_poses_pkl(run / "poses" / f"epoch_{e:03d}.pkl", box_size=16)
        np.testing.assert_allclose(np.linalg.det(poses.rotations), 1.0, atol=1e-4)
        moved = rotation_errors(poses.rotations, previous.rotations)
        assert np.median(moved) > 1e-3  # each search changed the poses...
        # ...within its radius (the finer levels can add about one coarse cell, radius/6 · √3/2 · 3/2)
        assert moved.max() <= np.radians(cfg.search.pose_search_radius_deg) * 1.22
        previous = poses
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    np.testing.assert_allclose(state["current_rotations"].numpy(), poses.rotations, atol=1e-6)

    # a resumed run continues from the searched poses, not the input ones
    more = train(train_config(data_dir, tmp_path / "run", epochs=3, poses=noisy, pose_search=True,
                              pose_search_start=1, gt_poses=gt_path, pose_search_reference=reference,
                              pose_search_groups=groups),
                 tiny_model_config(), progress=False, resume=True)
    assert more.stopped == "finished"
    assert list(pd.read_csv(run / "pose_errors.csv").stage) == ["input", "search", "search", "search"]


def test_pose_search_and_encoder_together(tmp_path):
    """--pose-search with --refine-poses: each search moves the poses the encoder's pose loss
    pulls towards (the batches carry them), both are logged, and RUN/poses holds the encoder's."""
    from cryoformer.io.cryodrgn import write_poses_pkl
    from cryoformer.metrics.pose_error import rotation_errors
    from cryoformer.simulation.perturb import perturb_poses

    data_dir = make_dataset(tmp_path / "data")
    gt_path = os.path.join(data_dir, "gt", "poses.pkl")
    noisy = os.path.join(tmp_path, "perturbed.pkl")
    write_poses_pkl(perturb_poses(read_poses_pkl(gt_path, box_size=16), 0.1, 1.0, seed=3), noisy)
    cfg = train_config(data_dir, tmp_path / "run", epochs=2, poses=noisy, pose_search=True, pose_search_start=1,
                       refine_poses=True, pose_pretrain_epochs=2, pose_warmup_epochs=0, gt_poses=gt_path,
                       pose_search_groups=1)
    assert train(cfg, tiny_model_config(use_orientation_encoder=True), progress=False).stopped == "finished"
    run = tmp_path / "run"
    errors = pd.read_csv(run / "pose_errors.csv")
    assert list(errors.stage) == ["input", "pretrained", "search", "train", "search", "train"]
    assert list(errors.epoch) == [0, 0, 1, 1, 2, 2]
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    searched = state["current_rotations"].numpy()  # [N, 3, 3] the last search's poses
    given = read_poses_pkl(noisy, box_size=16)
    assert rotation_errors(searched, given.rotations).max() > 1e-3  # the searches moved them
    # the poses file is the encoder's prediction at that epoch (its "train" row), not the searched poses
    written = read_poses_pkl(run / "poses" / "epoch_002.pkl", box_size=16)
    gt = read_poses_pkl(gt_path, box_size=16)
    logged = errors[(errors.epoch == 2) & (errors.stage == "train")].rotation_median_rad.iloc[0]
    assert np.median(rotation_errors(written.rotations, gt.rotations)) == pytest.approx(logged, rel=1e-4)
    assert np.median(rotation_errors(written.rotations, searched)) > 1e-4


def test_pose_pretraining_fits_the_input_poses(tmp_path):
    """Pose-only pre-training is regression onto the input poses: with its learning rate decayed
    to 0 over the phase the encoder reproduces them on the training particles (median well
    under 3°); at a constant rate it stalled at 6–9° (docs/benchmarks.md)."""
    data_dir = make_dataset(tmp_path / "data")
    cfg = train_config(data_dir, tmp_path / "run", epochs=0, refine_poses=True, pose_pretrain_epochs=40,
                       lr=2e-3, gt_poses=os.path.join(data_dir, "gt", "poses.pkl"))
    train(cfg, tiny_model_config(use_orientation_encoder=True, encoder_hidden=128, encoder_layers=4),
          progress=False)
    fitted = read_poses_pkl(tmp_path / "run" / "poses" / "epoch_000.pkl", box_size=16)
    given = read_poses_pkl(os.path.join(data_dir, "poses.pkl"), box_size=16)
    cos = (np.einsum("nij,nij->n", fitted.rotations, given.rotations) - 1) / 2
    median_deg = np.degrees(np.median(np.arccos(np.clip(cos, -1, 1))))
    assert median_deg < 3.0, median_deg
    lrs = pd.read_csv(tmp_path / "run" / "log.csv").query("kind == 'step'").lr.to_numpy()
    assert lrs[0] > 0.9 * 2e-3 and lrs[-1] < 0.01 * 2e-3 and np.all(np.diff(lrs) <= 1e-12)  # the decay


def test_optimizer_state_of_a_one_group_checkpoint_is_regrouped():
    """Checkpoints written before the orientation encoder had its own optimiser group (one group,
    parameters in ``model.parameters()`` order) resume with each parameter's Adam moments."""
    from cryoformer.trainer.build import ENCODER_GROUP, load_optimizer_state, parameter_groups

    torch.manual_seed(0)
    model = CryoFormer(tiny_model_config(use_orientation_encoder=True))
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = old.state_dict()
    new = torch.optim.AdamW(parameter_groups(model), lr=1e-3)
    assert [g.get("name") for g in new.param_groups] == [None, ENCODER_GROUP]
    load_optimizer_state(new, model, saved)
    for p in model.parameters():
        np.testing.assert_array_equal(new.state[p]["exp_avg"].numpy(), old.state[p]["exp_avg"].numpy())
    enc = {id(p) for p in model.orientation_encoder.parameters()}
    assert {id(p) for p in new.param_groups[1]["params"]} == enc
    # a model without the encoder keeps one group, loaded as it is
    plain = CryoFormer(tiny_model_config())
    assert len(parameter_groups(plain)) == 1
