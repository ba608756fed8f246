"""Refined poses back out: `export` writes a run's refined (or input) poses into RELION .star,
cryoSPARC .cs and cryoDRGN .pkl files that read back to the same poses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cryoformer.analysis.export import export_run
from cryoformer.cli import main
from cryoformer.errors import InputError
from cryoformer.io import read_cs, read_star, write_cs, write_star
from cryoformer.io._rotations import matrix_to_euler
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.io.dispatch import load_ctf, load_poses
from cryoformer.io.safe_pickle import save_pickle
from cryoformer.metadata import Poses
from cryoformer.metrics.pose_error import rotation_errors
from cryoformer.trainer import load_run, train

from test_trainer_helpers import make_dataset, tiny_model_config, train_config

N, D0, D_TRAIN, APIX = 24, 16, 8, 8.0  # the simulator's 8 Å/px at the original box D0
IND = np.array([0, 2, 3, 5, 7, 8, 11, 12, 14, 17, 19, 20, 21, 23])  # the run's --ind subset
ROWS = np.array([0, 3, 6, 9, 13])  # rows of the run's particles to export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run with --refine-poses, trained at a downsampled box (8 px of 16) on a subset,
    and the same particles as a RELION 3.1 .star, a RELION 3.0 .star (origins in px) and a .cs."""
    root = tmp_path_factory.mktemp("export_poses")
    data = make_dataset(root / "data", n=N)
    save_pickle(IND, root / "ind.pkl")
    cfg = train_config(data, root / "run", epochs=1, refine_poses=True, pose_pretrain_epochs=1,
                       box_size=D_TRAIN, ind=str(root / "ind.pkl"))
    assert train(cfg, tiny_model_config(box=D_TRAIN, use_orientation_encoder=True), progress=False).stopped == "finished"
    poses = load_poses(data / "poses.pkl", box_size=D0)
    ctf = load_ctf(data / "ctf.pkl")
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(N)]
    write_star(data / "particles.star", poses, ctf, names, APIX,
               extra_columns={"rlnRandomSubset": np.arange(N) % 2 + 1, "rlnClassNumber": np.arange(N) % 3 + 1})
    write_cs(data / "particles.cs", poses, ctf, str(data / "particles.mrcs"), np.arange(N), pixel_size_angstrom=APIX)
    _write_relion30(data / "relion30.star", poses, names)
    return {"root": root, "data": data, "run": load_run(root / "run"), "input": poses}


def _write_relion30(path, poses, names):
    """RELION 3.0: one block, origins in px of the images, pixel size from detector / magnification."""
    euler = matrix_to_euler(poses.rotations)
    lines = ["", "data_", "", "loop_"] + [f"_rln{c} #{i + 1}" for i, c in enumerate(
        ["ImageName", "AngleRot", "AngleTilt", "AnglePsi", "OriginX", "OriginY", "DetectorPixelSize",
         "Magnification", "GroupNumber"])]
    for i in range(len(poses)):
        # 8 Å/px = 8 µm detector pixel · 1e4 / 1e4 magnification
        lines.append(f"{names[i]} {euler[i, 0]:.6f} {euler[i, 1]:.6f} {euler[i, 2]:.6f} "
                     f"{poses.shifts_px[i, 0]:.6f} {poses.shifts_px[i, 1]:.6f} 8.0 10000 {i % 4 + 1}")
    path.write_text("\n".join(lines) + "\n")


def refined_of_rows(run):
    """The run's refined poses of ROWS (shifts in px of D0), read independently of export."""
    refined = read_poses_pkl(run.refined_poses_path, box_size=D0)
    return refined.subset(ROWS)


def assert_same_poses(back, expected):
    assert len(back) == len(expected)
    assert rotation_errors(back.rotations, expected.rotations).max() < 1e-4  # rad
    np.testing.assert_allclose(back.shifts_px, expected.shifts_px, atol=1e-3)  # px of D0


def test_run_is_downsampled_and_refined(trained):
    run, refined = trained["run"], refined_of_rows(trained["run"])
    assert run.box_size == D_TRAIN and run.original_box_size == D0 and run.refined_poses_path
    assert run.particle_indices.tolist() == IND.tolist()
    # The refined poses moved away from the input ones, so the round trips below can tell them apart.
    assert rotation_errors(refined.rotations, trained["input"].subset(IND[ROWS]).rotations).min() > 1e-2


@pytest.mark.parametrize("source", ["particles.star", "relion30.star"])
def test_star_refined_round_trip(trained, tmp_path, source):
    run, src = trained["run"], trained["data"] / source
    out = tmp_path / "refined.star"
    info = export_run(run, ROWS, "star", out, source=src)
    assert info["poses"] == f"refined (epoch {run.epoch})" and info["n_particles"] == len(ROWS)
    assert_same_poses(load_poses(out, box_size=D0), refined_of_rows(run))
    a, b = read_star(src).particles.iloc[IND[ROWS]].reset_index(drop=True), read_star(out).particles
    assert list(a.columns) == list(b.columns)  # every column kept, in the file's conventions
    pose_columns = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
                    "rlnOriginXAngst", "rlnOriginYAngst", "rlnImageName"}
    for column in (c for c in a.columns if c not in pose_columns):
        assert a[column].tolist() == b[column].tolist(), column
    refined = refined_of_rows(run)
    if source == "particles.star":  # RELION 3.1: Å = px of D0 × Å/px at D0
        np.testing.assert_allclose(b["rlnOriginXAngst"], refined.shifts_px[:, 0] * APIX, atol=1e-4)
    else:  # RELION 3.0: px of the images the file describes (the same D0 here)
        np.testing.assert_allclose(b["rlnOriginX"], refined.shifts_px[:, 0], atol=1e-5)


