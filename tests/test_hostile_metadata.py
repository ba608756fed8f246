"""Hostile particles and metadata: every command refuses them at the reading boundary.

Each case builds a tiny input with the project's own writers (plus starfile / numpy for what
they cannot write: shuffled names, two optics groups, NaN pixels), runs the real command in
process, and checks what a user sees: exit status 2, one line on stderr naming the file and
the field, no traceback, no output (not even a temporary file) and the inputs untouched.
The positive cases check that row matching by name and per-group selection work.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.io import (load_paired_metadata, open_particles, save_pickle, write_cs, write_ctf_pkl,
                           write_poses_pkl, write_stack, write_star)
from cryoformer.io.mrc import write_volume
from cryoformer.metadata import CtfParameters, Poses
from cryoformer.trainer.config import TrainConfig
from cryoformer.trainer.data import load_particle_data

N, D, APIX = 8, 16, 4.0  # particles, box (px), Å/px
TRAIN = ["--device", "cpu", "--preset", "n64-c64", "--zdim", "2", "-b", "4", "--epochs", "1",
         "--heldout-fraction", "0"]


def random_rotations(rng, n):
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.linalg.det(q))[:, None, None]  # det +1


def ctf_array(n, box=D, apix=APIX):
    """[n, 9] CTF rows: distinct defocus per particle, so a row can be told from another."""
    return np.column_stack([np.full(n, box), np.full(n, apix), 1e4 + 100 * np.arange(n),
                            1.1e4 + 100 * np.arange(n), np.zeros(n), np.full(n, 300), np.full(n, 2.7),
                            np.full(n, 0.1), np.zeros(n)]).astype(np.float32)


@pytest.fixture
def data(tmp_path):
    """particles.mrcs (D=16, 4 Å/px), poses.pkl, ctf.pkl and particles.star naming the stack."""
    rng = np.random.default_rng(7)
    d = tmp_path / "in"
    d.mkdir()
    images = rng.normal(size=(N, D, D)).astype(np.float32)
    write_stack(d / "particles.mrcs", images, APIX)
    poses = Poses(random_rotations(rng, N), rng.normal(size=(N, 2)), box_size=D)
    ctf = CtfParameters(ctf_array(N))
    write_poses_pkl(poses, d / "poses.pkl")
    write_ctf_pkl(ctf, d / "ctf.pkl")
    write_star(d / "particles.star", poses, ctf, [f"{k + 1:06d}@particles.mrcs" for k in range(N)], APIX)
    return d, images, poses, ctf


def snapshot(directory):
    """Hash of every file below ``directory`` (inputs must come out byte-identical)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


TQDM_LINE = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm redraw, e.g. "downsample:   0%|   | 0/8"


def refuse(capsys, argv, inputs, output, *must_contain, progress_bar=False):
    """Run ``cryoformer argv`` and check the refusal a user sees (module docstring).

    ``progress_bar``: the command may have drawn a tqdm bar before the refusal (those lines
    are not counted; the error must still be one line).
    """
    before = snapshot(inputs)
    capsys.readouterr()  # what building the inputs printed is not the command's
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    if progress_bar:
        lines = [line for line in lines if not TQDM_LINE.match(line)]
    assert rc == EXIT_INPUT_ERROR, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cryoformer {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    assert not os.path.exists(output) or (os.path.isdir(output) and not os.listdir(output)), \
        "a refused command must leave no output"
    parent = os.path.dirname(os.fspath(output))
    if os.path.isdir(parent):
        assert [f for _, _, fs in os.walk(parent) for f in fs if f.endswith(".tmp")] == []
    assert snapshot(inputs) == before, "inputs must not change"
    return lines[0]


def train_argv(d, out, *extra, particles="particles.mrcs"):
    return ["train", str(d / particles), "-o", str(out), *TRAIN, *extra]


def write_star_rows(path, optics, particles):
    """A RELION 3.1 file from plain tables (for layouts write_star does not produce)."""
    starfile.write({"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)}, path,
                   float_format="%.6f")


def shuffled_star(d, poses, ctf, perm, stack="particles.mrcs"):
    """shuffled.star whose row r names image perm[r] of ``stack`` and holds that image's pose
    and CTF (rows naming an image beyond the stack hold the last particle's)."""
    names = [f"{k + 1:06d}@{stack}" for k in perm]
    rows = np.minimum(perm, N - 1)
    write_star(d / "shuffled.star", poses.subset(rows), ctf.subset(rows), names, APIX)
    return d / "shuffled.star"


# ---- 1. which image each metadata row belongs to --------------------------------------------

def test_star_row_naming_an_image_beyond_the_stack(data, tmp_path, capsys):
    d, _, poses, ctf = data
    perm = np.arange(N)
    perm[3] = N  # image N+1 of an N-image stack
    star = shuffled_star(d, poses, ctf, perm)
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(star)), d, tmp_path / "run",
           "shuffled.star", "_rlnImageName", "row 4", f"image {N + 1} of particles.mrcs")


