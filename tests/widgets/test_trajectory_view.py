"""Meshes of maps and the trajectory player, without a browser (``trajectory_view.py``).

Known answers: the isosurface of a Gaussian blob is a sphere of a radius computed in closed
form; a trajectory starts and ends at its endpoints' latents; an export writes what
``cryoformer traverse`` writes for the same two latents, map for map.
"""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest

pytest.importorskip("anywidget")
pytest.importorskip("skimage", reason="the meshes need scikit-image (pip install scikit-image)")

from cryoformer.cli import main  # noqa: E402
from cryoformer.io import read_volume  # noqa: E402
from cryoformer.io.guard import OutputError  # noqa: E402
from cryoformer_widgets.session import RunSession  # noqa: E402
from cryoformer_widgets.trajectory_view import MESH_MAGIC, TrajectoryView, VolumeView, mesh_from_volume  # noqa: E402

D = 32
SIGMA_PX = 4.0      # Gaussian blob width (voxels)
CENTRE_PX = (3.0, -2.0, 1.0)  # blob centre (x, y, z) relative to the box centre, voxels


def _blob(sigma_px: float = SIGMA_PX) -> np.ndarray:
    """``[D, D, D]`` Gaussian of peak 1 centred at :data:`CENTRE_PX`."""
    i = np.arange(D) - D // 2
    z, y, x = np.meshgrid(i, i, i, indexing="ij")
    cx, cy, cz = CENTRE_PX
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px ** 2)).astype(np.float32)


def _radius_px(level: float) -> float:
    """Radius where the blob equals ``level``: ``σ·sqrt(2 ln(1/level))``."""
    return SIGMA_PX * np.sqrt(2 * np.log(1 / level))


def test_mesh_of_a_blob_is_the_sphere_at_the_level():
    mesh = mesh_from_volume(_blob(), level=0.5)
    assert mesh.n_vertices > 100 and mesh.faces.shape[1] == 3 and mesh.faces.max() < mesh.n_vertices
    assert np.all(np.abs(mesh.positions) <= 0.5)                      # the unit cube
    np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=1), 1.0, atol=1e-5)
    offset = mesh.positions * D - np.array(CENTRE_PX)                  # voxels from the blob centre
    radius = np.linalg.norm(offset, axis=1)
    np.testing.assert_allclose(radius.mean(), _radius_px(0.5), rtol=0.02)
    assert radius.std() < 0.1                                          # a sphere, in voxels
    # normals point outwards, and faces wind counter-clockwise seen from outside (WebGL's front)
    assert np.mean(np.sum(offset * mesh.normals, axis=1) > 0) > 0.99
    a, b, c = (mesh.positions[mesh.faces[:, i]] for i in range(3))
    face_normals = np.cross(b - a, c - a)
    centres = (a + b + c) / 3 * D - np.array(CENTRE_PX)
    assert np.mean(np.sum(face_normals * centres, axis=1) > 0) > 0.99


def test_mesh_level_in_sigma_and_grid_step():
    vol = _blob()
    level = float(vol.mean() + 2.0 * vol.std())
    mesh = mesh_from_volume(vol, threshold_sigma=2.0)
    assert mesh.level == pytest.approx(level, rel=1e-6)
    radius = np.linalg.norm(mesh.positions * D - np.array(CENTRE_PX), axis=1)
    np.testing.assert_allclose(radius.mean(), _radius_px(level), rtol=0.03)
    coarse = mesh_from_volume(vol, level=0.5, max_grid=16)            # every 2nd voxel
    assert 0 < coarse.n_vertices < mesh_from_volume(vol, level=0.5).n_vertices / 2
    empty = mesh_from_volume(vol, level=2.0)                          # above the maximum
    assert empty.n_vertices == 0 and empty.faces.shape == (0, 3)
    with pytest.raises(ValueError, match="cubic"):
        mesh_from_volume(np.zeros((4, 4, 6), np.float32))


def test_vertex_colours_sample_the_colour_map():
    i = np.arange(D, dtype=np.float32)
    ramp = np.broadcast_to(i[None, None, :], (D, D, D)) / (D - 1)     # value = x index / (D − 1)
    mesh = mesh_from_volume(_blob(), level=0.5, color_volume=ramp, color_range=(0.0, 1.0), colormap="gray")
    x_index = mesh.positions[:, 0] * D + D // 2
    np.testing.assert_allclose(mesh.colors[:, 0], x_index / (D - 1), atol=1 / 255)  # a 256-entry colour table
    np.testing.assert_allclose(mesh.colors[:, 0], mesh.colors[:, 2], atol=1e-6)


def test_wire_format():
    mesh = mesh_from_volume(_blob(), level=0.5, color_volume=_blob())
    data = mesh.to_bytes(frame=3, series=7)
    magic, V, F, flags, frame, series = struct.unpack_from("<4sIIIiI", data)
    assert (magic, V, F, flags, frame, series) == (MESH_MAGIC, mesh.n_vertices, len(mesh.faces), 1, 3, 7)
    assert len(data) == 24 + 4 * (3 * V * 3 + 3 * F)
    start = 24 + 4 * 3 * V * 2
    np.testing.assert_array_equal(np.frombuffer(data, "<u4", 3 * F, start).reshape(F, 3), mesh.faces)
    assert struct.unpack_from("<I", mesh_from_volume(_blob(), level=0.5).to_bytes(), 12)[0] == 0


