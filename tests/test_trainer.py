"""The trainer on real (simulated) files: outputs, loss, resume equivalence, NaN stop, loading."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import torch
import yaml

from cryoformer.errors import InputError
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.trainer import TrainingDiverged, list_epochs, load_run, train
from cryoformer.trainer.data import BatchPlan

from test_trainer_helpers import (N_PARTICLES, checkpoint_params, leftovers, make_dataset,
                                  max_param_diff, read_log, tiny_model_config, train_config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("trainer_data"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """Four epochs of a tiny variational model (the run most tests read)."""
    out = tmp_path_factory.mktemp("trainer_runs") / "run"
    cfg = train_config(data_dir, out, epochs=4, lr=1e-2)
    result = train(cfg, tiny_model_config(variational=True), command_line="cryoformer train test")
    return cfg, result


def test_run_directory_layout(finished_run):
    cfg, result = finished_run
    run = cfg.data.outdir
    assert result.stopped == "finished" and result.epoch == 4 and result.step == 4 * 6
    for name in ("config.yaml", "log.csv", "particle_indices.npy", "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(run, name)), name
    for e in range(1, 5):
        assert os.path.isfile(os.path.join(run, "checkpoints", f"epoch_{e:03d}.pt"))
        z = np.load(os.path.join(run, "latents", f"epoch_{e:03d}.npy"))
        assert z.shape == (N_PARTICLES, 2) and z.dtype == np.float32 and np.isfinite(z).all()
    assert not leftovers(run)
    doc = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert doc["command"] == "cryoformer train test"
    assert doc["cryoformer_version"]
    assert doc["train_config"]["epochs"] == 4 and doc["model_config"]["variational"] is True
    assert doc["data"]["n_particles"] == N_PARTICLES and doc["data"]["invert_data"] is True
    # weights_only loading: only tensors and plain containers were stored
    state = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
    assert state["step"] == 24 and state["epoch"] == 4 and state["epoch_complete"]


def test_loss_decreases_and_log_columns(finished_run):
    cfg, _ = finished_run
    log = read_log(cfg.data.outdir)
    for col in ("epoch", "step", "loss", "mse", "kl", "lr", "images_per_s", "elapsed_s"):
        assert col in log.columns
    epochs = log[log.kind == "epoch"]
    assert list(epochs.epoch) == [1, 2, 3, 4]
    assert epochs.loss.iloc[-1] < epochs.loss.iloc[0]
    assert (epochs.images_per_s > 0).all() and epochs.elapsed_s.is_monotonic_increasing


def test_load_run(finished_run):
    cfg, _ = finished_run
    assert list_epochs(cfg.data.outdir) == [1, 2, 3, 4]
    run = load_run(cfg.data.outdir)
    assert run.epoch == 4 and not run.model.training
    np.testing.assert_array_equal(run.particle_indices, np.arange(N_PARTICLES))
    assert run.box_size == 16 and run.pixel_size_angstrom == pytest.approx(8.0)
    assert run.paths["particles"] == cfg.data.particles and run.paths["ctf"] == cfg.data.ctf
    vol = run.model.decode_volume(run.latents[0])
    assert vol.shape == (16, 16, 16) and torch.isfinite(vol).all()
    # the latents file is the encoder's mean on the saved weights
    imgs = -torch.from_numpy(mrcfile.read(cfg.data.particles)[:4].copy()) / run.data["image_scale"]
    z = run.model.encode(imgs)["mu"].detach().numpy()
    np.testing.assert_allclose(z, run.latents[:4], rtol=1e-4, atol=1e-5)
    assert load_run(cfg.data.outdir, epoch=2).epoch == 2
    with pytest.raises(InputError, match="epoch 9 not found"):
        load_run(cfg.data.outdir, epoch=9)


def test_load_run_rejects_non_runs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(InputError, match="not a cryoformer training run"):
        load_run(tmp_path)


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    """2 epochs straight == 1 epoch + resume == stop after one step + resume (variational,
    with the support mask, which changes after epoch 1 and must be restored)."""
    model_cfg = tiny_model_config(variational=True)
    straight = train(train_config(data_dir, tmp_path / "a", support_mask=True), model_cfg, progress=False)
    assert straight.step == 12
    train(train_config(data_dir, tmp_path / "b", epochs=1, support_mask=True), model_cfg, progress=False)
    resumed = train(train_config(data_dir, tmp_path / "b"), resume=True, progress=False)
    # a stop inside epoch 1 (time budget), then resume
    stopped = train(train_config(data_dir, tmp_path / "c", max_minutes=1e-9, support_mask=True), model_cfg,
                    progress=False)
    assert stopped.stopped == "time" and stopped.step == 1
    state, _ = checkpoint_params(tmp_path / "c" / "checkpoints" / "last.pt")
    assert state["batch_in_epoch"] == 1 and not state["epoch_complete"]
    assert list_epochs(tmp_path / "c") == [1]  # the partial epoch's latents are written
    assert not load_run(tmp_path / "c").epoch_complete
    resumed_mid = train(train_config(data_dir, tmp_path / "c"), resume=True, progress=False)
    assert resumed.step == resumed_mid.step == 12
    _, pa = checkpoint_params(tmp_path / "a" / "checkpoints" / "last.pt")
    _, pb = checkpoint_params(tmp_path / "b" / "checkpoints" / "last.pt")
    _, pc = checkpoint_params(tmp_path / "c" / "checkpoints" / "last.pt")
    assert max_param_diff(pa, pb) < 1e-6
    assert max_param_diff(pa, pc) < 1e-6
    sa, sb = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["support"] for r in "ab")
    assert torch.equal(sa, sb)
    np.testing.assert_allclose(np.load(tmp_path / "a" / "latents" / "epoch_002.npy"),
                               np.load(tmp_path / "c" / "latents" / "epoch_002.npy"), atol=1e-5)
    # the log of the resumed run reads like the uninterrupted one's
    la, lc = read_log(tmp_path / "a"), read_log(tmp_path / "c")
    assert set(la[la.kind == "step"].step) <= set(lc[lc.kind == "step"].step)  # + the stop row
    assert lc.step.is_monotonic_increasing
    doc = yaml.safe_load(open(tmp_path / "c" / "config.yaml"))
    assert len(doc["resumes"]) == 1


def test_resume_rejects_changed_options(data_dir, finished_run):
    cfg, _ = finished_run
    with pytest.raises(InputError, match="lr"):
        train(train_config(data_dir, cfg.data.outdir, epochs=5, lr=5e-3), resume=True, progress=False)
    with pytest.raises(InputError, match="already holds a training run"):
        train(train_config(data_dir, cfg.data.outdir, epochs=5, lr=1e-2), progress=False)


def test_nan_pixels_are_refused_at_load_and_keep_the_run(data_dir, tmp_path):
    """Epoch 1 trains on clean data; NaN pixels then appear in the stack: the resume is refused
    before a step is taken (the scan at load, and the changed data), the run left as it was."""
    import shutil

    from cryoformer.errors import InputError

    local = tmp_path / "data"
    shutil.copytree(data_dir, local)
    train(train_config(local, tmp_path / "run", epochs=1), tiny_model_config(), progress=False)
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    with mrcfile.mmap(local / "particles.mrcs", mode="r+") as m:
        m.data[3, 4:8, 4:8] = np.nan
    with pytest.raises(InputError, match=r"NaN or infinite.*particles 3"):
        train(train_config(local, tmp_path / "run", epochs=2), resume=True, progress=False)
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == good["step"] == 6
    assert max_param_diff(after["model"], good["model"]) == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """Images that turn non-finite while training (a failing disk under a memory map): the
    step is not taken and the last good checkpoint stays."""
    from cryoformer.trainer.data import ParticleData

    train(train_config(data_dir, tmp_path / "run", epochs=1), tiny_model_config(), progress=False)
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    clean_images = ParticleData.images

    def failing_read(self, positions, normalise=True):
        imgs = clean_images(self, positions, normalise)
        return imgs * float("nan") if normalise else imgs  # training batches only
    monkeypatch.setattr(ParticleData, "images", failing_read)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at train epoch 2.*last good checkpoint"):
        train(train_config(data_dir, tmp_path / "run", epochs=2), resume=True, progress=False)
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == good["step"] == 6
    assert max_param_diff(after["model"], good["model"]) == 0
    assert list_epochs(tmp_path / "run") == [1]


def test_subset_box_and_uninvert(data_dir, tmp_path):
    """--ind selects particles (latents in --ind order); --box crops; shifts are rescaled."""
    ind = np.array([5, 3, 40, 7, 11, 0, 20, 33], dtype=np.int64)
    np.save(tmp_path / "ind.npy", ind)
    cfg = train_config(data_dir, tmp_path / "run", epochs=1, ind=str(tmp_path / "ind.npy"),
                       box_size=8, invert_data=False, batch_size=3)
    result = train(cfg, tiny_model_config(box=8), progress=False)
    assert result.step == 3  # 8 particles in batches of 3: 3 + 3 + 2
    run = load_run(cfg.data.outdir)
    np.testing.assert_array_equal(run.particle_indices, ind)
    assert run.latents.shape == (8, 2) and run.box_size == 8 and run.original_box_size == 16
    assert run.pixel_size_angstrom == pytest.approx(16.0)
    assert run.data["invert_data"] is False
    from cryoformer.trainer.data import load_particle_data

    data = load_particle_data(cfg)
    batch = data.batch(np.array([0, 1]))
    poses = read_poses_pkl(os.path.join(data_dir, "poses.pkl"), box_size=16)
    np.testing.assert_allclose(batch["shifts_px"].numpy(), poses.shifts_px[[5, 3]] * 0.5, rtol=1e-6)
    assert batch["images"].shape == (2, 8, 8)


def test_batch_plan_shards_global_batches():
    one = BatchPlan(10, 4, seed=1)
    ranks = [BatchPlan(10, 4, seed=1, rank=r, world=2) for r in range(2)]
    g = one.global_batches(3)
    assert [b.size for b in g] == [4, 4, 2]
    for k, (a, b) in enumerate(zip(*[list(p.rank_batches(3)) for p in ranks])):
        np.testing.assert_array_equal(np.concatenate([a, b]), g[k])
    assert sorted(np.concatenate(g).tolist()) == list(range(10))
    np.testing.assert_array_equal(np.concatenate(list(one.rank_batches(3, start=1))), np.concatenate(g[1:]))
    assert not np.array_equal(one.global_batches(1)[0], one.global_batches(2)[0])
    with pytest.raises(InputError, match="not divisible"):
        BatchPlan(10, 5, seed=0, world=2)


def test_support_mask_saved_and_applied(finished_run):
    """After each epoch the density is limited to a mask around the molecule; the checkpoint
    keeps it and decoding a loaded run gives zero outside it."""
    cfg, _ = finished_run
    state, _ = checkpoint_params(os.path.join(cfg.data.outdir, "checkpoints", "epoch_004.pt"))
    mask = state["support"]
    assert mask.dtype == torch.bool and mask.shape == (16, 16, 16)
    assert 0 < int(mask.sum()) <= 16 ** 3
    run = load_run(cfg.data.outdir)
    assert torch.equal(run.model.support_mask, mask)
    vol = run.model.decode_volume(run.latents[:2])
    assert (vol[:, ~mask] == 0).all() and (vol[:, mask] != 0).any()


def test_first_support_mask_within_epoch_1_after_the_given_images(data_dir, tmp_path):
    """With --support-after 24 (3 of the 6 steps of 8 images), epoch 1 makes its mask after
    step 3 and trains the rest under it; its checkpoint holds that mask and decodes to zero
    outside. The default (2000 images) leaves a set this small without one until epoch 2."""
    from cryoformer.trainer import TrainConfig

    out = tmp_path / "run"
    cfg = train_config(data_dir, out, epochs=1, support_after_images=24)
    train(cfg, tiny_model_config(), command_line="cryoformer train test")
    state, _ = checkpoint_params(os.path.join(out, "checkpoints", "epoch_001.pt"))
    mask = state.get("support")
    assert mask is not None and mask.dtype == torch.bool and 0 < int(mask.sum()) < 16 ** 3
    assert "support mask (epoch 1, after 3 of 6 steps)" in open(os.path.join(out, "run.log")).read()
    run = load_run(str(out))
    vol = run.model.decode_volume(run.latents[:2])
    assert (vol[:, ~mask] == 0).all() and (vol[:, mask] != 0).any()

    plain = tmp_path / "plain"
    train(train_config(data_dir, plain, epochs=1), tiny_model_config(), command_line="cryoformer train test")
    state, _ = checkpoint_params(os.path.join(plain, "checkpoints", "epoch_001.pt"))
    assert state.get("support") is None
    assert "support mask" not in open(os.path.join(plain, "run.log")).read()
    # a run saved before the option existed resumes with its first mask at epoch 2, as it ran
    saved = cfg.to_dict()
    del saved["support_after_images"]
    assert TrainConfig.from_dict(saved).support.support_after_images == 0
    with pytest.raises(InputError, match="--support-after"):
        train_config(data_dir, tmp_path / "bad", support_after_images=-1)


@pytest.mark.parametrize("field, value, option", [
    ("pose_search_reference", "truth", "--pose-search-reference"),
    ("pose_search_radius_deg", 0.0, "--pose-search-radius"),
    ("pose_search_start", 0, "--pose-search-start"),
    ("pose_search_groups", 0, "--pose-search-groups"),
])
def test_bad_pose_search_options_name_the_option(data_dir, tmp_path, field, value, option):
    with pytest.raises(InputError, match=option):
        train_config(data_dir, tmp_path / "run", pose_search=True, **{field: value})


def test_runs_saved_before_the_reference_option_resume_as_they_ran(data_dir, tmp_path):
    from cryoformer.trainer import TrainConfig

    cfg = train_config(data_dir, tmp_path / "run", pose_search=True)
    saved = cfg.to_dict()
    del saved["pose_search_reference"], saved["pose_search_groups"]  # as written before they existed
    # `cryoformer train -o RUN --resume` rebuilds the config from the saved one: still the model's maps
    assert TrainConfig.from_dict(saved).search.pose_search_reference == "model"
    # a new config with the new default is refused, naming the option, rather than switching silently
    assert cfg.resume_mismatches(saved) == ["pose_search_reference"]
    assert cfg.resume_mismatches(cfg.to_dict()) == []
    # without --pose-search the option never mattered
    plain = train_config(data_dir, tmp_path / "run2").to_dict()
    del plain["pose_search_reference"]
    assert TrainConfig.from_dict(plain).search.pose_search_reference == "backprojection"
