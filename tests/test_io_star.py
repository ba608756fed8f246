"""RELION .star reading (3.0, 3.1, 5), poses, CTF, writing and image locations."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.io import (
    ctf_from_star,
    image_locations,
    poses_from_star,
    read_star,
    write_star,
)
from cryoformer.io.dispatch import load_poses
from cryoformer.io.star import star_pixel_size, star_pose_columns, subset_star
from cryoformer.metadata import CtfParameters, Poses


def leftovers(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def write_text(path, text):
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def random_rotations(rng, n):
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.linalg.det(q))[:, None, None]


RELION30 = """
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnDetectorPixelSize #9
_rlnMagnification #10
_rlnAngleRot #11
_rlnAngleTilt #12
_rlnAnglePsi #13
_rlnOriginX #14
_rlnOriginY #15
000001@Particles/stack.mrcs mic1.mrc 10000.0 9500.0 30.0 300 2.7 0.1 13.0 100000 90.0 0.0 0.0 1.5 -2.0
000002@Particles/stack.mrcs mic1.mrc 12000.0 11500.0 -45.0 300 2.7 0.1 13.0 100000 10.0 20.0 30.0 0.0 0.25
000012@Particles/other.mrcs mic2.mrc 15000.0 14000.0 0.0 300 2.7 0.1 13.0 100000 -170.0 179.0 -5.0 -3.0 3.0
"""

# RELION 3.1: optics block AFTER the particles, two optics groups with different pixel sizes.
RELION31 = """
# version 30001

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnOpticsGroup #10
000001@a.mrcs 0.0 90.0 0.0 3.0 -6.0 10000 10000 0.0 1
000002@a.mrcs 0.0 90.0 0.0 3.0 -6.0 20000 20000 0.0 2

# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
opticsGroup1 1 1.0 64 300.0 2.7 0.1
opticsGroup2 2 2.0 64 200.0 2.0 0.07
"""

RELION5 = """
# version 50001

data_general

_rlnTomoSubTomosAre2DStacks 0

# version 50001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMtfFileName #3
_rlnMicrographOriginalPixelSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnImagePixelSize #8
_rlnImageSize #9
_rlnImageDimensionality #10
_rlnCtfDataAreCtfPremultiplied #11
opticsGroup1 1 mtf_k2_200kV.star 0.885 200.0 1.4 0.1 1.77 128 2 0

