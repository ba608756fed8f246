"""End-to-end tests of the command-line tool on real files it writes itself."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.io.cryodrgn import read_ctf_pkl, read_poses_pkl, write_ctf_pkl
from cryoformer.io.mrc import read_volume
from cryoformer.io.star import poses_from_star, read_star

COMMANDS = ["simulate", "project", "parse-poses", "parse-ctf", "downsample", "fsc"]


def leftovers(directory):
    """Temporary files a failed command must not leave behind."""
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small noisy dataset from the embedded hinged molecule (D=32, 4 states)."""
    out = tmp_path_factory.mktemp("sim")
    rc = main(["simulate", "-o", str(out), "-n", "96", "-D", "32", "--Apix", "6.0", "--n-states", "4",
               "--snr", "0.1", "--shift-range", "3", "--seed", "3"])
    assert rc == 0
    return out


def test_python_m_entry_point_and_help():
    proc = subprocess.run([sys.executable, "-m", "cryoformer", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in COMMANDS:
        assert cmd in proc.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_subcommand_help_states_units(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert any(unit in text for unit in ("Å", "pixel", "px")), text


def test_simulate_writes_consistent_dataset(dataset):
    for name in ["particles.mrcs", "poses.pkl", "ctf.pkl", "particles.star", "simulation.json",
                 "gt/state.npy", "gt/poses.pkl", "gt/state_000.mrc", "gt/state_003.mrc", "gt/motion.mrc"]:
        assert (dataset / name).is_file(), name
    with mrcfile.open(dataset / "particles.mrcs", permissive=False) as m:
        assert m.data.shape == (96, 32, 32)
        assert float(m.voxel_size.x) == pytest.approx(6.0)
    labels = np.load(dataset / "gt/state.npy")
    assert labels.shape == (96,) and set(labels.tolist()) <= {0, 1, 2, 3}
    # The RELION star and the cryoDRGN pickle describe the same poses.
    star_poses = poses_from_star(read_star(dataset / "particles.star"))
    pkl_poses = read_poses_pkl(dataset / "poses.pkl", box_size=32)
    np.testing.assert_allclose(star_poses.rotations, pkl_poses.rotations, atol=1e-5)
    np.testing.assert_allclose(star_poses.shifts_px, pkl_poses.shifts_px, atol=1e-4)
    assert np.abs(pkl_poses.shifts_px).max() <= 3.0


def test_simulated_snr_within_five_percent(dataset):
    import json

    record = json.loads((dataset / "simulation.json").read_text())
    assert record["measured_snr"] == pytest.approx(0.1, rel=0.05)


def test_noise_free_simulation_equals_reprojection(tmp_path):
    sim = tmp_path / "sim"
    assert main(["simulate", "-o", str(sim), "-n", "12", "-D", "32", "--Apix", "6", "--n-states", "1",
                 "--snr", "inf", "--shift-range", "2"]) == 0
    vol = sim / "gt" / "state_000.mrc"
    for poses in ("poses.pkl", "particles.star"):
        out = tmp_path / f"proj_{poses}.mrcs"
        assert main(["project", str(vol), "--poses", str(sim / poses), "--ctf", str(sim / "ctf.pkl"),
                     "-o", str(out)]) == 0
        with mrcfile.open(out) as a, mrcfile.open(sim / "particles.mrcs") as b:
            np.testing.assert_allclose(a.data, b.data, atol=1e-4 * np.abs(b.data).max())


def test_parse_poses_and_ctf_from_star(dataset, tmp_path):
    assert main(["parse-poses", str(dataset / "particles.star"), "-o", str(tmp_path / "p.pkl")]) == 0
    assert main(["parse-ctf", str(dataset / "particles.star"), "--kv", "200", "-o", str(tmp_path / "c.pkl")]) == 0
    got = read_poses_pkl(tmp_path / "p.pkl", box_size=32)
    ref = read_poses_pkl(dataset / "gt" / "poses.pkl", box_size=32)
    np.testing.assert_allclose(got.rotations, ref.rotations, atol=1e-5)
    np.testing.assert_allclose(got.shifts_px, ref.shifts_px, atol=1e-4)
    ctf, ref_ctf = read_ctf_pkl(tmp_path / "c.pkl"), read_ctf_pkl(dataset / "ctf.pkl")
    np.testing.assert_allclose(ctf.column("voltage_kv"), 200.0)  # the override wins
    for col in ("defocus_u_angstrom", "defocus_v_angstrom", "astigmatism_angle_deg", "pixel_size_angstrom"):
        np.testing.assert_allclose(ctf.column(col), ref_ctf.column(col), rtol=1e-5, atol=1e-3)


def test_downsample_chunked_equals_whole_and_keeps_mean(dataset, tmp_path):
    a, b = tmp_path / "a.mrcs", tmp_path / "b.mrcs"
    assert main(["downsample", str(dataset / "particles.mrcs"), "-D", "16", "-b", "7", "-o", str(a)]) == 0
    assert main(["downsample", str(dataset / "particles.mrcs"), "-D", "16", "-o", str(b)]) == 0
    with mrcfile.open(a) as ma, mrcfile.open(b) as mb, mrcfile.open(dataset / "particles.mrcs") as src:
        assert ma.data.shape == (96, 16, 16)
        assert float(ma.voxel_size.x) == pytest.approx(12.0)
        np.testing.assert_array_equal(ma.data, mb.data)
        np.testing.assert_allclose(ma.data.mean(axis=(1, 2)), src.data.mean(axis=(1, 2)), atol=1e-4)


def test_fsc_of_identical_maps(dataset, tmp_path, capsys):
    vol = dataset / "gt" / "state_000.mrc"
    out, plot = tmp_path / "fsc.txt", tmp_path / "fsc.png"
    assert main(["fsc", str(vol), str(vol), "-o", str(out), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "12.00 Å" in text  # Nyquist at 6 Å/px: the curve never falls below 0.5
    curve = np.loadtxt(out, skiprows=1)
    np.testing.assert_allclose(curve[1:, 1], 1.0, atol=1e-5)
    assert plot.stat().st_size > 1000


def test_fsc_between_end_states_is_worse(dataset, capsys, tmp_path):
    a, b = dataset / "gt" / "state_000.mrc", dataset / "gt" / "state_003.mrc"
    assert main(["fsc", str(a), str(b), "-o", str(tmp_path / "fsc.txt"), "--plot", "none"]) == 0
    text = capsys.readouterr().out
    res = float(text.split("FSC=0.5:")[1].split("Å")[0])
    assert res > 12.5  # the arm moved: worse than Nyquist


# ---- bad input: one clear line, exit status 2, nothing left behind --------------------------

def run_bad(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_INPUT_ERROR
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_missing_volume(tmp_path, dataset, capsys):
    out = tmp_path / "o.mrcs"
    line = run_bad(["project", str(tmp_path / "nope.mrc"), "--poses", str(dataset / "poses.pkl"), "-o", str(out)], capsys)
    assert "nope.mrc" in line and not out.exists() and not leftovers(tmp_path)


def test_truncated_stack(tmp_path, dataset, capsys):
    bad = tmp_path / "cut.mrcs"
    data = (dataset / "particles.mrcs").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.mrcs"
    line = run_bad(["downsample", str(bad), "-D", "16", "-o", str(out)], capsys)
    assert "cut.mrcs" in line and not out.exists() and not leftovers(tmp_path)


def test_not_an_mrc(tmp_path, dataset, capsys):
    bad = tmp_path / "junk.mrc"
    bad.write_bytes(b"this is not an MRC file" * 100)
    line = run_bad(["fsc", str(bad), str(dataset / "gt" / "state_000.mrc"), "-o", str(tmp_path / "f.txt")], capsys)
    assert "junk.mrc" in line and not (tmp_path / "f.txt").exists()


def test_pose_ctf_count_mismatch(tmp_path, dataset, capsys):
    ctf = read_ctf_pkl(dataset / "ctf.pkl")
    write_ctf_pkl(ctf.subset(np.arange(10)), tmp_path / "ctf10.pkl")
    out = tmp_path / "o.mrcs"
    line = run_bad(["project", str(dataset / "gt" / "state_000.mrc"), "--poses", str(dataset / "poses.pkl"),
                    "--ctf", str(tmp_path / "ctf10.pkl"), "-o", str(out)], capsys)
    assert "ctf10.pkl" in line and "96" in line and not out.exists() and not leftovers(tmp_path)


def test_star_missing_column(tmp_path, dataset, capsys):
    text = (dataset / "particles.star").read_text()
    bad = tmp_path / "bad.star"
    bad.write_text(text.replace("_rlnDefocusU", "_rlnSomethingElse"))
    out = tmp_path / "ctf.pkl"
    line = run_bad(["parse-ctf", str(bad), "-o", str(out)], capsys)
    assert "bad.star" in line and "DefocusU" in line and not out.exists() and not leftovers(tmp_path)


def test_unknown_extension(tmp_path, dataset, capsys):
    bad = tmp_path / "poses.json"
    bad.write_text("{}")
    line = run_bad(["parse-poses", str(bad), "-o", str(tmp_path / "p.pkl")], capsys)
    assert "poses.json" in line and not (tmp_path / "p.pkl").exists()


def test_pickle_carrying_code_is_refused(tmp_path, dataset, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    out = tmp_path / "o.mrcs"
    line = run_bad(["project", str(dataset / "gt" / "state_000.mrc"), "--poses", str(evil), "-o", str(out)], capsys)
    assert "evil.pkl" in line and not marker.exists() and not out.exists()


def test_debug_shows_traceback(tmp_path, capsys):
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--debug"])
    assert rc == EXIT_INPUT_ERROR
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hinged_pdb(tmp_path_factory):
    """The hinged molecule at three hinge angles as a multi-model PDB (a tiny 'trajectory')."""
    from cryoformer.simulation.hinged import hinged_molecule_structure

    path = tmp_path_factory.mktemp("pdb") / "hinged.pdb"
    hinged_molecule_structure([0.0, 0.5, 1.0]).write_pdb(str(path))
    return path


def test_simulate_from_atomic_model(hinged_pdb, tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--atomic-model", str(hinged_pdb), "-o", str(out), "-n", "16", "-D", "32",
                 "--Apix", "5", "--snr", "inf", "--no-ctf"]) == 0
    maps = [read_volume(out / "gt" / f"state_{k:03d}.mrc")[0] for k in range(3)]
    # Same atoms in every model: the total scattering potential is conserved, the shape is not.
    assert maps[0].sum() == pytest.approx(maps[2].sum(), rel=1e-3)
    assert np.abs(maps[0] - maps[2]).max() > 0.1 * maps[0].max()
    motion = read_volume(out / "gt" / "motion.mrc")[0]
    assert motion.max() > 20.0  # the arm tip swings by tens of Å
    assert not (out / "ctf.pkl").exists()


def test_simulate_from_trajectory(hinged_pdb, tmp_path):
    pytest.importorskip("MDAnalysis")
    out = tmp_path / "sim"
    assert main(["simulate", "--trajectory", str(hinged_pdb), "--n-states", "3", "--selection", "all",
                 "-o", str(out), "-n", "16", "-D", "32", "--Apix", "5", "--snr", "1"]) == 0
    labels = np.load(out / "gt" / "state.npy")
    assert labels.max() <= 2 and (out / "gt" / "state_002.mrc").exists()
