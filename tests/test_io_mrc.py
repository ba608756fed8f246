"""MRC volume reading and writing."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.io import read_volume, read_volume_stack, write_volume


def test_volume_round_trip_with_voxel_size(tmp_path, rng):
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    vol[2, 3, 4] = 7.0  # [z, y, x]: must come back at the same index
    out = tmp_path / "map.mrc"
    write_volume(out, vol, 1.7, origin=(1.0, 2.0, 3.0))
    assert os.listdir(tmp_path) == ["map.mrc"]
    back, apix = read_volume(out)
    np.testing.assert_array_equal(back, vol)
    assert back.dtype == np.float32 and apix == pytest.approx(1.7)
    with mrcfile.open(out) as mrc:  # header as other tools see it
        assert float(mrc.header.cella.x) == pytest.approx(16 * 1.7, rel=1e-5)
        assert float(mrc.header.origin.z) == pytest.approx(3.0)
        assert float(mrc.header.dmax) == pytest.approx(vol.max())


def test_multichannel_volume_stack(tmp_path, rng):
    vols = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
    out = tmp_path / "attn.mrc"
    write_volume(out, vols, 2.0)
    back, apix = read_volume_stack(out)
    np.testing.assert_array_equal(back, vols)
    assert apix == pytest.approx(2.0)
    with pytest.raises(InputError, match="stack of 3 volumes"):
        read_volume(out)


def test_non_cubic_map(tmp_path, rng):
    out = tmp_path / "box.mrc"
    write_volume(out, np.zeros((48, 64, 64), np.float32), 1.0)
    with pytest.raises(InputError) as err:
        read_volume(out)
    assert str(out) in str(err.value) and "map is 64×64×48 but a cubic box is required" in str(err.value)
    vol, _ = read_volume(out, require_cubic=False)
    assert vol.shape == (48, 64, 64)


def test_truncated_mrc(tmp_path, rng):
    good = tmp_path / "good.mrc"
    write_volume(good, rng.normal(size=(16, 16, 16)), 1.0)
    cut = tmp_path / "cut.mrc"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        read_volume(cut)
    assert err.value.path == str(cut)


def test_non_mrc_bytes_and_missing(tmp_path):
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="junk.mrc.*not a readable MRC"):
        read_volume(junk)
    with pytest.raises(InputError, match="absent.mrc.*does not exist"):
        read_volume(tmp_path / "absent.mrc")


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    out = tmp_path / "map.mrc"
    write_volume(out, np.ones((4, 4, 4)), 1.0)
    with pytest.raises(ValueError):
        write_volume(out, np.ones((4, 4)), 1.0)
    with pytest.raises(ValueError):
        write_volume(out, np.ones((4, 4, 4)), 0.0)
    assert os.listdir(tmp_path) == ["map.mrc"]
    np.testing.assert_array_equal(read_volume(out)[0], 1.0)