def test_star_rows_naming_one_image_twice(data, tmp_path, capsys):
    d, _, poses, ctf = data
    perm = np.array([1, 0, 2, 3, 2, 5, 6, 7])
    star = shuffled_star(d, poses, ctf, perm)
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(star), "--ctf", str(d / "ctf.pkl")),
           d, tmp_path / "run", "shuffled.star", "_rlnImageName", "rows 3 and 5")


def test_star_naming_another_stack_in_another_order_is_ambiguous(data, tmp_path, capsys):
    d, _, poses, ctf = data
    star = shuffled_star(d, poses, ctf, np.roll(np.arange(N), 1), stack="original.mrcs")
    line = refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(star)), d, tmp_path / "run",
                  "shuffled.star", "_rlnImageName", "ambiguous", "PARTICLES")
    assert "parse-poses" in line


def test_cs_with_an_index_missing_from_the_stack(data, tmp_path, capsys):
    d, _, poses, ctf = data
    idx = np.arange(N)
    idx[5] = 40
    write_cs(d / "p.cs", poses, ctf, "particles.mrcs", idx)
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "p.cs"), "--ctf", str(d / "p.cs")),
           d, tmp_path / "run", "p.cs", "blob/path", "row 6", "image 41")


def test_star_with_fewer_rows_than_the_stack_suggests_passing_it_as_particles(data, tmp_path, capsys):
    d, _, poses, ctf = data
    star = shuffled_star(d, poses, ctf, np.arange(N - 2))
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(star)), d, tmp_path / "run",
           "shuffled.star", f"has {N - 2} particles", "PARTICLES")


# ---- 2. rotations that are not rotations ------------------------------------------------------

def test_reflection_in_pose_pickle_refused_by_train(data, tmp_path, capsys):
    d, _, poses, _ = data
    rot = poses.rotations.copy()
    rot[3] = -rot[3]  # det −1
    save_pickle((rot, poses.shifts_px / D), d / "reflected.pkl")
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "reflected.pkl")), d, tmp_path / "run",
           "reflected.pkl", ": rot: ", "particle 3", "det R = -1")


def test_scaled_matrix_refused_by_project(data, tmp_path, capsys):
    d, _, poses, _ = data
    rot = poses.rotations.copy()
    rot[5] *= 1.2
    save_pickle((rot, poses.shifts_px / D), d / "scaled.pkl")
    write_volume(d / "vol.mrc", np.random.default_rng(1).normal(size=(D, D, D)), APIX)
    refuse(capsys, ["project", str(d / "vol.mrc"), "--poses", str(d / "scaled.pkl"), "-o",
                    str(tmp_path / "out" / "proj.mrcs")], d, tmp_path / "out" / "proj.mrcs",
           "scaled.pkl", ": rot: ", "particle 5", "RᵀR − I")


def test_float32_round_off_of_real_rotations_is_accepted(data, tmp_path):
    from cryoformer.io import load_poses

    d, _, poses, _ = data
    # cryoDRGN writes float32; matrices printed with 6 decimals are further off (2e-6).
    rot = np.round(poses.rotations.astype(np.float64), 6).astype(np.float32)
    save_pickle((rot, poses.shifts_px / D), d / "rounded.pkl")
    np.testing.assert_allclose(load_poses(d / "rounded.pkl", box_size=D).rotations, rot)


