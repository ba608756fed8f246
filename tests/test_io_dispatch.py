"""Format dispatch by extension and cross-format consistency."""

from __future__ import annotations

import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.io import (
    load_ctf,
    load_poses,
    write_cs,
    write_ctf_pkl,
    write_poses_pkl,
    write_star,
)
from cryoformer.metadata import CtfParameters, Poses


@pytest.fixture
def metadata(rng):
    n = 6
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    poses = Poses(q * np.sign(np.linalg.det(q))[:, None, None], rng.normal(size=(n, 2)), box_size=32)
    arr = np.column_stack([np.full(n, 32), np.full(n, 2.0), rng.uniform(1e4, 2e4, (n, 2)),
                           rng.uniform(-90, 90, n), np.full(n, 300), np.full(n, 2.7), np.full(n, 0.1),
                           np.zeros(n)])
    return poses, CtfParameters(arr)


def test_all_formats_agree(tmp_path, metadata):
    poses, ctf = metadata
    n = len(poses)
    write_poses_pkl(poses, tmp_path / "poses.pkl")
    write_ctf_pkl(ctf, tmp_path / "ctf.pkl")
    write_star(tmp_path / "p.star", poses, ctf, [f"{i + 1}@s.mrcs" for i in range(n)], 2.0)
    write_cs(tmp_path / "p.cs", poses, ctf, "s.mrcs", np.arange(n))
    for pose_file in ("poses.pkl", "p.star", "p.cs"):
        got = load_poses(tmp_path / pose_file, box_size=32)
        np.testing.assert_allclose(got.rotations, poses.rotations, atol=1e-5, err_msg=pose_file)
        np.testing.assert_allclose(got.shifts_px, poses.shifts_px, atol=1e-5, err_msg=pose_file)
        assert got.box_size == 32
    for ctf_file in ("ctf.pkl", "p.star", "p.cs"):
        np.testing.assert_allclose(load_ctf(tmp_path / ctf_file).array, ctf.array, rtol=1e-5, atol=1e-4,
                                   err_msg=ctf_file)


def test_pkl_ctf_overrides(tmp_path, metadata):
    _, ctf = metadata
    write_ctf_pkl(ctf, tmp_path / "ctf.pkl")
    got = load_ctf(tmp_path / "ctf.pkl", box_size=64, pixel_size_angstrom=1.0, voltage_kv=200,
                   spherical_aberration_mm=2.0, amplitude_contrast=0.07, phase_shift_deg=10)
    np.testing.assert_allclose(got.array[:, [0, 1, 5, 6, 7, 8]], [[64, 1.0, 200, 2.0, 0.07, 10]] * len(ctf),
                               rtol=1e-6)
    np.testing.assert_array_equal(got.array[:, 2:5], ctf.array[:, 2:5])


def test_pkl_poses_need_box_size(tmp_path, metadata):
    poses, _ = metadata
    write_poses_pkl(poses, tmp_path / "poses.pkl")
    with pytest.raises(InputError, match="poses.pkl: trans: .*box size"):
        load_poses(tmp_path / "poses.pkl")


def test_unknown_extension(tmp_path):
    f = tmp_path / "poses.json"
    f.write_text("{}")
    with pytest.raises(InputError, match=r"poses.json.*unknown pose file extension '\.json'"):
        load_poses(f)
    with pytest.raises(InputError, match=r"poses.json.*unknown CTF file extension"):
        load_ctf(f)
    with pytest.raises(InputError, match="nothing.star.*does not exist"):
        load_poses(tmp_path / "nothing.star")


