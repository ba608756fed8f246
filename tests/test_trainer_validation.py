"""Held-out images: the split, the batches that avoid them, the loss, best epoch, early stop."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from cryoformer.errors import InputError
from cryoformer.trainer import load_run, train
from cryoformer.trainer import epoch_hooks
from cryoformer.trainer.data import BatchPlan, load_particle_data
from cryoformer.trainer.validation import (ValidationHistory, heldout_count, heldout_loss, heldout_losses,
                                           split_heldout)

from test_trainer_helpers import N_PARTICLES, make_dataset, read_log, tiny_model_config, train_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("validation_data"))


def test_split_is_deterministic_disjoint_and_bounded():
    train_rows, held = split_heldout(1000, 0.05, 2000, seed=3)
    assert held.size == 50 and train_rows.size == 950
    assert np.intersect1d(train_rows, held).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_rows, held])), np.arange(1000))
    again = split_heldout(1000, 0.05, 2000, seed=3)[1]
    np.testing.assert_array_equal(held, again)
    assert not np.array_equal(held, split_heldout(1000, 0.05, 2000, seed=4)[1])
    assert heldout_count(500_000, 0.05, 2000) == 2000  # capped
    assert heldout_count(30, 0.9, 2000) == 27 and heldout_count(21, 0.99, 2000) == 20  # one left to train
    assert heldout_count(10, 0.0, 2000) == 0
    assert heldout_count(300, 0.05, 2000) == 0  # 15 < MIN_HELDOUT: too few to choose an epoch on
    assert split_heldout(10, 0.0, 5, seed=0)[1].size == 0


def test_batches_visit_only_training_rows():
    train_rows, held = split_heldout(103, 0.3, 50, seed=0)
    assert held.size == 31
    plan = BatchPlan(103, 8, seed=1, rows=train_rows)
    for epoch in (1, 2):
        seen = np.concatenate(plan.global_batches(epoch))
        np.testing.assert_array_equal(np.sort(seen), train_rows)  # each training row once
    assert plan.steps_per_epoch() == int(np.ceil(train_rows.size / 8))
    # two ranks split the same global batches
    r0 = list(BatchPlan(103, 8, 1, rank=0, world=2, rows=train_rows).rank_batches(1))
    r1 = list(BatchPlan(103, 8, 1, rank=1, world=2, rows=train_rows).rank_batches(1))
    assert not np.intersect1d(np.concatenate(r0 + r1), held).size


def test_history_best_epoch_and_patience():
    h = ValidationHistory(n_heldout=5)
    for epoch, mse, t in ((1, 0.9, 10.0), (2, 0.7, 20.0), (3, 0.75, 30.0), (4, 0.8, 40.0)):
        h.add(epoch, 10 * epoch, t, mse, True)
    assert h.best_epoch() == 2 and h.epochs_since_best() == 2
    assert h.best_epoch(up_to_elapsed_s=15.0) == 1  # best among epochs written within a budget
    h.add(4, 40, 41.0, 0.5, True)  # a re-evaluated epoch replaces its row
    assert h.best_epoch() == 4 and h.epochs_since_best() == 0 and len(h.rows) == 4
    assert ValidationHistory().best_epoch() is None


def test_run_holds_out_images_and_loads_the_best_epoch(data_dir, tmp_path):
    cfg = train_config(data_dir, tmp_path / "run", epochs=3, heldout_fraction=0.5, lr=1e-2)
    result = train(cfg, tiny_model_config(), progress=False)
    run = cfg.data.outdir
    held = np.load(os.path.join(run, "heldout_indices.npy"))
    assert held.size == 24 and np.unique(held).size == 24
    # 24 training images in batches of 8 -> 3 steps per epoch
    assert result.step == 3 * 3
    summary = json.load(open(os.path.join(run, "validation.json")))
    assert summary["n_heldout"] == 24 and [r["epoch"] for r in summary["history"]] == [1, 2, 3]
    mses = [r["heldout_mse"] for r in summary["history"]]
    assert summary["best_epoch"] == 1 + int(np.argmin(mses))
    log = read_log(run)
    assert list(log[log.kind == "heldout"].epoch) == [1, 2, 3]
    loaded = load_run(run)
    assert loaded.epoch == summary["best_epoch"] and loaded.selected_by == "heldout"
    assert load_run(run, epoch="last").epoch == 3 and load_run(run, epoch="last").selected_by == "latest"
    assert loaded.latents.shape[0] == N_PARTICLES  # held-out particles get latents too

    # The recorded loss is the model's error on images it never trained on, and it is real
    # prediction: lower than predicting empty images (the held-out images' mean square).
    data = dataclasses.replace(load_particle_data(cfg), image_scale=loaded.data["image_scale"])
    rows = np.flatnonzero(np.isin(data.indices, held))
    again = heldout_loss(loaded.model, data, rows, torch.device("cpu"), predicted_poses=False)
    assert again == pytest.approx(mses[loaded.epoch - 1], rel=1e-5)
    empty = float((data.images(rows) ** 2).mean())
    assert again < empty
    # each epoch's per-image losses, in the order of heldout_indices.npy: their mean is the logged
    # loss, and each is that image's own error
    for epoch, mse in enumerate(mses, start=1):
        per_image = np.load(os.path.join(run, "heldout_loss", f"epoch_{epoch:03d}.npy"))
        assert per_image.shape == (held.size,) and float(per_image.mean()) == pytest.approx(mse, rel=1e-5)
    in_file_order = np.array([int(np.flatnonzero(data.indices == h)[0]) for h in held])
    mine = heldout_losses(loaded.model, data, in_file_order, torch.device("cpu"), predicted_poses=False)
    np.testing.assert_allclose(per_image if loaded.epoch == len(mses) else
                               np.load(os.path.join(run, "heldout_loss", f"epoch_{loaded.epoch:03d}.npy")),
                               mine, rtol=1e-4)
    assert np.ptp(mine) > 0  # per image, not one number repeated


def test_heldout_zero_keeps_the_latest_epoch(data_dir, tmp_path):
    cfg = train_config(data_dir, tmp_path / "run", epochs=2, heldout_fraction=0.0, support_mask=False)
    train(cfg, tiny_model_config(), progress=False)
    assert not os.path.exists(os.path.join(cfg.data.outdir, "validation.json"))
    state = torch.load(os.path.join(cfg.data.outdir, "checkpoints", "last.pt"), weights_only=True)
    assert "support" not in state and load_run(cfg.data.outdir).model.support_mask is None  # whole sphere
    assert load_run(cfg.data.outdir).selected_by == "latest" and load_run(cfg.data.outdir).epoch == 2
    with pytest.raises(InputError, match="no held-out loss"):
        load_run(cfg.data.outdir, epoch="best")


def test_early_stop_when_heldout_loss_stops_improving(data_dir, tmp_path, monkeypatch):
    # The stopping rule, isolated from training noise: the held-out loss is made to rise after
    # epoch 1, so a patience of 2 epochs must stop after epoch 3 of 10.
    values = iter([0.5, 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr(epoch_hooks, "heldout_losses", lambda *a, rows=None, **k: np.full(3, next(values)))
    cfg = train_config(data_dir, tmp_path / "run", epochs=10, heldout_fraction=0.5, early_stop_epochs=2)
    result = train(cfg, tiny_model_config(), progress=False)
    assert result.stopped == "early" and result.epoch == 3
    assert load_run(cfg.data.outdir).epoch == 1
    # resuming keeps the run's split (not the caller's default fraction) and its history
    more = train(train_config(data_dir, tmp_path / "run", epochs=10, heldout_fraction=0.3, early_stop_epochs=3),
                 resume=True,
                 progress=False)
    assert more.stopped == "early" and more.epoch == 4
    rows = json.load(open(os.path.join(cfg.data.outdir, "validation.json")))
    assert rows["n_heldout"] == 24 and [r["epoch"] for r in rows["history"]] == [1, 2, 3, 4]


def test_bad_heldout_options(data_dir, tmp_path):
    with pytest.raises(InputError, match="--heldout-fraction"):
        train_config(data_dir, tmp_path / "r", heldout_fraction=1.0)
    with pytest.raises(InputError, match="--early-stop"):
        train_config(data_dir, tmp_path / "r", heldout_fraction=0.0, early_stop_epochs=3)
    with pytest.raises(InputError, match="at least 20 held-out images"):  # 0.1 of 48 particles
        train(train_config(data_dir, tmp_path / "r", heldout_fraction=0.1, early_stop_epochs=3),
              tiny_model_config(), progress=False)
    assert not os.path.exists(tmp_path / "r" / "config.yaml")  # nothing written


def test_partial_epoch_resume_keeps_one_heldout_row_per_epoch(data_dir, tmp_path):
    model_cfg = tiny_model_config()
    train(train_config(data_dir, tmp_path / "a", heldout_fraction=0.5), model_cfg, progress=False)
    stopped = train(train_config(data_dir, tmp_path / "b", heldout_fraction=0.5, max_minutes=1e-9), model_cfg,
                    progress=False)
    assert stopped.stopped == "time" and stopped.step == 1  # epoch 1 partial: scored, then redone
    train(train_config(data_dir, tmp_path / "b", heldout_fraction=0.5), resume=True, progress=False)
    log = read_log(tmp_path / "b")
    assert list(log[log.kind == "heldout"].epoch) == [1, 2]
    a = json.load(open(tmp_path / "a" / "validation.json"))["history"]
    b = json.load(open(tmp_path / "b" / "validation.json"))["history"]
    assert [r["epoch"] for r in b] == [1, 2] and all(r["epoch_complete"] for r in b)
    # the resumed run follows the uninterrupted one, held-out loss included
    np.testing.assert_allclose([r["heldout_mse"] for r in b], [r["heldout_mse"] for r in a], rtol=1e-4)