# ---- 3. optics groups with different pixel or box sizes --------------------------------------

def two_optics_star(d, poses, ctf, apix2=3.2, size2=D):
    """particles.star in two optics groups (particles 0–4: 4 Å/px; 5–7: ``apix2``, ``size2``)."""
    group = np.where(np.arange(N) < 5, 1, 2)
    optics = {"rlnOpticsGroupName": ["g1", "g2"], "rlnOpticsGroup": [1, 2],
              "rlnImagePixelSize": [APIX, apix2], "rlnImageSize": [D, size2],
              "rlnVoltage": [300.0, 300.0], "rlnSphericalAberration": [2.7, 2.7],
              "rlnAmplitudeContrast": [0.1, 0.1]}
    particles = {"rlnImageName": [f"{k + 1:06d}@particles.mrcs" for k in range(N)], "rlnOpticsGroup": group,
                 "rlnAngleRot": np.zeros(N), "rlnAngleTilt": np.linspace(0, 90, N), "rlnAnglePsi": np.zeros(N),
                 "rlnOriginXAngst": np.zeros(N), "rlnOriginYAngst": np.zeros(N),
                 "rlnDefocusU": ctf.array[:, 2], "rlnDefocusV": ctf.array[:, 3], "rlnDefocusAngle": np.zeros(N)}
    write_star_rows(d / "optics.star", optics, particles)
    return d / "optics.star"


def test_train_refuses_two_pixel_sizes_naming_the_groups(data, tmp_path, capsys):
    d, _, poses, ctf = data
    two_optics_star(d, poses, ctf)
    line = refuse(capsys, train_argv(d, tmp_path / "run", particles="optics.star"), d, tmp_path / "run",
                  "optics.star", "_rlnImagePixelSize", "optics group 1", "optics group 2", "--ind")
    assert "3.2 Å/px" in line and "4 Å/px" in line


def test_train_refuses_cs_with_two_pixel_sizes(data, tmp_path, capsys):
    d, _, poses, ctf = data
    write_cs(d / "p.cs", poses, ctf, "particles.mrcs", np.arange(N))
    cs = np.load(d / "p.cs")
    cs["blob/psize_A"][4:] = 3.0
    with open(d / "p.cs", "wb") as fh:
        np.save(fh, cs)
    refuse(capsys, train_argv(d, tmp_path / "run", particles="p.cs"), d, tmp_path / "run",
           "p.cs", "blob/psize_A", "2 different pixel or box sizes")


def test_parse_ctf_refuses_two_box_sizes(data, tmp_path, capsys):
    d, _, poses, ctf = data
    two_optics_star(d, poses, ctf, apix2=APIX / 2, size2=2 * D)
    refuse(capsys, ["parse-ctf", str(d / "optics.star"), "-o", str(tmp_path / "out" / "ctf.pkl")], d,
           tmp_path / "out" / "ctf.pkl", "optics.star", "_rlnImageSize", "optics group 2: 32 px",
           "relion_star_handler")


def test_stacks_of_two_sizes_refused_with_their_names(data, tmp_path, capsys):
    d, images, _, _ = data
    write_stack(d / "big.mrcs", np.random.default_rng(2).normal(size=(3, 2 * D, 2 * D)), APIX / 2)
    (d / "stacks.txt").write_text("particles.mrcs\nbig.mrcs\n")
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), particles="stacks.txt"),
           d, tmp_path / "run", "stacks.txt", "2 different sizes", "big.mrcs", "relion_image_handler")


