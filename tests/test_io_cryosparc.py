"""cryoSPARC .cs reading and writing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryoformer.cli import main
from cryoformer.errors import InputError
from cryoformer.io import cs_image_locations, ctf_from_cs, poses_from_cs, read_cs, write_cs
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.io.cryosparc import cs_class_counts, cs_pose_classes, with_cs_poses
from cryoformer.io.dispatch import load_poses
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


def class_cs(rng, n=9, n_classes=3, consensus=False):
    """A heterogeneous-refinement-like table: per-class poses, shifts at 2 Å/px of particles
    stored at 1 Å/px, posteriors making particle i most likely in class i % n_classes."""
    fields = [("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4")]
    for k in range(n_classes):
        fields += [(f"alignments_class_{k}/pose", "<f4", (3,)), (f"alignments_class_{k}/shift", "<f4", (2,)),
                   (f"alignments_class_{k}/psize_A", "<f4"), (f"alignments_class_{k}/class_posterior", "<f4")]
    if consensus:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    cs = np.zeros(n, dtype=fields)
    cs["blob/path"], cs["blob/idx"], cs["blob/shape"], cs["blob/psize_A"] = b"stack.mrc", np.arange(n), 64, 1.0
    for k in range(n_classes):
        cs[f"alignments_class_{k}/pose"] = rng.uniform(-1.5, 1.5, (n, 3))
        cs[f"alignments_class_{k}/shift"] = rng.uniform(-3, 3, (n, 2))
        cs[f"alignments_class_{k}/psize_A"] = 2.0
        cs[f"alignments_class_{k}/class_posterior"] = np.where(np.arange(n) % n_classes == k, 0.8, 0.1)
    if n_classes == 3:
        cs["alignments_class_2/class_posterior"][:2] = 0.9  # particles 0, 1 → class 2: counts 2, 2, 5
    return cs


def test_cs_classes_need_a_choice(tmp_path, rng):
    cs = class_cs(rng)
    assert cs_pose_classes(cs) == [0, 1, 2] and cs_class_counts(cs) == {0: 2, 1: 2, 2: 5}
    with pytest.raises(InputError, match=r"alignments3D/pose.*3 classes: 0 \(2 particles most likely\), "
                                         r"1 \(2 .*2 \(5 .*--cs-class K"):
        poses_from_cs(cs)
    with pytest.raises(InputError, match=r"alignments_class_4/pose.*class 4 not in the file.*0, 1, 2"):
        poses_from_cs(cs, cs_class=4)


def test_cs_class_poses_and_rescaled_shifts(tmp_path, rng):
    cs = class_cs(rng)
    poses = poses_from_cs(cs, cs_class=1)
    # Same conversion as alignments3D: the transposed Rodrigues matrix of class 1's pose.
    alone = np.zeros(len(cs), dtype=[("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))])
    alone["alignments3D/pose"] = cs["alignments_class_1/pose"]
    np.testing.assert_allclose(poses.rotations, poses_from_cs(alone).rotations, atol=1e-7)
    # Shifts at 2 Å/px are twice as many pixels of the 1 Å/px particles; half again at box 32.
    np.testing.assert_allclose(poses.shifts_px, cs["alignments_class_1/shift"] * 2.0, rtol=1e-6)
    np.testing.assert_allclose(poses_from_cs(cs, box_size=32, cs_class=1).shifts_px,
                               cs["alignments_class_1/shift"], rtol=1e-6)
    assert poses.box_size == 64
    # Consensus poses present: they are the default, a class is still choosable.
    both = class_cs(rng, consensus=True)
    both["alignments3D/pose"] = [0, 0, np.pi / 2]
    np.testing.assert_allclose(poses_from_cs(both).rotations[0], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)
    assert not np.allclose(poses_from_cs(both, cs_class=0).rotations[0], poses_from_cs(both).rotations[0])
    # One class and no consensus: read without a choice.
    single = class_cs(rng, n_classes=1)
    single["alignments_class_0/class_posterior"] = 1.0
    np.testing.assert_allclose(poses_from_cs(single).shifts_px, single["alignments_class_0/shift"] * 2.0, rtol=1e-6)


def test_cs_class_through_load_poses_and_parse_poses(tmp_path, rng):
    cs = class_cs(rng)
    path = tmp_path / "hetero.cs"
    with open(path, "wb") as fh:
        np.save(fh, cs)
    with pytest.raises(InputError, match=str(path)):
        load_poses(path)
    expected = poses_from_cs(cs, cs_class=2)
    np.testing.assert_allclose(load_poses(path, cs_class=2).shifts_px, expected.shifts_px)
    star = tmp_path / "p.star"
    star.write_text("data_\nloop_\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n0 0 0\n")
    with pytest.raises(InputError, match="only be chosen for a cryoSPARC .cs"):
        load_poses(star, cs_class=0)
    assert main(["parse-poses", str(path), "-o", str(tmp_path / "none.pkl")]) == 2
    assert not os.path.exists(tmp_path / "none.pkl")
    assert main(["parse-poses", str(path), "--cs-class", "2", "-o", str(tmp_path / "c2.pkl")]) == 0
    back = read_poses_pkl(tmp_path / "c2.pkl", box_size=64)
    np.testing.assert_allclose(back.rotations, expected.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts_px, expected.shifts_px, atol=1e-5)


def test_with_cs_poses_round_trip_keeps_other_fields(rng):
    cs = class_cs(rng)
    poses = Poses(random_rotations(rng, len(cs)), rng.normal(size=(len(cs), 2)), box_size=32)
    out = with_cs_poses(cs, poses)
    for name in cs.dtype.names:
        np.testing.assert_array_equal(out[name], cs[name])
    # Shifts given in px of a 32-px box are stored in px of the 64-px blob at blob/psize_A.
    np.testing.assert_allclose(out["alignments3D/shift"], poses.shifts_px * 2, rtol=1e-6)
    assert (out["alignments3D/psize_A"] == 1.0).all()
    back = poses_from_cs(out, box_size=32)
    np.testing.assert_allclose(back.rotations, poses.rotations, atol=1e-5)
    np.testing.assert_allclose(back.shifts_px, poses.shifts_px, atol=1e-5)
