"""Latent trajectories (PC, straight, k-NN graph) and ``cryoformer traverse``: the maps, z_path.txt,
the ChimeraX series script and the movie."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cryoformer.analysis.traversal import (chimerax_script, graph_path, pc_path, resample_path,
                                           straight_path)
from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.errors import InputError
from cryoformer.io import read_volume

from test_trainer_helpers import tiny_cli_run


def _arc_with_gap(rng, n_per_arm=150):
    """Latents on a half ring of radius 1 (angles 0…π, 2-D): two clusters at its ends joined
    only along the ring, so the straight line between the ends crosses the empty centre."""
    angles = rng.uniform(0.0, np.pi, 2 * n_per_arm)
    angles[:20], angles[20:40] = rng.uniform(0, 0.05, 20), rng.uniform(np.pi - 0.05, np.pi, 20)  # the clusters
    radius = 1.0 + rng.normal(0.0, 0.02, len(angles))
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)  # [N, 2]


def _distance_to_data(points, data):
    return np.min(np.linalg.norm(points[:, None, :] - data[None, :, :], axis=2), axis=1)


def test_resample_path_is_even_in_arc_length():
    # An L of total length 2: 5 points → steps of 0.5, the corner exactly hit.
    out = resample_path(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), 5)
    np.testing.assert_allclose(out, [[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1]], atol=1e-6)
    np.testing.assert_array_equal(resample_path(np.ones((3, 4)), 3), np.ones((3, 4)))  # zero length


def test_straight_path_known_answer_and_refusals():
    p = straight_path(np.array([0.0, 1.0]), np.array([3.0, -2.0]), 4)
    np.testing.assert_allclose(p.latents, [[0, 1], [1, 0], [2, -1], [3, -2]], atol=1e-6)
    assert p.length == pytest.approx(np.hypot(3, 3))
    with pytest.raises(InputError, match="-n"):
        straight_path(np.zeros(2), np.ones(2), 1)


def test_pc_path_follows_the_long_axis(rng):
    z = rng.normal(size=(500, 3)) * np.array([5.0, 1.0, 0.2])  # PC1 is the first axis
    p = pc_path(z, 1, 5)
    steps = np.diff(p.latents, axis=0)
    assert np.abs(steps[:, 1:]).max() < 0.05 * np.abs(steps[:, 0]).min()  # along x only
    assert p.latents[-1, 0] - p.latents[0, 0] == pytest.approx(
        np.percentile(z[:, 0], 95) - np.percentile(z[:, 0], 5), rel=0.05)
    with pytest.raises(InputError, match="--pc"):
        pc_path(z, 4, 5)


def test_graph_path_stays_on_the_data_where_the_line_crosses_a_gap(rng):
    z = _arc_with_gap(rng)
    start, end = 0, 20  # one particle in each end cluster
    line = straight_path(z[start], z[end], 20).latents
    assert _distance_to_data(line, z).max() > 0.8  # the line's middle is ~1 from any particle
    path = graph_path(z, start, end, 20, n_neighbours=8)
    assert path.particles[0] == start and path.particles[-1] == end
    hops = np.linalg.norm(np.diff(z[path.particles], axis=0), axis=1)
    assert hops.max() < 0.15  # every step between neighbouring particles, none across the gap
    assert _distance_to_data(path.latents, z).max() < 0.1
    assert path.length == pytest.approx(np.pi, rel=0.1)  # half the ring's circumference
    np.testing.assert_allclose(path.latents[[0, -1]], z[[start, end]], atol=1e-6)
    steps = np.linalg.norm(np.diff(path.latents, axis=0), axis=1)
    np.testing.assert_allclose(steps, steps.mean(), rtol=0.2)  # evenly spaced (chords of the arc)


def test_graph_path_on_a_subsample_keeps_the_end_particles(rng):
    z = _arc_with_gap(rng, 400)
    path = graph_path(z, 5, 25, 6, n_neighbours=8, max_points=200, seed=1)
    assert path.particles[0] == 5 and path.particles[-1] == 25
    assert "200 latents" in path.description
    assert np.linalg.norm(np.diff(z[path.particles], axis=0), axis=1).max() < 0.2


def test_graph_path_refuses_disconnected_and_bad_rows(rng):
    z = np.concatenate([rng.normal(0, 0.1, (30, 2)), rng.normal(50, 0.1, (30, 2))])
    with pytest.raises(InputError, match="not connected"):
        graph_path(z, 0, 40, 5, n_neighbours=3)
    with pytest.raises(InputError, match="--graph"):
        graph_path(z, 0, 60, 5)


def test_chimerax_script_opens_every_map_as_one_series():
    names = [f"vol_{i:03d}.mrc" for i in range(3, 9)]
    script = chimerax_script(names, 0.0123, "PC1")
    open_line = next(line for line in script.splitlines() if line.startswith("open "))
    assert open_line.split()[1:-2] == names and open_line.endswith("vseries true")
    assert "level 0.0123" in script and "vseries play #1" in script


# --- the command, on a one-epoch run ------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run (24 particles, box 16, 6 Å, zdim 2) and its analysis (k = 2, 3 maps per PC)."""
    root = tmp_path_factory.mktemp("traverse")
    tiny_cli_run(root)
    assert main(["analyze", str(root / "run"), "--k", "2", "--n-traversal", "3", "--skip-umap"]) == 0
    return root / "run"