def test_per_group_values_reported_and_one_group_trains(data, tmp_path, capsys):
    d, _, poses, ctf = data
    star = two_optics_star(d, poses, ctf)
    assert main(["parse-ctf", str(star), "-o", str(tmp_path / "ctf.pkl")]) == 0
    out = capsys.readouterr().out
    assert "2 pixel-size groups" in out and "4 Å/px for 5 particles" in out and "3.2 Å/px for 3 particles" in out
    np.save(tmp_path / "group1.npy", np.arange(5))
    cfg = TrainConfig.from_flat(particles=str(star), outdir=str(tmp_path / "run"), ind=str(tmp_path / "group1.npy"))
    loaded = load_particle_data(cfg)  # --ind with one group: one pixel size, accepted
    assert len(loaded) == 5 and loaded.pixel_size_angstrom == pytest.approx(APIX)


# ---- 4. CTF parameters that contradict the stack or physics ---------------------------------

def ctf_star(d, ctf, **column):
    """particles.star with one CTF column replaced (``rlnDefocusU=...``)."""
    star = starfile.read(d / "particles.star", always_dict=True)
    for name, value in column.items():
        (star["optics"] if name in star["optics"] else star["particles"])[name] = value
    starfile.write(star, d / "bad.star", float_format="%.6f")
    return d / "bad.star"


@pytest.mark.parametrize("column, value, field", [
    ("rlnDefocusU", 0.0, "_rlnDefocusU"),
    ("rlnVoltage", -300.0, "_rlnVoltage"),
    ("rlnImagePixelSize", 0.0, "_rlnImagePixelSize"),
])
def test_parse_ctf_refuses_impossible_values(data, tmp_path, capsys, column, value, field):
    d, _, _, ctf = data
    star = ctf_star(d, ctf, **{column: value})
    refuse(capsys, ["parse-ctf", str(star), "-o", str(tmp_path / "out" / "ctf.pkl")], d,
           tmp_path / "out" / "ctf.pkl", "bad.star", field, "particle 0")


def test_parse_ctf_refuses_amplitude_contrast_in_percent_from_cs(data, tmp_path, capsys):
    d, _, poses, ctf = data
    arr = ctf.array.copy()
    arr[:, 7] = 7.0
    write_cs(d / "p.cs", poses, CtfParameters(arr), "particles.mrcs", np.arange(N))
    refuse(capsys, ["parse-ctf", str(d / "p.cs"), "-o", str(tmp_path / "out" / "ctf.pkl")], d,
           tmp_path / "out" / "ctf.pkl", "p.cs", "ctf/amp_contrast", "[0, 1]")


def test_train_refuses_nan_defocus_in_ctf_pickle(data, tmp_path, capsys):
    d, _, _, ctf = data
    arr = ctf.array.copy()
    arr[6, 3] = np.nan
    save_pickle(arr, d / "nan_ctf.pkl")
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), "--ctf",
                              str(d / "nan_ctf.pkl")), d, tmp_path / "run",
           "nan_ctf.pkl", "ctf[:, 3] (defocus_v_angstrom)", "particle 6")


def test_train_refuses_ctf_for_another_physical_box(data, tmp_path, capsys):
    d, _, _, ctf = data
    save_pickle(ctf_array(N, box=D, apix=1.3), d / "other_ctf.pkl")  # 20.8 Å box; the stack is 64 Å
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), "--ctf",
                              str(d / "other_ctf.pkl")), d, tmp_path / "run",
           "other_ctf.pkl", "pixel size", "particle 0", "parse-ctf")


def test_parse_poses_refuses_nan_angle(data, tmp_path, capsys):
    d, _, _, ctf = data
    tilt = np.linspace(0, 90, N)
    tilt[2] = np.nan
    star = ctf_star(d, ctf, rlnAngleTilt=tilt)
    refuse(capsys, ["parse-poses", str(star), "-o", str(tmp_path / "out" / "poses.pkl")], d,
           tmp_path / "out" / "poses.pkl", "bad.star", "_rlnAngleTilt", "particle 2")


