"""RUN/run.log, progress that reads well in a batch job's log, ``-n``, ``--load`` and
``--cs-class``."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.errors import InputError
from cryoformer.io.cryosparc import cs_pose_vectors
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.trainer import list_epochs, load_run, train
from cryoformer.trainer import distributed as dist_mod
from cryoformer.trainer.build import build_run
from cryoformer.trainer.data import load_particle_data
from cryoformer.trainer.loop import Trainer
from cryoformer.trainer.step import StopFlag
from cryoformer.progress import BARS, LINES, OFF, Progress, progress_style

from test_trainer_helpers import (BOX, N_PARTICLES, checkpoint_params, make_dataset, max_param_diff, read_log,
                                  tiny_model_config, train_config)

STAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("runlog_data"))


def read_run_log(run_dir):
    with open(os.path.join(run_dir, "run.log"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines and all(re.match(STAMP, line) for line in lines), lines[:3]
    return [re.sub(STAMP, "", line) for line in lines]


def starting(lines, prefix):
    return [line for line in lines if line.startswith(prefix)]


@pytest.fixture(scope="module")
def completed(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runlog_runs") / "run"
    cfg = train_config(data_dir, out, epochs=2, box_size=8, heldout_fraction=0.5)
    result = train(cfg, tiny_model_config(box=8), command_line="cryoformer train RUNLOG-TEST", progress=False)
    return out, result


def test_completed_run_log_has_summary_epochs_and_end(completed):
    out, result = completed
    lines = read_run_log(out)
    run_id = yaml.safe_load(open(out / "config.yaml"))["run_id"]
    assert lines[0] == f"start: run {run_id} (new run)"
    stack = out.parent.parent / "runlog_data0" / "particles.mrcs"
    assert starting(lines, "particles: ") == [f"particles: {N_PARTICLES} from {stack}; images in {stack}"]
    # as read (16 px at 8 Å/px) and as trained (--box 8: 16 Å/px)
    assert "box: read 16 px at 8.0000 Å/px; trained at 8 px, 16.0000 Å/px" in lines
    assert starting(lines, "poses: ")[0].endswith("poses.pkl")
    assert starting(lines, "ctf: ")[0].endswith("ctf.pkl")
    contrast = starting(lines, "contrast: ")[0]
    assert "multiplied by -1" in contrast and "checked on the images" in contrast and "z = " in contrast
    assert f"held-out: {N_PARTICLES // 2} images" in starting(lines, "held-out: ")[0]
    device = starting(lines, "device: ")[0]
    assert device.startswith("device: cpu") and f"torch threads {torch.get_num_threads()}" in device
    versions = starting(lines, "versions: ")[0]
    assert "cryoformer 0.1.0" in versions and f"torch {torch.__version__}" in versions and "python 3." in versions
    assert "command: cryoformer train RUNLOG-TEST" in lines
    epochs = starting(lines, "epoch ")
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    log = read_log(out)
    for epoch, line in zip((1, 2), epochs):
        row = log[(log.kind == "epoch") & (log.epoch == epoch)].iloc[0]
        assert f"loss {row['loss']:.5g}" in line, line  # the same numbers as log.csv
        assert "held-out mse " in line and "img/s" in line and "elapsed 0:00:" in line
        assert f"wrote latents, checkpoint epoch_{epoch:03d}.pt" in line
    passes = starting(lines, "pass ")
    assert any(p.startswith("pass latents (epoch 2): 48 particles in ") for p in passes), passes
    assert any(p.startswith("pass held-out (epoch 2): 24 images, mse ") for p in passes), passes
    assert all(p.endswith(" s") for p in passes)
    assert lines[-1] == f"end: completed at step {result.step}; last checkpoint {out / 'checkpoints' / 'last.pt'}"


def test_time_budget_stop_then_resume_appends(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = train_config(data_dir, out, epochs=2, max_minutes=1e-6)  # stops after the first step
    first = train(cfg, tiny_model_config(), progress=False)
    assert first.stopped == "time" and first.step == 1
    before = read_run_log(out)
    assert f"time budget reached at step 1; writing latents for {N_PARTICLES} particles" in before
    assert starting(before, "epoch 1/2 (partial): ")
    assert starting(before, "pass latents (epoch 1): ")
    assert before[-1].startswith("end: time budget (--max-minutes) reached at step 1; last checkpoint ")
    resumed = train(train_config(data_dir, out, epochs=2), resume=True, progress=False)
    assert resumed.stopped == "finished"
    after = read_run_log(out)
    assert after[:len(before)] == before  # appended, never rewritten
    new = after[len(before):]
    assert new[0].endswith("(resumed at train epoch 1, step 1 (batch 1))"), new[0]
    assert "contrast: images multiplied by -1 (RELION/cryoSPARC convention, the default); " \
           "checked when the run started" in new
    assert [e.split(":")[0] for e in starting(new, "epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert new[-1].startswith(f"end: completed at step {resumed.step}; last checkpoint ")


def test_redirected_output_has_plain_lines_and_dash_n(data_dir, tmp_path):
    """A batch job: stdout/stderr are files; no carriage-return bars, one line per epoch."""
    out = tmp_path / "run"
    stdout, stderr = tmp_path / "job.out", tmp_path / "job.err"
    cmd = [sys.executable, "-m", "cryoformer", "train", str(data_dir / "particles.mrcs"), "--poses",
           str(data_dir / "poses.pkl"), "--ctf", str(data_dir / "ctf.pkl"), "-o", str(out), "--device",
           "cpu", "--preset", "n64-c64", "--zdim", "2", "-b", "8", "--box", "8", "-n", "2",
           "--heldout-fraction", "0.5"]
    with open(stdout, "w") as o, open(stderr, "w") as e:
        rc = subprocess.run(cmd, stdout=o, stderr=e, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    text = stdout.read_text() + stderr.read_text()
    assert rc == 0, text
    assert "\r" not in text
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2: step 3/3 \(100%\) loss \S+ img/s \S+ elapsed 0:00:\d\d$",
                         text, re.M), text
        # (24 held-out images in batches of 2 · 8: two steps)
        assert re.search(r"^held-out: step 2/2 \(100%\) img/s", text, re.M), text
    assert list_epochs(out) == [1, 2]  # -n is --epochs
    assert load_run(out).train_config.optimisation.epochs == 2


def test_progress_lines_and_style():
    stream = io.StringIO()
    bar = Progress(10, "epoch 1/3", LINES, every_steps=4, stream=stream, images_per_step=8)
    for _ in range(10):
        bar.update(1, loss=0.5)
    bar.close()
    bar.close()  # a second close writes nothing more
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "epoch 1/3: step 4/10 (40%)", "epoch 1/3: step 8/10 (80%)", "epoch 1/3: step 10/10 (100%)"]
    assert "ETA 0:00:00" in lines[0] and "ETA" not in lines[-1] and "img/s" in lines[0]
    assert "\r" not in stream.getvalue()
    # by time: a line once every_s has passed, whatever the step count
    stream = io.StringIO()
    bar = Progress(1000, "latents", LINES, stream=stream, every_s=0.0)
    bar.update(1)
    assert stream.getvalue().startswith("latents: step 1/1000 (0%)")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_style(True, io.StringIO()) == LINES
    assert progress_style(True, Tty()) == BARS
    assert progress_style(False, Tty()) == OFF
    silent = io.StringIO()
    with Progress(5, "x", OFF, stream=silent) as bar:
        bar.update(5)
    assert silent.getvalue() == ""


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("load_src") / "run"
    train(train_config(data_dir, out, epochs=2, lr=1e-2), tiny_model_config(), progress=False)
    return out


def test_load_starts_from_the_checkpoint_weights(data_dir, source_run, tmp_path):
    ckpt = source_run / "checkpoints" / "epoch_002.pt"
    saved = torch.load(ckpt, weights_only=True)
    cfg = train_config(data_dir, tmp_path / "new", epochs=1, lr=5e-4, load=str(ckpt))
    info = dist_mod.setup("cpu")
    run = build_run(cfg, None, info, resume=False, command_line=None)
    weights = run.model.state_dict()
    assert weights.keys() == saved["model"].keys()
    assert all(torch.equal(weights[k], saved["model"][k]) for k in weights)
    # Adam moments from the checkpoint; the learning rate is this run's
    state = run.optimizer.state_dict()
    assert all(torch.equal(state["state"][i]["exp_avg"], saved["optimizer"]["state"][i]["exp_avg"])
               for i in saved["optimizer"]["state"])
    assert {g["lr"] for g in state["param_groups"]} == {5e-4}
    assert run.state.phase == "start" and run.state.step == 0 and run.run_id != saved["run_id"]
    assert run.loaded_from == str(ckpt)
    # a fresh run's initial weights are far from these
    fresh = build_run(train_config(data_dir, tmp_path / "fresh", epochs=1), tiny_model_config(), info,
                      resume=False, command_line=None)
    assert any(not torch.equal(fresh.model.state_dict()[k], saved["model"][k]) for k in weights)


def test_load_trains_on_from_the_checkpoint(data_dir, source_run, tmp_path):
    """End to end through train(): at a learning rate too small to move them (Adam steps are
    about lr per step), the new run's weights after an epoch are still the checkpoint's,
    while one epoch of the source run moved them by far more than the tolerance."""
    ckpt = source_run / "checkpoints" / "last.pt"
    out = tmp_path / "new"
    result = train(train_config(data_dir, out, epochs=1, lr=1e-9, load=str(ckpt)), progress=False)
    assert result.stopped == "finished" and result.step == 6  # 48 images / 8, from step 0
    _, source = checkpoint_params(ckpt)
    _, loaded = checkpoint_params(out / "checkpoints" / "epoch_001.pt")
    _, source_epoch1 = checkpoint_params(source_run / "checkpoints" / "epoch_001.pt")
    assert max_param_diff(loaded, source) < 1e-6
    assert max_param_diff(source_epoch1, source) > 1e-3
    assert starting(read_run_log(out), "start: ")[0].endswith(f"(new run from the weights of {ckpt})")


def test_load_refuses_mismatch_and_own_run(data_dir, source_run, tmp_path, capsys):
    ckpt = str(source_run / "checkpoints" / "last.pt")
    info = dist_mod.setup("cpu")
    cfg = train_config(data_dir, tmp_path / "new", load=ckpt)
    with pytest.raises(InputError, match=r"model_config.*zdim: 2 in the checkpoint, 3 here"):
        build_run(cfg, tiny_model_config(zdim=3), info, resume=False, command_line=None)
    with pytest.raises(InputError, match="use_orientation_encoder"):
        build_run(train_config(data_dir, tmp_path / "new", load=ckpt, refine_poses=True,
                               pose_pretrain_epochs=1), None, info, resume=False, command_line=None)
    assert not (tmp_path / "new").exists()
    # the run's own checkpoint: that is --resume
    with pytest.raises(InputError, match="--load starts a new run: continue this one with --resume"):
        build_run(train_config(data_dir, source_run, load=ckpt), None, info, resume=False, command_line=None)
    assert main(["train", "-o", str(source_run), "--resume", "--load", ckpt]) == EXIT_INPUT_ERROR
    assert "give one of them" in capsys.readouterr().err
    # from the command line, without model options: the checkpoint's architecture
    out = tmp_path / "cli"
    assert main(["train", str(data_dir / "particles.mrcs"), "--poses", str(data_dir / "poses.pkl"),
                 "--ctf", str(data_dir / "ctf.pkl"), "-o", str(out), "--device", "cpu", "-b", "8",
                 "-n", "1", "--heldout-fraction", "0", "--load", ckpt]) == 0
    assert load_run(out).model_config == load_run(source_run).model_config
    assert yaml.safe_load(open(out / "config.yaml"))["train_config"]["load"] == ckpt


def _two_class_cs(data_dir, path):
    """A cryoSPARC ab-initio-like .cs for the test stack: poses of classes 0 and 1 and no
    alignments3D; class 1 holds the simulation's poses, class 0 other rotations. Class 1 is
    the most likely class of 30 particles (posteriors), class 0 of 18."""
    truth = read_poses_pkl(str(data_dir / "poses.pkl"), box_size=BOX)
    n = len(truth)
    fields = [("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4")]
    for k in (0, 1):
        fields += [(f"alignments_class_{k}/pose", "<f4", (3,)), (f"alignments_class_{k}/shift", "<f4", (2,)),
                   (f"alignments_class_{k}/psize_A", "<f4"), (f"alignments_class_{k}/class_posterior", "<f4")]
    cs = np.zeros(n, dtype=fields)
    cs["blob/shape"], cs["blob/psize_A"] = BOX, 8.0
    cs["alignments_class_1/pose"] = cs_pose_vectors(truth.rotations)
    cs["alignments_class_1/shift"] = truth.shifts_px
    cs["alignments_class_0/pose"] = cs_pose_vectors(truth.rotations[::-1].copy())
    for k in (0, 1):
        cs[f"alignments_class_{k}/psize_A"] = 8.0
    cs["alignments_class_1/class_posterior"] = np.where(np.arange(n) < 30, 0.9, 0.1)
    cs["alignments_class_0/class_posterior"] = 1 - cs["alignments_class_1/class_posterior"]
    with open(path, "wb") as handle:
        np.save(handle, cs)
    return truth


def test_cs_class_chooses_the_class_poses(data_dir, tmp_path, capsys):
    cs_path = tmp_path / "abinit_particles.cs"
    truth = _two_class_cs(data_dir, cs_path)
    argv = ["train", str(data_dir / "particles.mrcs"), "--poses", str(cs_path), "--ctf",
            str(data_dir / "ctf.pkl"), "--device", "cpu", "--preset", "n64-c64", "--zdim", "2", "-b", "8",
            "--box", "8", "-n", "1", "--heldout-fraction", "0"]
    # several classes, no consensus poses: refused in one line that lists them
    assert main(argv + ["-o", str(tmp_path / "refused")]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no consensus poses, but poses of 2 classes: 0 (18 particles most likely), " \
        "1 (30 particles most likely)" in err[0] and "--cs-class K" in err[0], err
    assert not (tmp_path / "refused").exists()
    # --cs-class 1 trains on class 1's poses, and the run records the choice
    out = tmp_path / "run"
    assert main(argv + ["-o", str(out), "--cs-class", "1"]) == 0
    run = load_run(out)
    assert run.train_config.data.cs_class == 1 and list_epochs(out) == [1]
    data = load_particle_data(run.train_config)
    np.testing.assert_allclose(data.poses.rotations, truth.rotations, atol=1e-5)
    np.testing.assert_allclose(data.poses.shifts_px, truth.shifts_px, atol=1e-5)
    # a class the file does not have
    assert main(argv + ["-o", str(tmp_path / "other"), "--cs-class", "2"]) == EXIT_INPUT_ERROR
    assert "class 2 not in the file (classes with poses: 0, 1)" in capsys.readouterr().err


def test_time_budget_keeps_room_for_the_heldout_pass(data_dir, tmp_path):
    """A --max-minutes budget covers the passes after the stop: the reserve is the measured
    held-out time per image (else the training time per image) plus the latent pass's time per
    particle, capped at half the budget."""
    info = dist_mod.setup("cpu")
    cfg = train_config(data_dir, tmp_path / "budget", epochs=1, heldout_fraction=0.5, max_minutes=1.0)
    trainer = Trainer(build_run(cfg, tiny_model_config(), info, resume=False, command_line=None), info,
                      progress=False)
    trainer.state.phase = "train"
    n_heldout = trainer.run.heldout_rows.size
    assert n_heldout > 0
    assert trainer._reserve_after_stop_s(60.0) == 0.0  # nothing measured yet: no guess
    trainer._trained_images, trainer._training_s = 10, 0.5  # 50 ms per image
    assert trainer._reserve_after_stop_s(60.0) == pytest.approx(0.05 * n_heldout)
    trainer._heldout_s_per_image = 0.01  # a measured pass replaces the estimate
    assert trainer._reserve_after_stop_s(60.0) == pytest.approx(0.01 * n_heldout)
    # the latent pass over every particle is reserved for too, once its cost is known
    n_particles = len(trainer.run.data)
    trainer._latent_s_per_particle = 0.002
    assert trainer._reserve_after_stop_s(60.0) == pytest.approx(0.01 * n_heldout + 0.002 * n_particles)
    trainer._latent_s_per_particle = None
    trainer._heldout_s_per_image = 100.0
    assert trainer._reserve_after_stop_s(60.0) == pytest.approx(30.0)  # at most half the budget
    # the stop comes once the elapsed time plus the reserve passes the budget
    trainer.state.elapsed_before_s = 60.0 - 30.0 - 1.0
    trainer._t0 = time.monotonic()
    with StopFlag() as flag:
        assert trainer._stop_reason(flag) is None
        trainer.state.elapsed_before_s = 60.0 - 30.0 + 0.5
        assert trainer._stop_reason(flag) == "time"
    trainer.runlog.close()
    trainer.log.close()


def test_a_budget_too_short_for_the_passes_is_said_at_the_start(data_dir, tmp_path):
    """When the passes after a stop need more than half of --max-minutes, the first training
    step says so (run.log), with the budget that would fit; a long enough budget says nothing."""
    info = dist_mod.setup("cpu")
    for minutes, warned in ((1e-6, True), (600.0, False)):
        out = tmp_path / f"budget{minutes}"
        cfg = train_config(data_dir, out, epochs=1, heldout_fraction=0.5, max_minutes=minutes)
        trainer = Trainer(build_run(cfg, tiny_model_config(), info, resume=False, command_line=None), info,
                          progress=False)
        trainer.state.phase = "train"
        trainer._trained_images, trainer._training_s = 10, 0.5
        trainer._check_budget()
        assert trainer._latent_s_per_particle is not None and trainer._latent_s_per_particle > 0
        # the held-out pass is probed too (forward only), not taken from the training time
        assert trainer._heldout_s_per_image is not None and trainer._heldout_s_per_image != 0.05
        trainer.runlog.close()
        trainer.log.close()
        text = (out / "run.log").read_text()
        assert ("is short for" in text) == warned, text
        if warned:
            assert f"{len(trainer.run.data)} particles" in text and "Give at least --max-minutes" in text
