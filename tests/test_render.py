"""The headless isosurface renderer (``cryoformer.analysis.render``) and its movies."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cryoformer.analysis import render
from cryoformer.analysis.render import (BACKGROUND, CONTOUR_RGB, iso_level, isosurface_rgb,
                                        isosurface_rgb_at_level, movie_frame, series_level, write_gif,
                                        write_mp4)


def _ball(D=32, radius_px=8.0):
    """``[D, D, D]`` signed distance ``radius − |x|`` (positive inside), centred at ``D//2``."""
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    return (radius_px - np.sqrt(xx ** 2 + yy ** 2 + zz ** 2)).astype(np.float32)


def _surface_pixels(img):
    return np.any(img != BACKGROUND, axis=-1)


def test_isosurface_of_a_ball_is_a_disc_of_its_radius():
    for radius in (6.0, 10.0):
        img = isosurface_rgb_at_level(_ball(32, radius), 0.0, 0.0, 0.0, render_grid=32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert _surface_pixels(img).sum() == pytest.approx(np.pi * radius ** 2, rel=0.1)
    # The level is absolute: lower it by 2 and the disc's radius grows by 2.
    wider = isosurface_rgb_at_level(_ball(32, 6.0), -2.0, 0.0, 0.0, render_grid=32)
    assert _surface_pixels(wider).sum() == pytest.approx(np.pi * 8.0 ** 2, rel=0.1)
    assert not _surface_pixels(isosurface_rgb_at_level(_ball(), 100.0, render_grid=32)).any()  # above max


def test_sigma_level_is_the_absolute_level_of_mean_plus_k_sigma():
    v = _ball() + np.random.default_rng(0).normal(0, 0.1, (32, 32, 32)).astype(np.float32)
    for sigma in (0.5, 1.5):
        np.testing.assert_array_equal(isosurface_rgb(v, sigma, 40.0, -10.0, 48),
                                      isosurface_rgb_at_level(v, iso_level(v, sigma), 40.0, -10.0, 48))


def test_series_level_pools_every_voxel():
    rng = np.random.default_rng(1)
    vols = [rng.normal(i, 1 + i, (6, 6, 6)) for i in range(3)]
    pooled = np.concatenate([v.ravel() for v in vols])
    assert series_level(iter(vols), 1.5) == pytest.approx(pooled.mean() + 1.5 * pooled.std(), rel=1e-9)
    with pytest.raises(ValueError):
        series_level([], 1.0)


def test_movie_frame_bar_shows_the_place_in_the_series():
    frame = movie_frame(_ball(16, 5.0), 0.0, 1, 4, size_px=64)
    assert frame.shape == (64, 64, 3)
    bottom = frame[-1]
    assert (bottom[:32] == CONTOUR_RGB).all() and not (bottom[32:] == CONTOUR_RGB).all(axis=-1).any()


def test_gif_has_every_frame_and_no_temporary_file(tmp_path):
    frames = [np.full((20, 30, 3), 40 * i, np.uint8) for i in range(5)]
    write_gif(str(tmp_path / "m.gif"), frames, fps=4)
    with Image.open(tmp_path / "m.gif") as im:
        assert im.n_frames == 5 and im.size == (30, 20)
        assert im.info["duration"] == 250 and im.info["loop"] == 0
        im.seek(3)
        assert np.asarray(im.convert("RGB"))[0, 0, 0] == 120
    assert os.listdir(tmp_path) == ["m.gif"]


def test_mp4_is_skipped_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "ffmpeg_executable", lambda: None)
    assert write_mp4(str(tmp_path / "m.mp4"), [np.zeros((8, 8, 3), np.uint8)]) is False
    assert os.listdir(tmp_path) == []


def test_mp4_pipes_raw_frames_to_ffmpeg(tmp_path, monkeypatch):
    # A stand-in ffmpeg that stores its stdin under the last argument (the output name).
    fake = tmp_path / "ffmpeg"
    fake.write_text('#!/bin/sh\nfor a; do out="$a"; done\ncat > "$out"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(render, "ffmpeg_executable", lambda: str(fake))
    frames = [np.full((4, 6, 3), i, np.uint8) for i in range(3)]
    (tmp_path / "out").mkdir()
    assert write_mp4(str(tmp_path / "out" / "m.mp4"), frames) is True
    assert (tmp_path / "out" / "m.mp4").read_bytes() == b"".join(f.tobytes() for f in frames)
    assert os.listdir(tmp_path / "out") == ["m.mp4"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # a failing ffmpeg: no MP4, no leftovers, no exception
    assert write_mp4(str(tmp_path / "out" / "n.mp4"), frames) is False
    assert os.listdir(tmp_path / "out") == ["m.mp4"]


def test_render_imports_no_gui_toolkit():
    code = ("import sys, cryoformer.analysis.render, cryoformer.analysis.traversal; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ipywidgets', 'napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