def test_project_refuses_negative_defocus(data, tmp_path, capsys):
    d, _, _, ctf = data
    defocus = ctf.array[:, 2].copy()
    defocus[4] = -1.5e4
    star = ctf_star(d, ctf, rlnDefocusU=defocus)
    write_volume(d / "vol.mrc", np.random.default_rng(1).normal(size=(D, D, D)), APIX)
    refuse(capsys, ["project", str(d / "vol.mrc"), "--poses", str(star), "--ctf", str(star), "-o",
                    str(tmp_path / "out" / "proj.mrcs")], d, tmp_path / "out" / "proj.mrcs",
           "bad.star", "_rlnDefocusU", "particle 4", "underfocus")


def test_nan_translation_in_pose_pickle(data, tmp_path, capsys):
    d, _, poses, _ = data
    trans = poses.shifts_px / D
    trans[7, 1] = np.inf
    save_pickle((poses.rotations, trans), d / "inf.pkl")
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "inf.pkl")), d, tmp_path / "run",
           "inf.pkl", ": trans: ", "particle 7")


# ---- 5. bad pixels and empty data -----------------------------------------------------------

def damaged_stack(d, images, name, fill, where):
    """A stack with ``images[where] = fill``, written with mrcfile (the project's own writer
    refuses NaN)."""
    bad = images.copy()
    bad[where] = fill
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's "contains NaN values"
        with mrcfile.new(d / name, data=bad.astype(np.float32)) as m:
            m.set_image_stack()
            m.voxel_size = APIX
    return d / name


def test_train_refuses_nan_pixels_naming_particles_and_stack(data, tmp_path, capsys):
    d, images, _, _ = data
    damaged_stack(d, images, "nan.mrcs", np.nan, (5, 3, 4))
    with mrcfile.mmap(d / "nan.mrcs", mode="r+") as m:  # and an inf in another image
        m.data[6, 0, 0] = np.inf
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), particles="nan.mrcs"),
           d, tmp_path / "run", "nan.mrcs", ": pixels: ", "2 of 8", "particles 5 (6@nan.mrcs), 6 (7@nan.mrcs)")


def test_train_refuses_all_zero_stack(data, tmp_path, capsys):
    d, images, _, _ = data
    damaged_stack(d, images, "zero.mrcs", 0.0, slice(None))
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), particles="zero.mrcs"),
           d, tmp_path / "run", "zero.mrcs", ": pixels: ", f"all {N} particle images are constant")


def test_train_refuses_blank_images_and_excluding_them_works(data, tmp_path, capsys):
    d, images, _, _ = data
    damaged_stack(d, images, "blank.mrcs", 0.0, 2)
    refuse(capsys, train_argv(d, tmp_path / "run", "--poses", str(d / "poses.pkl"), particles="blank.mrcs"),
           d, tmp_path / "run", "blank.mrcs", "1 of 8", "particles 2 (3@blank.mrcs)", "--ind")
    np.save(tmp_path / "keep.npy", np.delete(np.arange(N), 2))
    cfg = TrainConfig.from_flat(particles=str(d / "blank.mrcs"), poses=str(d / "poses.pkl"), outdir=str(tmp_path / "r"),
                                ind=str(tmp_path / "keep.npy"))
    assert len(load_particle_data(cfg)) == N - 1  # only the images used are scanned


def test_downsample_refuses_nan_stack(data, tmp_path, capsys):
    d, images, _, _ = data
    damaged_stack(d, images, "nan.mrcs", np.nan, (7, 0, 0))
    refuse(capsys, ["downsample", str(d / "nan.mrcs"), "-D", "8", "-o", str(tmp_path / "out" / "small.mrcs")],
           d, tmp_path / "out" / "small.mrcs", "nan.mrcs", "pixels", "particles 7 (8@nan.mrcs)",
           progress_bar=True)  # the command draws its bar before the chunk with NaN is read


# ---- positive cases ----------------------------------------------------------------------------

