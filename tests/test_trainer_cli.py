"""``cryoformer train`` from the command line: help, bad input, signals, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.io.cryodrgn import read_poses_pkl, write_poses_pkl
from cryoformer.trainer import list_epochs, load_run

from test_trainer_helpers import leftovers, make_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli_data"), n=24, box=16)


def base_args(data_dir, out):
    return [str(data_dir / "particles.mrcs"), "--poses", str(data_dir / "poses.pkl"),
            "--ctf", str(data_dir / "ctf.pkl"), "-o", str(out), "--device", "cpu",
            "--preset", "n64-c64", "--zdim", "2", "-b", "8"]


def test_help_lists_options_with_units(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--poses", "--ctf", "--epochs", "--batch-size", "--lr", "--zdim", "--preset", "--box",
                   "--ind", "--uninvert-data", "--datadir", "--seed", "--max-minutes", "--device",
                   "--num-workers", "--refine-poses", "--pose-pretrain-epochs", "--pose-weight",
                   "--gt-poses", "--resume", "torchrun", "--pose-search", "--pose-search-radius",
                   "--pose-search-prior", "--pose-search-reference", "--pose-search-groups"):
        assert option in text, option
    assert "px" in text and "Å" in text and "minutes" in text


def test_cli_trains_then_resumes_without_repeating_inputs(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *base_args(data_dir, out), "--epochs", "1", "--box", "8"]) == 0
    assert "training finished" in capsys.readouterr().out
    # --resume needs only the run directory; --epochs may grow
    assert main(["train", "-o", str(out), "--resume", "--epochs", "2"]) == 0
    assert list_epochs(out) == [1, 2]
    run = load_run(out)
    assert run.box_size == 8 and run.model_config.zdim == 2 and run.train_config.optimisation.epochs == 2
    assert main(["train", "-o", str(out), "--resume", "--zdim", "4"]) == EXIT_INPUT_ERROR
    assert "model options" in capsys.readouterr().err


def _expect_input_error(capsys, argv, match, out):
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT_ERROR, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryoformer train: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(out) or (not os.listdir(out)), "nothing may be written on bad input"


def test_bad_inputs_give_one_line_and_write_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(data_dir, out)
    # count mismatch between particles and poses
    poses = read_poses_pkl(data_dir / "poses.pkl", box_size=16)
    write_poses_pkl(poses.subset(np.arange(20)), tmp_path / "short.pkl")
    bad = list(args)
    bad[bad.index("--poses") + 1] = str(tmp_path / "short.pkl")
    _expect_input_error(capsys, bad, "has 20 particles", out)
    # missing file
    _expect_input_error(capsys, [str(tmp_path / "missing.mrcs"), *args[1:]], "does not exist", out)
    # --box odd, larger than D
    _expect_input_error(capsys, [*args, "--box", "9"], "--box", out)
    _expect_input_error(capsys, [*args, "--box", "32"], "larger than the images", out)
    # bad --ind: out of range, floats, duplicates, unknown extension
    for name, arr, match in (("range.npy", np.array([0, 99]), "indices must be in [0, 23]"),
                             ("float.npy", np.array([0.5, 1.0]), "integer indices"),
                             ("dup.npy", np.array([1, 1]), "duplicates")):
        np.save(tmp_path / name, arr)
        _expect_input_error(capsys, [*args, "--ind", str(tmp_path / name)], match, out)
    (tmp_path / "ind.txt").write_text("1 2 3")
    _expect_input_error(capsys, [*args, "--ind", str(tmp_path / "ind.txt")], "extension", out)
    # poses missing for a plain stack; resume of a non-run
    no_poses = [a for a in args if a not in ("--poses", str(data_dir / "poses.pkl"))]
    _expect_input_error(capsys, no_poses, "--poses", out)
    _expect_input_error(capsys, ["-o", str(out), "--resume"], "run directory does not exist", out)
    _expect_input_error(capsys, [*args, "--lr", "-1"], "--lr", out)
    _expect_input_error(capsys, [*args, "--pose-search", "--pose-search-radius", "0"], "--pose-search-radius", out)
    _expect_input_error(capsys, [*args, "--pose-search", "--pose-search-prior", "-2"], "--pose-search-prior", out)
    with pytest.raises(SystemExit):  # argparse's choices: a usage line, no traceback
        main(["train", *args, "--pose-search", "--pose-search-reference", "truth"])
    assert "invalid choice: 'truth'" in capsys.readouterr().err


def test_star_input_takes_poses_and_ctf_from_the_file(data_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", str(data_dir / "particles.star"), "-o", str(out), "--epochs", "1",
               "--device", "cpu", "--preset", "n64-c64", "--zdim", "2", "-b", "12", "--box", "8"])
    assert rc == 0
    run = load_run(out)
    assert run.paths["poses"] == run.paths["ctf"] == str(data_dir / "particles.star")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_leaves_loadable_checkpoint(data_dir, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cryoformer", "train", *base_args(data_dir, out), "--epochs", "500",
           "--box", "8", "-b", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (out / "latents" / "epoch_001.npy").exists():  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; checkpoint written" in err and "Traceback" not in err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 6 <= state["step"] < 3000 and state["epoch"] >= 1
    assert not leftovers(out)
    # and the run continues from there
    assert main(["train", "-o", str(out), "--resume", "--epochs", str(state["epoch"] + 1)]) == 0
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert after["epoch"] == state["epoch"] + 1 and after["epoch_complete"]
