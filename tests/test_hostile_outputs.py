"""Hostile situations around outputs: overwriting inputs, existing outputs, resuming the wrong
run, dead-end run directories, unwritable places, full disks and file modes.

Every case runs the real command line on tiny files it makes itself and checks what a user
would: the exit status, one line on stderr naming the file (no traceback), nothing partial left
behind, and every file that existed before byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import mrcfile
import numpy as np
import pytest
import yaml

from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.io.guard import OutputError, claim_output_dir, claim_output_file, require_free_space

TINY_TRAIN = ["--epochs", "1", "--box", "16", "--heldout-fraction", "0", "-b", "16", "--seed", "0"]


def snapshot(root) -> dict:
    """``{relative path: sha256}`` of every file below ``root`` (and the directories)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root) + "/"] = "dir"
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


PROGRESS_LINE = re.compile(r"^[^:]+: step \d+/\d+ \(\d+%\)")


def error_lines(stderr: str) -> list:
    """What a command said besides progress (tqdm bars on a terminal, plain "…: step i/n (p%) …"
    lines otherwise) and INFO log lines (the refusal must be one)."""
    return [line for line in stderr.splitlines()
            if line.strip() and "%|" not in line and not line.startswith("INFO ")
            and not PROGRESS_LINE.match(line)]