def test_volume_view_remeshes_on_a_new_threshold():
    view = VolumeView(_blob(), threshold_sigma=1.0, label="blob")
    first, series = view.mesh(0), view.series_id
    assert view.frames_ready == 1 and view.title == "blob" and first.n_vertices > 0
    view.threshold_sigma = 3.0                                        # a higher level: a smaller sphere
    assert view.series_id == series + 1
    r = [np.linalg.norm(m.positions * D - np.array(CENTRE_PX), axis=1).mean() for m in (first, view.mesh(0))]
    assert r[1] < r[0]
    with pytest.raises(ValueError, match="not ready"):
        view.mesh(1)


@pytest.fixture(scope="module")
def session(spread_run):
    s = RunSession(spread_run, k=3, device="cpu")
    yield s
    s.close()


@pytest.mark.parametrize("mode", ["straight", "data"])
def test_path_between_two_clusters(session, mode, tmp_path):
    tv = TrajectoryView(session, clusters=(0, 2), n_frames=7, mode=mode, n_neighbours=20,
                        output_dir=str(tmp_path)).wait()
    assert tv.latents.shape == (7, session.latents.shape[1])
    np.testing.assert_array_equal(tv.latents[0], session.from_cluster(0)[0])
    np.testing.assert_array_equal(tv.latents[-1], session.from_cluster(2)[0])
    assert tv.frames_ready == 7 and len(tv.volumes) == 7 and tv.error == "" and not tv.busy
    assert tv.decode_seconds > 0 and "s/map" in tv.status
    assert all(tv.mesh(k).n_vertices > 0 for k in range(7))
    assert len({tv.mesh(k).level for k in range(7)}) == 1             # one level for the series
    if mode == "data":
        assert tv.path.particles[0] == session.center_rows[0] and tv.path.particles[-1] == session.center_rows[2]
    tv.close()


def test_new_endpoints_cancel_the_running_build(session, tmp_path):
    decoded, gate = [], threading.Event()
    original = session.volume_at

    def slow_volume_at(z, D=None):  # records what is decoded; waits for the test to go on
        decoded.append(np.asarray(z).copy())
        gate.wait(5)
        return original(z, D)

    session.volume_at = slow_volume_at
    try:
        tv = TrajectoryView(session, clusters=(0, 1), n_frames=8, output_dir=str(tmp_path))
        tv.set_clusters(1, 2)
        gate.set()
        tv.wait()
    finally:
        del session.volume_at
    first_path = np.linspace(session.from_cluster(0)[0], session.from_cluster(1)[0], 8)
    n_first = sum(any(np.allclose(z, p, atol=1e-5) for p in first_path[1:]) for z in decoded)
    assert n_first <= 1, f"the first build went on after new endpoints ({n_first} more maps)"
    np.testing.assert_array_equal(tv.latents[0], session.from_cluster(1)[0])
    assert tv.frames_ready == 8
    tv.close()


def test_export_writes_what_traverse_writes_and_never_replaces(session, spread_run, tmp_path):
    tv = TrajectoryView(session, clusters=(0, 2), n_frames=4, output_dir=str(tmp_path / "out")).wait()
    result = tv.export()
    out = result["out_dir"]
    assert out == str(tmp_path / "out" / "trajectory_clusters_0_2_straight")
    np.save(tmp_path / "a.npy", tv.latents[0])
    np.save(tmp_path / "b.npy", tv.latents[-1])
    ref = tmp_path / "traverse"
    assert main(["traverse", spread_run, "--z-start", str(tmp_path / "a.npy"), "--z-end", str(tmp_path / "b.npy"),
                 "-n", "4", "--k", "3", "-o", str(ref)]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in result["maps"]:
        mine, theirs = read_volume(os.path.join(out, name)), read_volume(ref / name)
        np.testing.assert_allclose(mine[0], theirs[0], rtol=1e-4, atol=1e-5 * np.abs(theirs[0]).max())
        assert mine[1] == pytest.approx(theirs[1])
    assert (ref / "z_path.txt").read_text() == open(os.path.join(out, "z_path.txt")).read()

    stamp = os.stat(os.path.join(out, "vol_000.mrc")).st_mtime_ns
    again = tv.export()                                               # the button: a new folder
    assert again["out_dir"] == out + "-2"
    with pytest.raises(OutputError, match="not empty"):
        tv.export(out)                                                # explicit and taken: refused
    with pytest.raises(OutputError, match="contains its input"):
        tv.export(spread_run, force=True)                             # the run itself: never
    assert os.stat(os.path.join(out, "vol_000.mrc")).st_mtime_ns == stamp
    tv.close()


def test_front_end_messages(session, tmp_path):
    tv = TrajectoryView(session, clusters=(0, 1), n_frames=3, output_dir=str(tmp_path)).wait()
    sent = []
    tv.send = lambda content, buffers=None: sent.append((content, buffers))
    tv._on_message(tv, {"type": "frame", "frame": 2, "series": tv.series_id}, [])
    tv._on_message(tv, {"type": "frame", "frame": 0, "series": tv.series_id - 1}, [])  # stale: dropped
    assert len(sent) == 1 and sent[0][0]["frame"] == 2
    assert sent[0][1][0] == tv.mesh(2).to_bytes(2, tv.series_id) and sent[0][1][1][:4] == b"\x89PNG"
    tv._on_message(tv, {"type": "build", "start": 2, "end": 0, "mode": "straight", "n_frames": 5}, [])
    tv.wait()
    assert (tv.start_cluster, tv.end_cluster, tv.frames_ready) == (2, 0, 5)
    tv._on_message(tv, {"type": "build", "start": 9, "end": 0, "mode": "straight", "n_frames": 5}, [])
    assert "out of range" in tv.error                                 # shown, not raised
    tv.close()