def test_shuffled_star_is_matched_to_its_stack_by_name_and_trains(data, tmp_path, capsys):
    d, _, poses, ctf = data
    perm = np.random.default_rng(3).permutation(N)
    star = shuffled_star(d, poses, ctf, perm)
    cfg = TrainConfig.from_flat(particles=str(d / "particles.mrcs"), poses=str(star), ctf=str(star),
                                outdir=str(tmp_path / "run0"))
    loaded = load_particle_data(cfg)
    batch = loaded.batch(np.arange(N))
    # image k gets the pose and CTF its own star row names, whatever the row order
    np.testing.assert_allclose(batch["rotations"].numpy(), poses.rotations, atol=1e-5)
    np.testing.assert_allclose(batch["shifts_px"].numpy(), poses.shifts_px, atol=1e-4)
    np.testing.assert_allclose(batch["ctf"].numpy()[:, 2], ctf.array[:, 2], rtol=1e-6)
    assert main(train_argv(d, tmp_path / "run", "--poses", str(star), "--ctf", str(star))) == 0


def test_shuffled_cs_is_matched_to_its_stack(data):
    d, _, poses, ctf = data
    perm = np.random.default_rng(4).permutation(N)
    write_cs(d / "p.cs", poses.subset(perm), ctf.subset(perm), "particles.mrcs", perm)
    source = open_particles(d / "particles.mrcs")
    meta = load_paired_metadata(source, d / "particles.mrcs", d / "p.cs", d / "p.cs")
    np.testing.assert_allclose(meta.poses.rotations, poses.rotations, atol=1e-5)
    np.testing.assert_allclose(meta.ctf.array[:, 2], ctf.array[:, 2])
    assert any("matched to the images by blob/path" in note for note in meta.notes)


def test_star_naming_the_stack_it_was_downsampled_from_pairs_by_row_order(data):
    d, _, poses, ctf = data
    # what `cryoformer downsample shuffled.star` leaves: a new stack in the star's row order
    star = shuffled_star(d, poses, ctf, np.arange(N), stack="original_256px.mrcs")
    source = open_particles(d / "particles.mrcs")
    meta = load_paired_metadata(source, d / "particles.mrcs", star, None)
    np.testing.assert_allclose(meta.poses.rotations, poses.rotations, atol=1e-5)
    assert any("by row order" in note for note in meta.notes)


def test_pickled_ctf_of_the_original_box_fits_a_downsampled_stack(data):
    d, _, _, _ = data
    save_pickle(ctf_array(N, box=4 * D, apix=APIX / 4), d / "ctf_full.pkl")  # same 64 Å box
    source = open_particles(d / "particles.mrcs")
    meta = load_paired_metadata(source, d / "particles.mrcs", d / "poses.pkl", d / "ctf_full.pkl")
    np.testing.assert_allclose(meta.ctf.array[:, :2], [[D, APIX]] * N, rtol=1e-6)
    assert meta.pixel_size_angstrom == pytest.approx(APIX)


# ----------------------------------------------------------------------------- contrast flag
@pytest.fixture(scope="module")
def two_conventions(tmp_path_factory):
    """The hinged molecule at SNR 0.1 (200 particles, CTF, shifts) in both contrast conventions."""
    root = tmp_path_factory.mktemp("contrast")
    for convention in ("relion", "cryodrgn"):
        assert main(["simulate", "-o", str(root / convention), "-n", "200", "-D", "32", "--snr", "0.1",
                     "--shift-range", "2", "--contrast", convention, "--seed", "4"]) == 0
    return root


@pytest.mark.parametrize("convention, flags, fix", [
    ("relion", ["--uninvert-data"], "without --uninvert-data"),
    ("cryodrgn", [], "add --uninvert-data"),
])
def test_contrast_contradicting_the_flag_is_refused(two_conventions, tmp_path, capsys, convention,
                                                    flags, fix):
    d = two_conventions / convention
    refuse(capsys, ["train", str(d / "particles.star"), "-o", str(tmp_path / "run"), *TRAIN, *flags],
           d, tmp_path / "run", "contrast", fix, "--no-contrast-check", progress_bar=True)


def test_contrast_check_can_be_turned_off(two_conventions, tmp_path):
    d = two_conventions / "relion"
    assert main(["train", str(d / "particles.star"), "-o", str(tmp_path / "run"), *TRAIN,
                 "--box", "16", "--uninvert-data", "--no-contrast-check"]) == 0