def _gif_frames(path):
    with Image.open(path) as im:
        return im.n_frames, im.size


def _fails(argv, capsys, *words):
    capsys.readouterr()
    assert main(argv) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_analyze_writes_pc_movies(run):
    for pc in (1, 2):
        assert _gif_frames(run / "analysis" / f"pc{pc}_movie.gif") == (3, (256, 256))


def test_traverse_graph_writes_series_script_and_movie(run, tmp_path):
    out = tmp_path / "graph"
    assert main(["traverse", str(run), "--graph", "0", "5", "-n", "4", "-o", str(out)]) == 0
    maps = [f"vol_{i:03d}.mrc" for i in range(4)]
    assert set(maps + ["z_path.txt", "path_particles.txt", "open_series.cxc", "movie.gif"]) <= set(os.listdir(out))
    vol, apix = read_volume(out / "vol_003.mrc")
    assert vol.shape == (16, 16, 16) and apix == pytest.approx(6.0)
    z = np.load(run / "analysis" / "z.npy")
    z_path = np.loadtxt(out / "z_path.txt")
    assert z_path.shape == (4, 2)
    np.testing.assert_allclose(z_path[[0, -1]], z[[0, 5]], atol=1e-5)
    rows = np.loadtxt(out / "path_particles.txt", dtype=int, ndmin=1)
    assert rows[0] == 0 and rows[-1] == 5
    script = (out / "open_series.cxc").read_text()
    assert all(m in script for m in maps) and "vseries true" in script
    assert _gif_frames(out / "movie.gif") == (4, (256, 256))


def test_traverse_refuses_to_overwrite_without_force(run, tmp_path, capsys):
    out = tmp_path / "pc"
    assert main(["traverse", str(run), "--pc", "1", "-n", "3", "--no-movie", "-o", str(out)]) == 0
    before = (out / "vol_000.mrc").read_bytes()
    _fails(["traverse", str(run), "--pc", "2", "-n", "3", "-o", str(out)], capsys, "--force")
    assert (out / "vol_000.mrc").read_bytes() == before and not (out / "movie.gif").exists()
    assert main(["traverse", str(run), "--pc", "2", "-n", "3", "-o", str(out), "--force"]) == 0
    assert (out / "movie.gif").exists()


def test_traverse_centres_of_the_analysis_with_volume_options(run, tmp_path):
    out = tmp_path / "centres"
    assert main(["traverse", str(run), "--centres", "1", "0", "-n", "3", "--vol-start-index", "1",
                 "--invert", "--no-movie", "-o", str(out)]) == 0
    centres = np.load(run / "analysis" / "kmeans_centers.npy")
    z_path = np.loadtxt(out / "z_path.txt")
    np.testing.assert_allclose(z_path[[0, -1]], centres[[1, 0]], atol=1e-5)
    assert sorted(f for f in os.listdir(out) if f.endswith(".mrc")) == ["vol_001.mrc", "vol_002.mrc", "vol_003.mrc"]
    plain = tmp_path / "plain"
    assert main(["eval-vol", str(run), "--zfile", str(out / "z_path.txt"), "-o", str(plain)]) == 0
    np.testing.assert_allclose(read_volume(out / "vol_001.mrc")[0], -read_volume(plain / "vol_000.mrc")[0],
                               atol=1e-6)


def test_traverse_bad_arguments_one_line(run, tmp_path, capsys):
    out = tmp_path / "bad"
    _fails(["traverse", str(run), "--pc", "1", "--graph", "0", "1", "-o", str(out)], capsys, "exactly one")
    _fails(["traverse", str(run), "--particles", "0", "99", "-o", str(out)], capsys, "--particles", "0…23")
    _fails(["traverse", str(run), "--z-start", "0 0", "-o", str(out)], capsys, "--z-end")
    _fails(["traverse", str(run), "--z-start", "0 0 0", "--z-end", "1 1", "-o", str(out)], capsys, "zdim = 2")
    _fails(["traverse", str(run), "--pc", "1", "--low-pass", "10", "-o", str(out)], capsys, "--low-pass", "12")
    assert not out.exists()
