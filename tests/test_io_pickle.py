"""Safe pickle loading and cryoDRGN pose/CTF pickles (real files in tmp_path)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.io import load_pickle, read_ctf_pkl, read_poses_pkl, save_pickle, write_ctf_pkl, write_poses_pkl
from cryoformer.metadata import CtfParameters, Poses


def leftovers(directory):
    """Temporary files atomic writers may have left in ``directory``."""
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def random_rotations(rng, n):
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    return q * np.sign(np.linalg.det(q))[:, None, None]  # proper rotations


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "poses.pkl"
    bad.write_bytes(pickle.dumps((np.eye(3)[None], _Evil(marker)), protocol=4))
    with pytest.raises(InputError) as err:
        load_pickle(bad)
    assert str(bad) in str(err.value)
    assert "refusing to unpickle" in str(err.value) and "system" in str(err.value)
    assert not marker.exists()
    with pytest.raises(InputError):
        read_poses_pkl(bad, box_size=64)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_objects_load_under_every_protocol(tmp_path, protocol):
    obj = (np.arange(6, dtype=np.float32).reshape(2, 3), {"a": np.float64(1.5), "b": [1, 2.0, "x"]}, complex(1, 2))
    f = tmp_path / "ok.pkl"
    f.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = load_pickle(f)
    np.testing.assert_array_equal(back[0], obj[0])
    assert back[1] == obj[1] and back[2] == obj[2]


def test_not_a_pickle_and_missing_file(tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle at all")
    with pytest.raises(InputError, match="junk.pkl"):
        load_pickle(junk)
    truncated = tmp_path / "trunc.pkl"
    truncated.write_bytes(pickle.dumps(np.zeros((100, 9), np.float32), protocol=4)[:200])
    with pytest.raises(InputError, match="trunc.pkl"):
        read_ctf_pkl(truncated)
    with pytest.raises(InputError, match="missing.pkl.*does not exist"):
        load_pickle(tmp_path / "missing.pkl")


def test_save_pickle_is_protocol_4_and_atomic(tmp_path):
    f = tmp_path / "x.pkl"
    save_pickle(np.ones(3), f)
    assert f.read_bytes()[:2] == b"\x80\x04"
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_pickle((np.zeros(3), lambda: 0), f)  # fails mid-write: the old file survives, no temp file
    np.testing.assert_array_equal(load_pickle(f), np.ones(3))
    assert leftovers(tmp_path) == []


def test_poses_pkl_round_trip(tmp_path, rng):
    poses = Poses(random_rotations(rng, 7), rng.normal(size=(7, 2)) * 3, box_size=64)
    f = tmp_path / "poses.pkl"
    write_poses_pkl(poses, f)
    rot, trans = pickle.loads(f.read_bytes())  # the layout cryoDRGN reads
    np.testing.assert_allclose(trans, poses.shifts_px / 64, rtol=1e-6)
    back = read_poses_pkl(f, box_size=64)
    np.testing.assert_allclose(back.rotations, poses.rotations, atol=1e-7)
    np.testing.assert_allclose(back.shifts_px, poses.shifts_px, atol=1e-5)
    assert back.box_size == 64


def test_poses_pkl_rotations_only_and_needs_box_for_trans(tmp_path, rng):
    rot = random_rotations(rng, 4).astype(np.float32)
    only = tmp_path / "rot.pkl"
    save_pickle(rot, only)
    p = read_poses_pkl(only)
    assert np.all(p.shifts_px == 0) and p.box_size is None
    both = tmp_path / "both.pkl"
    save_pickle((rot, np.zeros((4, 2), np.float32)), both)
    with pytest.raises(InputError) as err:
        read_poses_pkl(both)
    assert "both.pkl" in str(err.value) and err.value.field == "trans" and "box size" in str(err.value)


@pytest.mark.parametrize(
    "payload, field",
    [
        (np.zeros((4, 3)), "rot"),
        ((np.zeros((4, 3, 3)), np.zeros((4, 3))), "trans"),
        ((np.zeros((4, 3, 3)), np.zeros((5, 2))), "trans"),
        (("a", "b"), "rot"),
    ],
)
def test_poses_pkl_bad_shapes(tmp_path, payload, field):
    f = tmp_path / "bad.pkl"
    save_pickle(payload, f)
    with pytest.raises(InputError) as err:
        read_poses_pkl(f, box_size=32)
    assert err.value.path == str(f) and err.value.field == field


def test_ctf_pkl_round_trip_and_shape_check(tmp_path, rng):
    arr = np.column_stack([np.full(5, 64), np.full(5, 1.5), rng.uniform(1e4, 2e4, (5, 2)),
                           rng.uniform(-90, 90, 5), np.full(5, 300), np.full(5, 2.7), np.full(5, 0.1),
                           np.zeros(5)]).astype(np.float32)
    f = tmp_path / "ctf.pkl"
    write_ctf_pkl(CtfParameters(arr), f)
    np.testing.assert_array_equal(read_ctf_pkl(f).array, arr)
    assert pickle.loads(f.read_bytes()).dtype == np.float32
    bad = tmp_path / "ctf8.pkl"
    save_pickle(arr[:, :8], bad)
    with pytest.raises(InputError, match=r"ctf8.pkl: ctf: .*\[N, 9\]"):
        read_ctf_pkl(bad)
