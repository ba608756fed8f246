"""LatentExplorer driven from Python, as the front end would drive it (no browser)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import traitlets as t
from PIL import Image

pytest.importorskip("anywidget")

from cryoformer.analysis import load_selection, pc_traversal, to_original_indices  # noqa: E402
from cryoformer.io import image_locations, load_pickle, read_star, read_volume  # noqa: E402
from cryoformer.io.guard import OutputError  # noqa: E402
from cryoformer_widgets import LatentExplorer  # noqa: E402
from cryoformer_widgets.trajectory_view import mesh_from_volume  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def explorer(spread_run, tmp_path):
    ex = LatentExplorer(spread_run, k=3, output_dir=str(tmp_path / "out"))
    ex.wait()
    yield ex
    ex.close()


def decoded(ex, row):
    return ex.state.run.model.decode_volume(ex.state.latents[row]).cpu().numpy()


def test_initial_view_and_traits(explorer, tiny_dataset):
    ex = explorer
    n = tiny_dataset.run_rows.size
    assert ex.n_particles == n == ex.n_drawn and ex.n_pcs == 3
    assert len(ex.points) == 8 * n and len(ex.point_rows) == 4 * n and len(ex.point_colors) == n
    np.testing.assert_array_equal(np.frombuffer(ex.points, np.float32).reshape(n, 2),
                                  ex.state.pca.projections[:, :2])
    assert len(ex.centers) == 3 and {c["cluster"] for c in ex.centers} == {0, 1, 2}
    # the first view is the volume at cluster 0's centre
    row0 = int(ex.state.center_rows[0])
    assert ex.selected_index == row0 and "cluster 0" in ex.volume_label
    np.testing.assert_allclose(ex.volume, decoded(ex, row0), atol=1e-6)
    assert ex.slices_png.startswith(PNG) and ex.iso_png.startswith(PNG)
    assert ex.marker == pytest.approx(ex.state.pca.projections[row0, :2].tolist(), abs=1e-4)
    assert ex.error == "" and not ex.busy and "12.00 Å" in ex.volume_info


def test_selecting_points_decodes_their_volumes(explorer):
    ex = explorer
    lab = ex.state.labels["kmeans"]
    a, b = int(np.nonzero(lab == 0)[0][0]), int(np.nonzero(lab == 2)[0][0])
    ex.selected_index = a
    ex.wait()
    slices_a, iso_a, vol_a = ex.slices_png, ex.iso_png, ex.volume
    np.testing.assert_allclose(vol_a, decoded(ex, a), atol=1e-6)
    ex.selected_index = b
    ex.wait()
    np.testing.assert_allclose(ex.volume, decoded(ex, b), atol=1e-6)
    assert ex.slices_png != slices_a and ex.iso_png != iso_a
    assert f"particle {b}" in ex.volume_label
    hits = ex.state.worker.cache.hits
    ex.selected_index = a  # back: from the cache, shown at once
    assert ex.state.worker.cache.hits == hits + 1
    assert ex.slices_png == slices_a and ex.iso_png == iso_a


def test_threshold_and_view_change_the_isosurface(explorer):
    ex = explorer
    vol, iso, slices = ex.volume, ex.iso_png, ex.slices_png
    ex.threshold = 0.5
    assert ex.iso_png != iso and ex.slices_png != slices  # the surface and the slice outline move
    assert ex.volume is vol
    iso_low = ex.iso_png
    ex.azimuth = -60.0
    assert ex.iso_png != iso_low
    ex.threshold = 50.0  # above the maximum: nothing left to draw
    img = np.asarray(Image.open(io.BytesIO(ex.iso_png)).convert("L"))
    assert img.max() == img.min()


def test_pc_traversal_slider(explorer):
    ex = explorer
    ex.traversal_pc = 2
    ex.traversal_steps = 5
    ex.traversal_step = 4
    ex.wait()
    z = pc_traversal(ex.state.pca, 2, 5)[4]
    np.testing.assert_allclose(ex.shown_latent, z, atol=1e-6)
    np.testing.assert_allclose(ex.volume, ex.state.run.model.decode_volume(z).cpu().numpy(), atol=1e-6)
    assert ex.selected_index == -1 and ex.volume_label == "PC2 step 5/5"
    assert ex.marker[0] == pytest.approx(0, abs=1e-4)  # on the PC2 axis: PC1 coordinate 0
    assert ex.marker[1] == pytest.approx(np.percentile(ex.state.pca.projections[:, 1], 95), rel=1e-4)
    first = ex.slices_png
    ex.traversal_step = 0
    ex.wait()
    assert ex.slices_png != first
    ex.selected_index = 0  # clicking a point ends the walk
    ex.wait()
    assert ex.traversal_step == -1 and "particle 0" in ex.volume_label


def test_box_and_lasso_selection_save_and_export(explorer, tiny_dataset, tmp_path):
    ex = explorer
    xy = ex.state.pca.projections
    ex.pc_x, ex.pc_y = 1, 3
    rows = ex.select_box(-10, -10, 0, 10)
    np.testing.assert_array_equal(rows, np.nonzero(xy[:, 0] < 0)[0])
    assert ex.n_selected == rows.size > 0
    drawn_rows = np.frombuffer(ex.point_rows, np.int32)
    np.testing.assert_array_equal(np.frombuffer(ex.point_selected, np.uint8), np.isin(drawn_rows, rows))
    # a front-end lasso (message), added to the selection
    ex._on_message(ex, {"type": "polygon", "points": [[0, -10], [10, -10], [10, 10]], "mode": "add"}, [])
    x, y = xy[:, 0], xy[:, 2]  # inside the triangle (0, −10), (10, −10), (10, 10):
    lasso = np.nonzero((y > -10) & (x < 10) & (y < 2 * x - 10))[0]
    np.testing.assert_array_equal(ex.selection, np.union1d(rows, lasso))
    assert ex.error == "" and "selected" in ex.message
    ex._on_message(ex, {"type": "clusters", "clusters": [1]}, [])
    np.testing.assert_array_equal(ex.selection, np.nonzero(ex.state.labels["kmeans"] == 1)[0])
    chosen = ex.selection.copy()
    ex._on_message(ex, {"type": "save_selection"}, [])
    saved = os.path.join(ex.output_dir, f"selection_{chosen.size}.npy")
    np.testing.assert_array_equal(load_selection(saved, ex.n_particles), chosen)
    ex._on_message(ex, {"type": "export", "format": "star"}, [])
    star = read_star(os.path.join(ex.output_dir, f"selection_{chosen.size}.star"))
    where = image_locations(read_star(tiny_dataset.sim / "particles.star"))
    original = to_original_indices(chosen, tiny_dataset.run_rows)
    assert image_locations(star) == [where[i] for i in original]  # the same images
    info = ex.export_selection(str(tmp_path / "sel.pkl"), fmt="pkl")
    np.testing.assert_array_equal(load_pickle(info["files"][0]), original)
    ex._on_message(ex, {"type": "clear"}, [])
    assert ex.n_selected == 0 and not any(ex.point_selected)


def test_colour_by_ground_truth_state(explorer, tiny_dataset):
    ex = explorer
    gt = np.load(tiny_dataset.sim / "gt" / "state.npy")
    ex.add_labels("true state", gt)
    # categories first (K-means, then the user's), then the continuous values read from the run
    assert ex.label_sets[:2] == ["kmeans", "true state"]
    assert set(ex.label_sets[2:]) == set(ex.state.values) and "defocus_angstrom" in ex.label_sets
    ex.color_by = "true state"
    want = gt[tiny_dataset.run_rows]
    np.testing.assert_array_equal(np.frombuffer(ex.point_colors, np.uint8), want)
    assert [d["count"] for d in ex.legend] == np.bincount(want).tolist()
    ex.color_by = "no such labels"
    assert "unknown colouring" in ex.error


def test_save_volume_and_errors_in_the_widget(explorer, tmp_path):
    ex = explorer
    ex._on_message(ex, {"type": "save_volume"}, [])
    files = [f for f in os.listdir(ex.output_dir) if f.endswith(".mrc")]
    assert len(files) == 1 and files[0].startswith("volume_particle_")
    vol, apix = read_volume(os.path.join(ex.output_dir, files[0]))
    np.testing.assert_array_equal(vol, ex.volume)
    assert apix == pytest.approx(12.0)
    # failures are reported in the widget, not raised into the front end's handler
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    ex.output_dir = str(blocker)
    ex._on_message(ex, {"type": "save_volume"}, [])
    assert ex.error.startswith("save volume:") and "not_a_dir" in ex.error
    ex.selected_index = 10_000
    assert "outside" in ex.error
    ex._on_message(ex, {"type": "export", "format": "star"}, [])  # nothing selected
    assert "nothing is selected" in ex.error


def test_300k_particles_stay_responsive(spread_run, tmp_path):
    """A run with 300 000 particles: every one is drawn, selections cover all of them; with
    ``max_drawn`` below N a stratified subsample is drawn and selections still cover all."""
    run_dir = tmp_path / "big"
    shutil.copytree(spread_run, run_dir)
    latents = sorted((run_dir / "latents").iterdir())[-1]
    epoch = int(latents.stem.split("_")[1])
    rng = np.random.default_rng(0)
    n = 300_000
    z = rng.normal(size=(n, 3)).astype(np.float32)
    np.save(latents, z)
    np.save(run_dir / "particle_indices.npy", np.arange(n, dtype=np.int64))
    # labels from "cryoformer analyze" are read rather than recomputed
    os.makedirs(run_dir / "analysis")
    labels = (z[:, 0] > 0).astype(np.int64) + 2 * (z[:, 1] > 1.5)
    np.save(run_dir / "analysis" / "kmeans_labels.npy", labels)
    (run_dir / "analysis" / "analysis.json").write_text(json.dumps({"epoch": epoch}))
    t0 = time.perf_counter()
    ex = LatentExplorer(str(run_dir), output_dir=str(tmp_path / "out"))
    try:
        build = time.perf_counter() - t0
        assert ex.n_particles == n == ex.n_drawn
        assert len(ex.points) == 8 * n and len(ex.point_selected) == n
        assert build < 20, f"building the explorer took {build:.1f} s"
        t0 = time.perf_counter()
        ex.select_box(0, 0, 10, 10)
        assert time.perf_counter() - t0 < 2.0
        xy = ex.state.pca.projections
        assert ex.n_selected == int(np.sum((xy[:, 0] > 0) & (xy[:, 1] > 0)))
        assert np.frombuffer(ex.point_selected, np.uint8).sum() == ex.n_selected
        ex.wait()
        assert ex.volume is not None and ex.error == ""
    finally:
        ex.close()
    ex = LatentExplorer(str(run_dir), output_dir=str(tmp_path / "out"), max_drawn=20_000, select=None)
    try:
        assert ex.n_drawn <= 20_000
        ex.select_box(0, 0, 10, 10)
        assert ex.n_selected == int(np.sum((xy[:, 0] > 0) & (xy[:, 1] > 0)))  # all particles, not drawn ones
        assert ex.n_selected > 10 * np.frombuffer(ex.point_selected, np.uint8).sum()
        drawn_labels = labels[np.frombuffer(ex.point_rows, np.int32)]
        assert set(drawn_labels.tolist()) == set(labels.tolist())
    finally:
        ex.close()


def test_axes_umap_and_latent_dimensions(spread_run, tmp_path):
    """The axes menus offer PCs, latent dimensions and, where analyze wrote umap.npy, the UMAP."""
    run_dir = tmp_path / "run"
    shutil.copytree(spread_run, run_dir)
    ex = LatentExplorer(str(run_dir), k=3, output_dir=str(tmp_path / "out"))
    try:
        ex.wait()
        assert "UMAP1" not in ex.axis_names and ex.state.umap is None
        ex.axis_x, ex.axis_y = "z2", "PC1"
        n = ex.n_particles
        np.testing.assert_array_equal(np.frombuffer(ex.points, np.float32).reshape(n, 2),
                                      np.stack([ex.state.latents[:, 2], ex.state.pca.projections[:, 0]], 1))
        assert (ex.pc_x, ex.pc_y) == (0, 1)
        ex.pc_x = 3  # scripts may still set a PC number
        assert ex.axis_x == "PC3"
    finally:
        ex.close()
    # umap.npy of analyze for the run's default epoch (RUN/analysis, no analysis.json): a known layout.
    (run_dir / "analysis").mkdir()
    umap = np.stack([np.arange(n), np.arange(n) % 4], 1).astype(np.float32)  # [N, 2]
    np.save(run_dir / "analysis" / "umap.npy", umap)
    ex = LatentExplorer(str(run_dir), k=3, output_dir=str(tmp_path / "out"))
    try:
        ex.wait()
        assert ex.axis_names[3:5] == ["UMAP1", "UMAP2"] and ex.state.umap_source.endswith("umap.npy")
        ex.axis_x, ex.axis_y = "UMAP1", "UMAP2"
        drawn = np.frombuffer(ex.point_rows, np.int32)
        np.testing.assert_array_equal(np.frombuffer(ex.points, np.float32).reshape(-1, 2), umap[drawn])
        row = ex.selected_index  # the particle shown: marked at its own UMAP position
        assert ex.marker == pytest.approx(umap[row].tolist())
        centre = ex.centers[0]
        assert [centre["x"], centre["y"]] == pytest.approx(umap[centre["row"]].tolist())
        rows = ex.select_box(-0.5, 0.5, 9.5, 1.5)  # UMAP coordinates: rows 0…9 with row % 4 == 1
        np.testing.assert_array_equal(rows, [1, 5, 9])
        ex.traversal_step = 2  # a latent between particles has no UMAP position: no marker
        ex.wait()
        assert ex.marker == [] and ex.error == ""
        ex.axis_y = "PC2"
        assert ex.marker == [] and ex.error == ""
        ex.axis_x = "PC1"
        assert len(ex.marker) == 2
    finally:
        ex.close()


# ---------------------------------------------------------------------- 3D view and trajectories
def _mesh_header(data: bytes) -> tuple:
    """(magic, V, F) of a mesh in the wire format of ``trajectory_view.Mesh.to_bytes``."""
    magic, V, F = struct.unpack_from("<4sII", data)
    return magic, V, F


def test_3d_view_meshes_the_volume_at_the_threshold(explorer):
    pytest.importorskip("skimage", reason="the 3D view needs scikit-image")
    ex = explorer
    assert ex.volume_view == "3d" and ex.display == "volume"
    expected = mesh_from_volume(ex.volume, threshold_sigma=ex.threshold, max_grid=ex.mesh_grid)
    assert ex.volume_mesh == expected.to_bytes() and _mesh_header(ex.volume_mesh)[1] > 0
    ex.threshold = 3.0                                               # a higher level: fewer voxels inside
    higher = mesh_from_volume(ex.volume, threshold_sigma=3.0, max_grid=ex.mesh_grid)
    assert ex.volume_mesh == higher.to_bytes() and higher.level > expected.level
    row = int(np.nonzero(ex.state.labels["kmeans"] == 2)[0][0])      # a new volume: a new mesh
    ex.selected_index = row
    ex.wait()
    assert ex.volume_mesh == mesh_from_volume(decoded(ex, row), threshold_sigma=3.0,
                                              max_grid=ex.mesh_grid).to_bytes()


def _pc_xy(ex, z: np.ndarray) -> np.ndarray:
    """``[n, 2]`` PC1/PC2 coordinates of latents ``z`` ``[n, zdim]``, computed here."""
    return (z.astype(np.float64) - ex.state.pca.mean) @ ex.state.pca.components[:2].T


def test_trajectory_between_clusters(explorer):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex = explorer
    ex.build_trajectory(clusters=(0, 2), n_frames=5).wait_trajectory()
    z = ex.trajectory.path.latents
    np.testing.assert_array_equal(z[0], ex.state.latents[ex.state.center_rows[0]])   # starts and ends
    np.testing.assert_array_equal(z[-1], ex.state.latents[ex.state.center_rows[2]])  # at the centres
    np.testing.assert_allclose(z[2], (z[0] + z[-1]) / 2, atol=1e-5)                   # a straight line
    assert ex.trajectory_ready == 5 and ex.display == "trajectory" and not ex.trajectory_busy
    assert "s/map" in ex.trajectory_status and ex.trajectory_ends == {"kind": "cluster", "a": 0, "b": 2}
    # the polyline on the scatter: one point per frame, at the frames' PC coordinates
    assert len(ex.trajectory_path) == 5
    np.testing.assert_allclose(ex.trajectory_path, _pc_xy(ex, z), rtol=1e-5, atol=1e-5)
    assert ex.trajectory_path[0] == pytest.approx([ex.centers[0]["x"], ex.centers[0]["y"]], abs=1e-4)
    ex.axis_x, ex.axis_y = "z0", "z2"                                  # other axes: the polyline follows
    np.testing.assert_allclose(ex.trajectory_path, z[:, [0, 2]], atol=1e-6)
    # every frame's map is the decoder's, meshed at one level
    np.testing.assert_allclose(ex.trajectory.volumes[4], decoded(ex, int(ex.state.center_rows[2])), atol=1e-6)
    assert len({m.level for m in ex.trajectory.meshes}) == 1
    ex.trajectory_frame = 3
    with pytest.raises(t.TraitError, match="out of range"):
        ex.trajectory_frame = 5
    ex.selected_index = int(ex.state.center_rows[1])                  # a click on the scatter: the volume again
    assert ex.display == "volume" and not ex.trajectory_playing


def test_trajectory_between_two_particles_along_the_data(explorer):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex = explorer
    lab = ex.state.labels["kmeans"]
    i, j = (int(r) for r in np.nonzero(lab == 0)[0][[1, -1]])      # one group: joined in the graph
    ex.build_trajectory(rows=(i, j), n_frames=4, mode="data").wait_trajectory()
    path = ex.trajectory.path
    assert path.particles[0] == i and path.particles[-1] == j
    np.testing.assert_array_equal(path.latents[0], ex.state.latents[i])
    np.testing.assert_array_equal(path.latents[-1], ex.state.latents[j])
    assert len(ex.trajectory_path) == 4 and ex.trajectory_ends == {"kind": "particle", "a": i, "b": j}
    # the three groups of this run are far apart: no path along the data joins them
    ex._on_message(ex, {"type": "build_trajectory", "clusters": [0, 2], "mode": "data", "n_frames": 4}, [])
    with pytest.raises(Exception, match="not connected"):
        ex.wait_trajectory()
    assert "not connected" in ex.error and not ex.trajectory_busy
    with pytest.raises(ValueError, match="clusters=\\(a, b\\) or rows"):
        ex.build_trajectory(clusters=(0, 1), rows=(i, j))
    with pytest.raises(ValueError, match="out of range"):
        ex.build_trajectory(clusters=(0, 9))


def test_trajectory_frames_and_build_from_the_front_end(explorer):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex = explorer
    sent = []
    ex.send = lambda content, buffers=None: sent.append((content, buffers))
    ex._on_message(ex, {"type": "build_trajectory", "clusters": [2, 0], "mode": "straight", "n_frames": 3}, [])
    ex.wait_trajectory()
    assert ex.trajectory_ready == 3 and ex.trajectory_ends["a"] == 2
    series = ex.trajectory_series
    ex._on_message(ex, {"type": "trajectory_frame", "frame": 1, "series": series}, [])
    ex._on_message(ex, {"type": "trajectory_frame", "frame": 0, "series": series - 1}, [])  # stale: dropped
    assert len(sent) == 1 and sent[0][0]["frame"] == 1
    assert sent[0][1][0] == ex.trajectory.meshes[1].to_bytes(1, series) and sent[0][1][1].startswith(PNG)
    ex.threshold = 2.5                                                # the trajectory is re-meshed too
    ex.wait_trajectory()
    assert ex.trajectory_series == series + 1 and ex.trajectory.threshold_sigma == 2.5
    ex._on_message(ex, {"type": "build_trajectory", "rows": [0, 10_000], "mode": "straight", "n_frames": 3}, [])
    assert "outside" in ex.error or "out of range" in ex.error       # shown, not raised


def test_new_build_cancels_the_running_one(explorer):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex, session = explorer, explorer.state
    decoded_z, gate = [], threading.Event()
    original = session.volume_at

    def slow_volume_at(z, D=None):  # records what is decoded; waits for the test to go on
        decoded_z.append(np.asarray(z).copy())
        gate.wait(5)
        return original(z, D)

    session.volume_at = slow_volume_at
    try:
        ex.build_trajectory(clusters=(0, 1), n_frames=8)
        ex.build_trajectory(clusters=(1, 2), n_frames=6)
        gate.set()
        ex.wait_trajectory()
    finally:
        del session.volume_at
    first = np.linspace(session.from_cluster(0)[0], session.from_cluster(1)[0], 8)
    n_first = sum(any(np.allclose(z, p, atol=1e-5) for p in first[1:]) for z in decoded_z)
    assert n_first <= 1, f"the first build went on after a new one ({n_first} more maps)"
    np.testing.assert_array_equal(ex.trajectory.path.latents[0], session.from_cluster(1)[0])
    assert ex.trajectory_ready == 6 and len(ex.trajectory_path) == 6


def test_export_trajectory_writes_the_series_and_never_replaces(explorer, spread_run):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex = explorer
    ex.build_trajectory(clusters=(0, 2), n_frames=3).wait_trajectory()
    result = ex.export_trajectory()
    out = result["out_dir"]
    assert out == os.path.join(ex.output_dir, "trajectory_clusters_0_2_straight") == ex.trajectory_export
    written = sorted(os.listdir(out))
    assert written == sorted(["vol_000.mrc", "vol_001.mrc", "vol_002.mrc", "z_path.txt", "open_series.cxc",
                              "movie.gif"] + (["movie.mp4"] if "movie.mp4" in written else []))
    for k in range(3):
        vol, apix = read_volume(os.path.join(out, f"vol_{k:03d}.mrc"))
        np.testing.assert_allclose(vol, ex.trajectory.volumes[k], rtol=1e-5, atol=1e-6)
        assert apix == pytest.approx(12.0)
    np.testing.assert_allclose(np.loadtxt(os.path.join(out, "z_path.txt")), ex.trajectory.path.latents, atol=1e-5)
    stamp = os.stat(os.path.join(out, "vol_000.mrc")).st_mtime_ns
    ex._on_message(ex, {"type": "export_trajectory"}, [])              # the button: a new folder
    ex.wait_trajectory()
    assert ex.trajectory_export == out + "-2" and "exported 3 maps" in ex.trajectory_status
    with pytest.raises(OutputError, match="not empty"):
        ex.export_trajectory(out, movie=False)                        # explicit and taken: refused
    with pytest.raises(OutputError, match="contains its input"):
        ex.export_trajectory(spread_run, force=True, movie=False)     # the run itself: never
    assert os.stat(os.path.join(out, "vol_000.mrc")).st_mtime_ns == stamp


def test_standalone_trajectory_view_shares_the_session(explorer):
    pytest.importorskip("skimage", reason="trajectories are played as meshes (scikit-image)")
    ex = explorer
    ex.build_trajectory(clusters=(2, 1), n_frames=4, mode="straight").wait_trajectory()
    tv = ex.trajectory_view().wait()
    try:
        assert tv.session is ex.state and (tv.start_cluster, tv.end_cluster) == (2, 1)
        np.testing.assert_array_equal(tv.latents, ex.trajectory.path.latents)
        assert tv.frames_ready == 4 and tv.threshold_sigma == ex.threshold
    finally:
        tv.close()
    row = int(ex.state.center_rows[0])                                # the explorer still decodes: its
    ex.selected_index = row                                           # session outlived the view
    ex.wait()
    np.testing.assert_allclose(ex.volume, decoded(ex, row), atol=1e-6)