# version 50001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnAngleRot #3
_rlnAngleTilt #4
_rlnAnglePsi #5
_rlnImageName #6
_rlnMicrographName #7
_rlnOpticsGroup #8
_rlnDefocusU #9
_rlnDefocusV #10
_rlnDefocusAngle #11
_rlnCtfBfactor #12
_rlnCtfScalefactor #13
_rlnPhaseShift #14
_rlnClassNumber #15
_rlnOriginXAngst #16
_rlnOriginYAngst #17
_rlnHelicalTubeID #18
_rlnRandomSubset #19
_rlnLogLikeliContribution #20
1204.0 813.0 12.0 34.0 56.0 000007@Extract/job007/mic1.mrcs MotionCorr/mic1.mrc 1 9000.0 8800.0 12.5 50.0 1.0 5.0 1 1.77 -3.54 0 1 123456.7
"""


def test_relion30_per_particle(tmp_path):
    star = read_star(write_text(tmp_path / "r30.star", RELION30))
    assert star.version == "3.0" and star.optics is None and len(star) == 3
    poses = poses_from_star(star)
    # rot=90: RELION's Euler_angles2matrix gives [[0,1,0],[-1,0,0],[0,0,1]].
    np.testing.assert_allclose(poses.rotations[0], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(poses.shifts_px, [[1.5, -2.0], [0.0, 0.25], [-3.0, 3.0]], atol=1e-6)
    assert poses.box_size is None  # no rlnImageSize in 3.0 files
    ctf = ctf_from_star(star, box_size=96)
    np.testing.assert_allclose(ctf.column("pixel_size_angstrom"), 1.3, rtol=1e-6)  # 13 µm · 1e4 / 1e5
    np.testing.assert_allclose(ctf.column("defocus_v_angstrom"), [9500, 11500, 14000])
    np.testing.assert_allclose(ctf.column("astigmatism_angle_deg"), [30, -45, 0])
    assert np.all(ctf.column("box_size") == 96) and np.all(ctf.column("phase_shift_deg") == 0)
    assert ctf.bfactor_angstrom2 is None
    # Origins in pixels need no pixel size, so poses read without one.
    locs = image_locations(star)
    assert locs[0] == (str(tmp_path / "Particles" / "stack.mrcs"), 0)
    assert locs[2] == (str(tmp_path / "Particles" / "other.mrcs"), 11)


def test_relion30_single_row_block(tmp_path):
    text = """
    data_images

    _rlnImageName 000003@stack.mrcs
    _rlnDefocusU 10000
    _rlnDefocusV 10000
    _rlnDefocusAngle 0
    _rlnVoltage 300
    _rlnSphericalAberration 2.7
    _rlnAmplitudeContrast 0.1
    _rlnPixelSize 1.1
    _rlnImageSize 32
    _rlnAngleRot 0
    _rlnAngleTilt 0
    _rlnAnglePsi 0
    """
    star = read_star(write_text(tmp_path / "one.star", text))
    assert len(star) == 1 and star.version == "3.0"
    ctf = ctf_from_star(star)
    assert ctf.box_size == 32 and ctf.pixel_size_angstrom == pytest.approx(1.1)
    assert image_locations(star)[0][1] == 2
    np.testing.assert_allclose(poses_from_star(star).rotations[0], np.eye(3), atol=1e-7)


def test_relion31_optics_after_particles_two_groups(tmp_path):
    star = read_star(write_text(tmp_path / "r31.star", RELION31))
    assert star.version == "3.1+" and len(star.optics) == 2
    poses = poses_from_star(star)
    # Origins in Å divided by each particle's own optics-group pixel size.
    np.testing.assert_allclose(poses.shifts_px, [[3.0, -6.0], [1.5, -3.0]], atol=1e-6)
    assert poses.box_size == 64
    ctf = ctf_from_star(star)
    np.testing.assert_allclose(ctf.column("pixel_size_angstrom"), [1.0, 2.0])
    np.testing.assert_allclose(ctf.column("voltage_kv"), [300, 200])
    np.testing.assert_allclose(ctf.column("amplitude_contrast"), [0.1, 0.07], rtol=1e-6)
    # A pixel-size override applies to every particle.
    np.testing.assert_allclose(poses_from_star(star, pixel_size_angstrom=3.0).shifts_px[1], [1.0, -2.0])


def test_relion5_extra_columns_and_blocks(tmp_path):
    star = read_star(write_text(tmp_path / "r5.star", RELION5))
    assert star.version == "3.1+" and len(star) == 1
    assert star.has("rlnImageDimensionality") and star.has("_rlnHelicalTubeID")
    poses = poses_from_star(star)
    np.testing.assert_allclose(poses.shifts_px, [[1.0, -2.0]], atol=1e-6)
    assert poses.box_size == 128
    ctf = ctf_from_star(star)
    np.testing.assert_allclose(ctf.array[0], [128, 1.77, 9000, 8800, 12.5, 200, 1.4, 0.1, 5.0], rtol=1e-6)
    np.testing.assert_allclose(ctf.bfactor_angstrom2, [50.0])


def test_unnamed_data_block_with_optics(tmp_path):
    text = RELION31.replace("data_particles", "data_")
    star = read_star(write_text(tmp_path / "anon.star", text))
    assert star.version == "3.1+" and len(star) == 2


def test_cryodrgn_overrides(tmp_path):
    star = read_star(write_text(tmp_path / "r31.star", RELION31))
    ctf = ctf_from_star(star, box_size=48, pixel_size_angstrom=1.5, voltage_kv=120,
                        spherical_aberration_mm=0.01, amplitude_contrast=0.2, phase_shift_deg=90)
    np.testing.assert_allclose(ctf.array[:, [0, 1, 5, 6, 7, 8]], [[48, 1.5, 120, 0.01, 0.2, 90]] * 2, rtol=1e-6)
    np.testing.assert_allclose(ctf.column("defocus_u_angstrom"), [10000, 20000])  # never overridden
    # Overrides make otherwise-required columns optional.
    text = RELION30.replace("_rlnVoltage #6", "_rlnSomethingElse #6")
    star30 = read_star(write_text(tmp_path / "novolt.star", text))
    with pytest.raises(InputError) as err:
        ctf_from_star(star30, box_size=96)
    assert err.value.field == "_rlnVoltage" and "novolt.star" in str(err.value)
    assert np.all(ctf_from_star(star30, box_size=96, voltage_kv=200).column("voltage_kv") == 200)


def test_missing_required_column_is_named(tmp_path):
    text = RELION31.replace("_rlnDefocusV #8", "_rlnCtfMaxResolution #8")
    star = read_star(write_text(tmp_path / "nodfv.star", text))
    with pytest.raises(InputError) as err:
        ctf_from_star(star)
    assert err.value.field == "_rlnDefocusV" and err.value.path == str(tmp_path / "nodfv.star")
    assert "_rlnDefocusV" in str(err.value)
    text = RELION30.replace("_rlnAngleTilt #12", "_rlnFoo #12")
    with pytest.raises(InputError, match="_rlnAngleTilt"):
        poses_from_star(read_star(write_text(tmp_path / "notilt.star", text)))


def test_angstrom_origins_without_pixel_size(tmp_path):
    text = RELION31.replace("_rlnImagePixelSize #3", "_rlnMicrographPixelSize #3")
    star = read_star(write_text(tmp_path / "noapix.star", text))
    with pytest.raises(InputError) as err:
        poses_from_star(star)
    assert err.value.field == "_rlnImagePixelSize" and "noapix.star" in str(err.value)
    assert poses_from_star(star, pixel_size_angstrom=1.0).shifts_px[0, 0] == pytest.approx(3.0)


def test_unknown_optics_group_and_bad_values(tmp_path):
    text = RELION31.replace("20000 20000 0.0 2", "20000 20000 0.0 3")
    with pytest.raises(InputError) as err:
        read_star(write_text(tmp_path / "grp.star", text))
    assert err.value.field == "_rlnOpticsGroup" and "grp.star" in str(err.value)
    text = RELION31.replace("20000 20000 0.0 2", "20000 abc 0.0 2")
    with pytest.raises(InputError, match="_rlnDefocusV.*expected numbers"):
        ctf_from_star(read_star(write_text(tmp_path / "nan.star", text)))


def test_not_a_star_file_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="missing.star.*does not exist"):
        read_star(tmp_path / "missing.star")
    junk = tmp_path / "junk.star"
    junk.write_bytes(b"\x00\x01 definitely not a star file")
    with pytest.raises(InputError, match="junk.star"):
        read_star(junk)
    ragged = write_text(tmp_path / "ragged.star", "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@a.mrcs 1 2\n")
    with pytest.raises(InputError, match="ragged.star"):
        read_star(ragged)


def test_bad_image_name(tmp_path):
    text = RELION30.replace("000002@Particles", "0@Particles")
    star = read_star(write_text(tmp_path / "badname.star", text))
    with pytest.raises(InputError) as err:
        image_locations(star)
    assert err.value.field == "_rlnImageName" and "row 2" in str(err.value)


def test_write_read_round_trip(tmp_path, rng):
    n = 25
    rot = random_rotations(rng, n)
    rot[0] = np.eye(3)  # gimbal lock (tilt 0)
    rot[1] = np.diag([1.0, -1.0, -1.0])  # tilt 180
    poses = Poses(rot, rng.normal(size=(n, 2)) * 4, box_size=64)
    arr = np.column_stack([np.full(n, 64), np.full(n, 1.25), rng.uniform(8e3, 3e4, (n, 2)),
                           rng.uniform(-180, 180, n), np.where(np.arange(n) < 10, 300, 200),
                           np.full(n, 2.7), np.full(n, 0.07), rng.uniform(0, 90, n)])
    ctf = CtfParameters(arr, bfactor_angstrom2=rng.uniform(0, 100, n))
    names = [f"{i + 1:06d}@stacks/particles.mrcs" for i in range(n)]
    out = tmp_path / "out.star"
    write_star(out, poses, ctf, names, 1.25, extra_columns={"_rlnClassNumber": np.arange(n) % 3 + 1})
    assert leftovers(tmp_path) == []
    star = read_star(out)
    assert star.version == "3.1+" and len(star.optics) == 2  # two voltages → two optics groups
    back = poses_from_star(star)
    np.testing.assert_allclose(back.rotations, poses.rotations, atol=1e-5)
    np.testing.assert_allclose(back.shifts_px, poses.shifts_px, atol=1e-5)
    assert back.box_size == 64
    ctf_back = ctf_from_star(star)
    np.testing.assert_allclose(ctf_back.array, ctf.array, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ctf_back.bfactor_angstrom2, ctf.bfactor_angstrom2, atol=1e-5)
    assert list(star.particles["rlnClassNumber"]) == list(np.arange(n) % 3 + 1)
    assert image_locations(star)[4] == (str(tmp_path / "stacks" / "particles.mrcs"), 4)


def test_write_star_bad_input_leaves_nothing(tmp_path, rng):
    poses = Poses(random_rotations(rng, 3), np.zeros((3, 2)), 32)
    out = tmp_path / "bad.star"
    with pytest.raises(ValueError):
        write_star(out, poses, None, ["1@a.mrcs", "2@a.mrcs"], 1.0)
    with pytest.raises(ValueError):
        write_star(out, poses, None, ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], 1.0, extra_columns={"rlnX": [1]})
    assert os.listdir(tmp_path) == []


def test_image_locations_with_datadir(tmp_path):
    (tmp_path / "meta").mkdir()
    star = read_star(write_text(tmp_path / "meta" / "r30.star", RELION30))
    data = tmp_path / "data"
    (data / "Particles").mkdir(parents=True)
    (data / "Particles" / "stack.mrcs").write_bytes(b"")
    (data / "other.mrcs").write_bytes(b"")  # found only by base name, as cryoDRGN does
    locs = image_locations(star, datadir=data)
    assert locs[0] == (str(data / "Particles" / "stack.mrcs"), 0)
    assert locs[2] == (str(data / "other.mrcs"), 11)


def test_relion30_pixel_origins_of_a_downsampled_stack(tmp_path):
    """RELION 3.0 origins are px of the images the file describes (1.3 Å/px here); for a stack
    downsampled to 2.6 Å/px they are half as many pixels, as Å origins would be."""
    path = write_text(tmp_path / "r30.star", RELION30)
    star = read_star(path)
    full = [[1.5, -2.0], [0.0, 0.25], [-3.0, 3.0]]
    np.testing.assert_allclose(poses_from_star(star, pixel_size_angstrom=1.3).shifts_px, full, atol=1e-6)
    half = poses_from_star(star, box_size=48, pixel_size_angstrom=2.6)
    np.testing.assert_allclose(half.shifts_px, np.array(full) / 2, atol=1e-6)
    assert half.box_size == 48
    np.testing.assert_allclose(load_poses(path, box_size=48, pixel_size_angstrom=2.6).shifts_px,
                               np.array(full) / 2, atol=1e-6)
    # Without a pixel size the box ratio tells: rlnImageSize 96 read for a 48-px stack.
    sized = RELION30.replace("_rlnOriginY #15", "_rlnOriginY #15\n_rlnImageSize #16")
    sized = "\n".join(line + " 96" if "@" in line else line for line in sized.splitlines())
    star96 = read_star(write_text(tmp_path / "r30_96.star", sized))
    np.testing.assert_allclose(poses_from_star(star96, box_size=48).shifts_px, np.array(full) / 2, atol=1e-6)
    np.testing.assert_allclose(poses_from_star(star96).shifts_px, full, atol=1e-6)


def test_angstrom_origins_for_a_smaller_box(tmp_path):
    """Å origins of 64-px images read for a 32-px copy: the pixels are twice as large."""
    star = read_star(write_text(tmp_path / "r31.star", RELION31))
    np.testing.assert_allclose(poses_from_star(star, box_size=32).shifts_px, [[1.5, -3.0], [0.75, -1.5]], atol=1e-6)


@pytest.mark.parametrize("text", [RELION30, RELION31])
def test_star_pose_columns_invert_poses_from_star(tmp_path, rng, text):
    """Poses in px of a 2×-downsampled box written back as the file's own columns (px of the
    file's images for 3.0, Å for 3.1) read back to the same poses."""
    star = read_star(write_text(tmp_path / "in.star", text))
    n = len(star)
    own = star_pixel_size(star)
    poses = Poses(random_rotations(rng, n), rng.uniform(-4, 4, (n, 2)), box_size=32)
    columns = star_pose_columns(star, poses, pixel_size_angstrom=float(own[0]) * 2)
    angstrom = text is RELION31
    assert ("rlnOriginXAngst" in columns) is angstrom and ("rlnOriginX" in columns) is not angstrom
    origin_x = columns["rlnOriginXAngst" if angstrom else "rlnOriginX"]
    np.testing.assert_allclose(origin_x, poses.shifts_px[:, 0] * (own[0] * 2 if angstrom else 2), rtol=1e-6)
    for name, values in columns.items():
        star.particles[name] = values
    back = poses_from_star(star, box_size=32, pixel_size_angstrom=float(own[0]) * 2)
    np.testing.assert_allclose(back.rotations, poses.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts_px, poses.shifts_px, atol=1e-6)
    sub = subset_star(star, [n - 1, 0])
    assert len(sub) == 2 and sub.particles["rlnImageName"].tolist() == star.particles["rlnImageName"].iloc[[n - 1, 0]].tolist()