def refused(capsys, argv, root, *words):
    """Run ``argv``; assert exit 2, one stderr line holding ``words``, ``root`` unchanged."""
    before = snapshot(root)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT_ERROR, (rc, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(root) == before, "files changed although the command was refused"
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    assert main(["simulate", "-o", str(root / "ds"), "-n", "40", "-D", "32", "--snr", "1",
                 "--seed", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(dataset):
    """A one-epoch run on the star of ``dataset`` (box 16)."""
    run = dataset / "run"
    assert main(["train", str(dataset / "ds" / "particles.star"), "-o", str(run), *TINY_TRAIN]) == 0
    return run


@pytest.fixture
def work(dataset, tmp_path):
    """A private copy of the dataset (tests may damage it)."""
    shutil.copytree(dataset / "ds", tmp_path / "ds")
    return tmp_path


# ----------------------------------------------------------------------------- inputs overwritten
def test_parse_poses_onto_its_own_star_is_refused_even_with_force(work, capsys):
    star = str(work / "ds" / "particles.star")
    refused(capsys, ["parse-poses", star, "-o", star, "--force"], work, "is also an input")


def test_output_through_a_symlink_or_hard_link_to_the_input_is_refused(work, capsys):
    star = work / "ds" / "particles.star"
    os.symlink(star, work / "link.star")
    os.link(star, work / "hard.star")
    for out in ("link.star", "hard.star"):
        refused(capsys, ["parse-ctf", str(star), "-o", str(work / out), "--force"], work,
                "is also an input")


def test_downsample_onto_its_own_stack_is_refused(work, capsys):
    stack = str(work / "ds" / "particles.mrcs")
    refused(capsys, ["downsample", stack, "-D", "16", "-o", stack, "--force"], work, "is also an input")


def test_downsample_onto_a_stack_the_star_names_is_refused(work, capsys):
    # The star is the named input, but the stack it points to is read as well.
    refused(capsys, ["downsample", str(work / "ds" / "particles.star"), "-D", "16", "-o",
                     str(work / "ds" / "particles.mrcs"), "--force"], work, "is also an input")


def test_export_onto_the_runs_own_star_is_refused(trained, dataset, capsys, tmp_path):
    sel = tmp_path / "sel.npy"
    np.save(sel, np.arange(12))
    star = str(dataset / "ds" / "particles.star")
    refused(capsys, ["export", str(trained), "--selection", str(sel), "--format", "star", "-o", star,
                     "--force"], dataset, "is also an input")


def test_project_onto_its_own_volume_is_refused(work, capsys):
    vol = str(work / "ds" / "gt" / "state_000.mrc")
    refused(capsys, ["project", vol, "--poses", str(work / "ds" / "poses.pkl"), "-o", vol, "--force"],
            work, "is also an input")


def test_simulate_force_into_a_directory_holding_its_input_volume_is_refused(work, capsys):
    vol = str(work / "ds" / "gt" / "state_000.mrc")
    refused(capsys, ["simulate", "--volumes", vol, "-o", str(work / "ds"), "-n", "4", "--force"],
            work, "contains its input")


def test_analyze_into_the_run_directory_itself_is_refused(trained, dataset, capsys):
    refused(capsys, ["analyze", str(trained), "-o", str(trained), "--force", "--k", "2"], dataset,
            "contains its input")


# ----------------------------------------------------------------------------- existing outputs
def test_simulate_into_an_existing_dataset_needs_force(work, capsys):
    refused(capsys, ["simulate", "-o", str(work / "ds"), "-n", "8", "-D", "32"], work,
            "already exists", "--force")
    assert main(["simulate", "-o", str(work / "ds"), "-n", "8", "-D", "32", "--force"]) == 0
    with mrcfile.open(work / "ds" / "particles.mrcs") as m:
        assert m.data.shape[0] == 8


@pytest.mark.parametrize("command", ["parse-poses", "parse-ctf"])
def test_existing_output_file_needs_force(work, capsys, command):
    out = work / "out.pkl"
    out.write_bytes(b"precious")
    refused(capsys, [command, str(work / "ds" / "particles.star"), "-o", str(out)], work,
            "already exists", "--force")
    assert main([command, str(work / "ds" / "particles.star"), "-o", str(out), "--force"]) == 0
    assert out.read_bytes() != b"precious"


def test_project_and_downsample_refuse_an_existing_stack(work, capsys):
    out = work / "taken.mrcs"
    out.write_bytes(b"x")
    refused(capsys, ["project", str(work / "ds" / "gt" / "state_000.mrc"), "--poses",
                     str(work / "ds" / "poses.pkl"), "-o", str(out)], work, "already exists")
    refused(capsys, ["downsample", str(work / "ds" / "particles.mrcs"), "-D", "16", "-o", str(out)],
            work, "already exists")


def test_fsc_refuses_to_replace_its_default_outputs(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "fsc.txt").write_text("an earlier curve\n")
    a, b = str(work / "ds" / "gt" / "state_000.mrc"), str(work / "ds" / "gt" / "state_009.mrc")
    refused(capsys, ["fsc", a, b], work, "fsc.txt", "already exists")


def test_eval_vol_refuses_a_non_empty_directory(trained, dataset, capsys, tmp_path):
    out = tmp_path / "vols"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(capsys, ["eval-vol", str(trained), "--z", " ".join(["0"] * 8), "-o", str(out)], tmp_path,
            "not empty", "--force")


def test_export_refuses_an_existing_file_without_force(trained, capsys, tmp_path):
    sel = tmp_path / "sel.npy"
    np.save(sel, np.arange(5))
    out = tmp_path / "subset.star"
    out.write_text("mine\n")
    refused(capsys, ["export", str(trained), "--selection", str(sel), "--format", "star", "-o", str(out)],
            tmp_path, "already exists")


# ----------------------------------------------------------------------------- runs and resuming
def test_train_into_an_existing_run_needs_resume_or_force(trained, dataset, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    star = str(dataset / "ds" / "particles.star")
    refused(capsys, ["train", star, "-o", str(run), *TINY_TRAIN], tmp_path, "--resume", "--force")
    (run / "analysis").mkdir()  # an analysis of the old run goes with it
    assert main(["train", star, "-o", str(run), *TINY_TRAIN, "--force"]) == 0
    assert not (run / "analysis").exists()
    old = yaml.safe_load((trained / "config.yaml").read_text())["run_id"]
    assert yaml.safe_load((run / "config.yaml").read_text())["run_id"] != old


def test_resume_refuses_a_checkpoint_from_another_run(trained, dataset, capsys, tmp_path):
    star = str(dataset / "ds" / "particles.star")
    other = tmp_path / "other"
    assert main(["train", star, "-o", str(other), *TINY_TRAIN, "--seed", "5"]) == 0
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.copyfile(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    refused(capsys, ["train", "-o", str(run), "--resume", "--epochs", "2"], tmp_path,
            "last.pt", "belongs to run")


def test_resume_refuses_particles_replaced_under_the_same_path(dataset, capsys, tmp_path):
    shutil.copytree(dataset / "ds", tmp_path / "ds")
    star = str(tmp_path / "ds" / "particles.star")
    run = tmp_path / "run"
    assert main(["train", star, "-o", str(run), *TINY_TRAIN]) == 0
    # Same name, same size, other pixels: re-simulated with another seed.
    with mrcfile.mmap(tmp_path / "ds" / "particles.mrcs", mode="r+") as m:
        m.data[:] = -m.data
    refused(capsys, ["train", "-o", str(run), "--resume", "--epochs", "2"], tmp_path,
            "input data changed", "particles.mrcs")


def test_resume_refuses_another_box(trained, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    refused(capsys, ["train", "-o", str(run), "--resume", "--epochs", "2", "--box", "24"], tmp_path,
            "box_size", "differs")


def test_run_directory_without_a_checkpoint_is_restartable(dataset, capsys, tmp_path):
    """A run killed (or out of disk) before its first checkpoint is no dead end."""
    star = str(dataset / "ds" / "particles.star")
    run = tmp_path / "run"
    assert main(["train", star, "-o", str(run), *TINY_TRAIN]) == 0
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "latents")
    line = refused(capsys, ["train", "-o", str(run), "--resume"], tmp_path, "no checkpoint yet")
    assert "without --resume" in line
    assert main(["train", star, "-o", str(run), *TINY_TRAIN]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()


def test_zero_epochs_is_refused_before_anything_is_written(dataset, capsys, tmp_path):
    refused(capsys, ["train", str(dataset / "ds" / "particles.star"), "-o", str(tmp_path / "run"),
                     "--epochs", "0"], tmp_path, "--epochs", ">= 1")
    assert not (tmp_path / "run").exists()


def test_damaged_log_is_kept_aside_and_the_run_resumes(trained, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "log.csv").write_bytes(b"\x00\xffgarbage,,\n1,2\n")
    assert main(["train", "-o", str(run), "--resume", "--epochs", "2"]) == 0
    kept = [n for n in os.listdir(run) if n.startswith("log.csv.damaged-")]
    assert len(kept) == 1 and (run / kept[0]).read_bytes().startswith(b"\x00\xffgarbage")
    assert (run / "log.csv").read_text().startswith("kind,")


def test_truncated_latents_and_tagged_config_give_one_line(trained, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    latents = run / "latents" / "epoch_001.npy"
    latents.write_bytes(latents.read_bytes()[:100])
    refused(capsys, ["analyze", str(run), "--k", "2"], tmp_path, "epoch_001.npy", "damaged")
    cfg = run / "config.yaml"
    cfg.write_text("!!python/object:os.system {}\n")
    refused(capsys, ["train", "-o", str(run), "--resume", "--epochs", "2"], tmp_path, "config.yaml",
            "not a readable run record")


# ----------------------------------------------------------------------------- bad numbers
def test_projecting_an_empty_map_with_noise_is_refused(work, capsys):
    empty = work / "empty.mrc"
    with mrcfile.new(empty) as m:
        m.set_data(np.zeros((32, 32, 32), np.float32))
        m.voxel_size = 3.0
    refused(capsys, ["project", str(empty), "--poses", str(work / "ds" / "poses.pkl"), "--snr", "0.1",
                     "-o", str(work / "p.mrcs")], work, "constant")
    assert not (work / "p.mrcs").exists()


@pytest.mark.parametrize("argv", [["-b", "0"], ["-D", "0"], ["-D", "15"]])
def test_downsample_bad_numbers_are_one_line(work, capsys, argv):
    refused(capsys, ["downsample", str(work / "ds" / "particles.mrcs"), "-D", "16", *argv, "-o",
                     str(work / "small.mrcs")], work)


# ----------------------------------------------------------------------------- where outputs go
def test_no_room_is_reported_before_writing(tmp_path):
    with pytest.raises(OutputError, match="free"):
        require_free_space(tmp_path / "huge.mrcs", 2 ** 60)
    assert os.listdir(tmp_path) == []


def test_output_whose_parent_is_a_file_is_one_line(work, capsys):
    refused(capsys, ["parse-poses", str(work / "ds" / "particles.star"), "-o",
                     str(work / "ds" / "poses.pkl" / "x.pkl")], work, "not a directory")


def _cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "cryoformer", *args], capture_output=True, text=True,
                          **kwargs)


def _limit_file_size(n_bytes):
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return apply


@pytest.mark.parametrize("command", ["simulate", "downsample", "project"])
def test_disk_full_while_writing_leaves_nothing_behind(work, command):
    """The file system refusing more bytes half way: one line, no .tmp, no partial output."""
    ds = work / "ds"
    argv = {"simulate": ["simulate", "-o", str(work / "new"), "-n", "200", "-D", "32"],
            "downsample": ["downsample", str(ds / "particles.mrcs"), "-D", "16", "-b", "4", "-o",
                           str(work / "small.mrcs")],
            "project": ["project", str(ds / "gt" / "state_000.mrc"), "--poses", str(ds / "poses.pkl"),
                        "--chunk-size", "4", "-o", str(work / "proj.mrcs")]}[command]
    before = snapshot(work)
    proc = _cli(argv, preexec_fn=_limit_file_size(20_000))
    assert proc.returncode == EXIT_INPUT_ERROR, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "too large" in lines[0] or "no space" in lines[0], lines[0]
    assert snapshot(work) == before


def test_disk_full_during_training_is_one_line_and_the_run_restarts(work):
    """The checkpoint cannot be written: one line naming it, and no dead-end run directory."""
    argv = ["train", str(work / "ds" / "particles.star"), "-o", str(work / "run"), *TINY_TRAIN]
    proc = _cli(argv, preexec_fn=_limit_file_size(300_000))
    assert proc.returncode == EXIT_INPUT_ERROR, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "epoch_001.pt" in lines[0] and "cannot be written" in lines[0]
    assert not [f for f in os.listdir(work / "run" / "checkpoints") if f.endswith(".tmp")]
    proc = _cli(argv)  # room again: the same command starts the run afresh
    assert proc.returncode == 0, proc.stderr
    assert (work / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run as another user")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
@pytest.mark.parametrize("command", ["parse-poses", "downsample", "simulate"])
def test_read_only_output_directory_is_one_line(dataset, command):
    """Run as the unprivileged user ``nobody`` against a directory it cannot write."""
    top = tempfile.mkdtemp(prefix="cf-ro-")
    try:
        os.chmod(top, 0o755)
        shutil.copytree(dataset / "ds", os.path.join(top, "ds"))
        for base, dirs, files in os.walk(top):
            for name in dirs:
                os.chmod(os.path.join(base, name), 0o755)
            for name in files:
                os.chmod(os.path.join(base, name), 0o644)
        ds = os.path.join(top, "ds")
        argv = {"parse-poses": ["parse-poses", os.path.join(ds, "particles.star"), "-o",
                                os.path.join(ds, "poses2.pkl")],
                "downsample": ["downsample", os.path.join(ds, "particles.mrcs"), "-D", "16", "-o",
                               os.path.join(ds, "small.mrcs")],
                "simulate": ["simulate", "-n", "4", "-o", os.path.join(ds, "sub")]}[command]
        before = snapshot(top)
        env = {**os.environ, "HOME": top, "MPLCONFIGDIR": top}
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-m", "cryoformer", *argv], capture_output=True,
                              text=True, env=env, cwd=top)
        if "Permission denied" in proc.stderr and "python" in proc.stderr.split("\n")[0]:
            pytest.skip("the unprivileged user cannot run this interpreter")
        assert proc.returncode == EXIT_INPUT_ERROR, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "permission denied" in lines[0], proc.stderr
        assert ".tmp" not in lines[0]
        assert snapshot(top) == before
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask):
    """Maps and stacks on shared storage must be readable by the group (and others at 022)."""
    out = tmp_path / "ds"
    proc = _cli(["simulate", "-o", str(out), "-n", "8", "-D", "32"],
                preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    proc = _cli(["parse-poses", str(out / "particles.star"), "-o", str(out / "p.pkl")],
                preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    seen = 0
    for base, dirs, files in os.walk(out):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(base, name)).st_mode) == 0o777 & ~umask, name
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(base, name)).st_mode) == 0o666 & ~umask, name
            seen += 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert seen >= 8


def test_a_device_is_never_an_output(work, capsys):
    """Renaming a temporary file onto /dev/null would replace the device node itself."""
    a = str(work / "ds" / "gt" / "state_000.mrc")
    refused(capsys, ["fsc", a, a, "-o", os.devnull, "--plot", "none", "--force"], work,
            "not a regular file")


def test_guard_functions_compare_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.star").write_text("x")
    with pytest.raises(OutputError, match="is also an input"):
        claim_output_file("./sub/../a.star", [str(tmp_path / "a.star")], force=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vol.mrc").write_text("x")
    with pytest.raises(OutputError, match="contains its input"):
        claim_output_dir(tmp_path / "d", [tmp_path / "d" / "vol.mrc"], force=True)
    assert claim_output_dir(tmp_path / "new", [tmp_path / "a.star"], force=False)