def test_cs_refined_round_trip(trained, tmp_path):
    run, src = trained["run"], trained["data"] / "particles.cs"
    out = tmp_path / "refined.cs"
    export_run(run, ROWS, "cs", out, source=src)
    assert_same_poses(load_poses(out), refined_of_rows(run))
    a, b = read_cs(src)[IND[ROWS]], read_cs(out)
    for name in (n for n in a.dtype.names if not n.startswith("alignments3D/")):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(b["alignments3D/psize_A"], APIX)
    # cs-index writes the same table beside the indices
    export_run(run, ROWS, "cs-index", tmp_path / "sel.npy", source=src)
    assert np.load(tmp_path / "sel.npy").tolist() == IND[ROWS].tolist()
    np.testing.assert_array_equal(read_cs(tmp_path / "sel.cs"), b)


def test_poses_pkl_and_new_files_from_mrcs_input(trained, tmp_path):
    """Without a .star/.cs to copy rows from (training input .mrcs + poses.pkl), new files."""
    run, refined = trained["run"], refined_of_rows(trained["run"])
    export_run(run, ROWS, "poses-pkl", tmp_path / "poses.pkl")
    assert_same_poses(read_poses_pkl(tmp_path / "poses.pkl", box_size=D0), refined)
    export_run(run, ROWS, "star", tmp_path / "new.star")
    assert_same_poses(load_poses(tmp_path / "new.star"), refined)
    export_run(run, ROWS, "cs", tmp_path / "new.cs")
    assert_same_poses(load_poses(tmp_path / "new.cs"), refined)
    assert read_cs(tmp_path / "new.cs")["blob/idx"].tolist() == IND[ROWS].tolist()


def test_input_poses_and_runs_without_refined_poses(trained, tmp_path):
    run, src = trained["run"], trained["data"] / "particles.star"
    expected = trained["input"].subset(IND[ROWS])
    info = export_run(run, ROWS, "star", tmp_path / "input.star", source=src, poses="input")
    assert info["poses"] == "input"
    assert_same_poses(load_poses(tmp_path / "input.star", box_size=D0), expected)
    # Training read its poses from poses.pkl, not from this .star: those replace the star's own.
    zero = Poses(np.tile(np.eye(3), (N, 1, 1)), np.zeros((N, 2)), D0)
    write_star(tmp_path / "other.star", zero, load_ctf(trained["data"] / "ctf.pkl"),
               [f"{i + 1:06d}@{trained['data'] / 'particles.mrcs'}" for i in range(N)], APIX)
    export_run(run, ROWS, "star", tmp_path / "other_out.star", source=tmp_path / "other.star", poses="input")
    assert_same_poses(load_poses(tmp_path / "other_out.star", box_size=D0), expected)
    plain = dataclasses.replace(run, refined_poses_path=None)
    assert export_run(plain, ROWS, "cs", tmp_path / "plain.cs")["poses"] == "input"  # the default
    assert_same_poses(load_poses(tmp_path / "plain.cs"), expected)
    with pytest.raises(InputError, match=r"no refined poses.*--poses input"):
        export_run(plain, ROWS, "star", tmp_path / "x.star", poses="refined")
    with pytest.raises(InputError, match="writes no poses"):
        export_run(run, ROWS, "pkl", tmp_path / "x.pkl", poses="refined")


def test_cli_export_cs_with_refined_poses(trained, tmp_path, capsys):
    run = trained["run"]
    np.save(tmp_path / "sel.npy", ROWS)
    args = ["export", str(trained["root"] / "run"), "--selection", str(tmp_path / "sel.npy"), "--format", "cs",
            "--particles-cs", str(trained["data"] / "particles.cs"), "-o", str(tmp_path / "out.cs")]
    assert main(args) == 0
    assert f"refined (epoch {run.epoch}) poses" in capsys.readouterr().out
    assert_same_poses(load_poses(tmp_path / "out.cs"), refined_of_rows(run))
    before = (tmp_path / "out.cs").read_bytes()
    assert main(args + ["--poses", "input"]) == 2  # an existing output needs --force
    assert (tmp_path / "out.cs").read_bytes() == before
    assert main(args + ["--poses", "input", "--force"]) == 0
    assert_same_poses(load_poses(tmp_path / "out.cs"), trained["input"].subset(IND[ROWS]))


def test_cli_cs_output_names(trained, tmp_path, capsys):
    run_dir, cs = str(trained["root"] / "run"), str(trained["data"] / "particles.cs")
    np.save(tmp_path / "sel.npy", ROWS)
    base = ["export", run_dir, "--selection", str(tmp_path / "sel.npy"), "--particles-cs", cs]
    assert main(base + ["--format", "cs", "-o", str(tmp_path / "out.npy")]) == 2
    assert "name it NAME.cs" in capsys.readouterr().err
    assert main(base + ["--format", "cs-index", "-o", str(tmp_path / "out.cs")]) == 2
    assert "name -o NAME.npy" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel.npy"]
