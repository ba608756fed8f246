"""cryoSPARC .cs reading and writing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.io import cs_image_locations, ctf_from_cs, poses_from_cs, read_cs, write_cs
from cryoformer.metadata import CtfParameters, Poses


def random_rotations(rng, n):
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.linalg.det(q))[:, None, None]


def make_ctf(rng, n, box=64, apix=1.1):
    arr = np.column_stack([np.full(n, box), np.full(n, apix), rng.uniform(8e3, 3e4, (n, 2)),
                           rng.uniform(-90, 90, n), np.full(n, 300), np.full(n, 2.7), np.full(n, 0.1),
                           rng.uniform(0, 90, n)])
    return CtfParameters(arr, bfactor_angstrom2=rng.uniform(0, 50, n))


def test_cs_round_trip(tmp_path, rng):
    n = 12
    poses = Poses(random_rotations(rng, n), rng.normal(size=(n, 2)) * 2, box_size=64)
    ctf = make_ctf(rng, n)
    out = tmp_path / "particles.cs"
    write_cs(out, poses, ctf, "J3/extract/stack.mrc", np.arange(n))
    assert sorted(os.listdir(tmp_path)) == ["particles.cs"]  # extension kept, no temp files
    cs = read_cs(out)
    assert cs["blob/path"][0] == b"J3/extract/stack.mrc" and list(cs["blob/shape"][0]) == [64, 64]
    back = poses_from_cs(out)
    np.testing.assert_allclose(back.rotations, poses.rotations, atol=1e-5)
    np.testing.assert_allclose(back.shifts_px, poses.shifts_px, atol=1e-6)
    assert back.box_size == 64
    ctf_back = ctf_from_cs(cs)
    np.testing.assert_allclose(ctf_back.array, ctf.array, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ctf_back.bfactor_angstrom2, ctf.bfactor_angstrom2, rtol=1e-6)


def test_cs_pose_is_transposed_rodrigues(tmp_path):
    """pose (0, 0, π/2) is Rz(90°); transposed it is RELION's matrix of rot = 90°."""
    cs = np.zeros(1, dtype=[("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                            ("blob/shape", "<u4", (2,))])
    cs["alignments3D/pose"] = [0, 0, np.pi / 2]
    cs["alignments3D/shift"] = [1.5, -2.5]
    cs["blob/shape"] = 128
    poses = poses_from_cs(cs)
    np.testing.assert_allclose(poses.rotations[0], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(poses.shifts_px[0], [1.5, -2.5])
    assert poses.box_size == 128 and poses_from_cs(cs, box_size=64).box_size == 64


def test_cs_shift_is_rescaled_from_the_alignment_pixel_size():
    """A refinement at 2 Å/px of particles stored at 1 Å/px: its 1.5 px are 3 image pixels."""
    cs = np.zeros(2, dtype=[("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                            ("alignments3D/psize_A", "<f4"), ("blob/psize_A", "<f4"),
                            ("blob/shape", "<u4", (2,))])
    cs["alignments3D/shift"] = [[1.5, -2.5], [1.5, -2.5]]
    cs["alignments3D/psize_A"] = [2.0, 1.0]
    cs["blob/psize_A"] = 1.0
    cs["blob/shape"] = 64
    np.testing.assert_allclose(poses_from_cs(cs).shifts_px, [[3.0, -5.0], [1.5, -2.5]])
    # Images downsampled from the 64-px blobs to 16 px: the same shift is a quarter as many pixels.
    np.testing.assert_allclose(poses_from_cs(cs, box_size=16).shifts_px, [[0.75, -1.25], [0.375, -0.625]])
    cs["alignments3D/psize_A"][1] = 0.0
    with pytest.raises(InputError, match="alignments3D/psize_A.*particle 1"):
        poses_from_cs(cs)


def test_cs_overrides(tmp_path, rng):
    ctf = make_ctf(rng, 3)
    out = tmp_path / "p.cs"
    write_cs(out, None, ctf, ["a.mrc", "b.mrc", "a.mrc"], [0, 0, 1])
    over = ctf_from_cs(out, box_size=32, pixel_size_angstrom=2.0, voltage_kv=200,
                       spherical_aberration_mm=1.0, amplitude_contrast=0.2, phase_shift_deg=45)
    np.testing.assert_allclose(over.array[:, [0, 1, 5, 6, 7, 8]], [[32, 2.0, 200, 1.0, 0.2, 45]] * 3, rtol=1e-6)
    with pytest.raises(InputError) as err:
        poses_from_cs(out)  # written without poses
    assert err.value.field == "alignments3D/pose" and err.value.path == str(out)


def test_cs_missing_field_named(tmp_path, rng):
    cs = np.zeros(2, dtype=[("ctf/df1_A", "<f4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4")])
    f = tmp_path / "partial.cs"
    with open(f, "wb") as handle:
        np.save(handle, cs)
    with pytest.raises(InputError) as err:
        ctf_from_cs(f)
    assert err.value.field == "ctf/df2_A" and "partial.cs" in str(err.value)


def test_cs_not_structured_and_not_npy(tmp_path):
    plain = tmp_path / "plain.cs"
    with open(plain, "wb") as handle:
        np.save(handle, np.zeros((3, 3)))
    with pytest.raises(InputError, match="plain.cs.*structured array"):
        read_cs(plain)
    junk = tmp_path / "junk.cs"
    junk.write_bytes(b"no numpy magic here")
    with pytest.raises(InputError, match="junk.cs"):
        read_cs(junk)
    with pytest.raises(InputError, match="nope.cs.*does not exist"):
        read_cs(tmp_path / "nope.cs")


def test_cs_image_locations(tmp_path):
    cs = np.zeros(3, dtype=[("blob/path", "S32"), ("blob/idx", "<u4")])
    cs["blob/path"] = [b">J1/imported/a.mrc", b"J2/b.mrc", b"J2/b.mrc"]
    cs["blob/idx"] = [4, 0, 7]
    f = tmp_path / "sub" / "x.cs"
    f.parent.mkdir()
    with open(f, "wb") as handle:
        np.save(handle, cs)
    locs = cs_image_locations(f)
    assert locs[0] == (str(tmp_path / "sub" / "J1" / "imported" / "a.mrc"), 4)
    assert locs[2] == (str(tmp_path / "sub" / "J2" / "b.mrc"), 7)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.mrc").write_bytes(b"")
    locs = cs_image_locations(f, datadir=tmp_path / "data")
    assert locs[1] == (str(tmp_path / "data" / "b.mrc"), 0)
