"""The trajectory player in a real browser: JupyterLab + headless Chromium (Playwright), WebGL.

A notebook showing a ``TrajectoryView`` between two clusters of the test run is opened in
JupyterLab and run. The test then measures the WebGL canvas from screenshots: the mesh is drawn
(many non-background pixels, shaded with many grey levels), playing shows several frames, the
last frame differs from the first, dragging rotates the view, and the export button writes the
series that ``cryoformer traverse`` writes. Headless Chromium draws WebGL with SwiftShader (a
CPU renderer); where it cannot, the test skips with the reason. Screenshots are kept in
``test-artifacts/browser/``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
# SwiftShader: WebGL on the CPU, as on CI machines without a GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"]
N_FRAMES = 6
BACKGROUND_RGB = (32, 32, 32)  # mesh_view.js clears to 0.125 grey

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(run_dir: str, out_dir: str) -> dict:
    source = ("from cryoformer_widgets.trajectory_view import TrajectoryView\n"
              f"tv = TrajectoryView({run_dir!r}, clusters=(0, 2), n_frames={N_FRAMES}, k=3, fps=4,\n"
              f"                    output_dir={out_dir!r})\n"
              "tv")
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": "trajectory", "metadata": {}, "execution_count": None,
                       "outputs": [], "source": source}]}


@pytest.fixture
def sync_api():
    """Playwright's sync API, skipping visibly without Chromium, Playwright or scikit-image."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("skimage", reason="the meshes need scikit-image (pip install scikit-image)")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture
def jupyterlab(sync_api, spread_run, tmp_path):
    """A JupyterLab server on a free port, serving a notebook that shows the trajectory view."""
    pytest.importorskip("jupyterlab")
    pytest.importorskip("anywidget")
    root = tmp_path / "lab"
    root.mkdir()
    (root / "trajectory.ipynb").write_text(json.dumps(_notebook(spread_run, str(tmp_path / "out"))))
    port, token = _free_port(), "cryoformer-browser-test"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), IPYTHONDIR=str(tmp_path / "ipython"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers often run as root
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not answer within 90 s")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/trajectory.ipynb?token={token}", tmp_path / "out"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def _run_notebook(page, sync_api, url: str) -> None:
    """Open the notebook, run it, wait until every frame of the series reached the browser."""
    page.set_default_timeout(90_000)
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands")
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.sessionContext && w.sessionContext.session"
        " && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle'; }")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    try:
        page.wait_for_function(
            f"() => {{ const r = document.querySelector('.ctv-root');"
            f" return r && r.dataset.received === '{N_FRAMES}'; }}")
    except sync_api.TimeoutError:
        page.screenshot(path=str(ARTIFACTS / "trajectory_view_failed.png"))
        pytest.fail("the trajectory view did not receive its frames:\n" + page.inner_text(".jp-Notebook")[-3000:])


def _pixels(png: bytes) -> np.ndarray:
    """``[H, W, 3]`` uint8 of a screenshot."""
    from PIL import Image  # Pillow comes with matplotlib, a core dependency; only this test reads PNGs

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels that differ by more than 8 grey levels in some channel."""
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 8))


def _check_mesh_is_drawn(shot: np.ndarray) -> None:
    """A shaded surface: a good part of the canvas off the background, in many grey levels."""
    off = np.abs(shot.astype(np.int16) - np.array(BACKGROUND_RGB)).max(axis=2) > 6
    assert off.mean() > 0.03, f"only {off.mean():.1%} of the canvas shows the mesh"
    luminance = (shot[off] @ np.array([0.299, 0.587, 0.114])).round().astype(int)
    assert np.unique(luminance).size > 20, "the surface is flat: Lambert shading gives many grey levels"


def _frames_seen_while_playing(page, canvas, seconds: float) -> set:
    """Frames the canvas drew while playing (its data-frame attribute, polled)."""
    seen, deadline = set(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(canvas.get_attribute("data-frame"))
        page.wait_for_timeout(60)
    return seen


def test_trajectory_view_plays_and_exports(sync_api, jupyterlab):
    url, out_dir = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            _run_notebook(page, sync_api, url)
            root, canvas = page.locator(".ctv-root"), page.locator("canvas.cfm-canvas")
            if root.get_attribute("data-webgl") == "none":
                pytest.skip("headless Chromium offers no WebGL here (SwiftShader missing)")
            assert canvas.get_attribute("data-frame") == "0"
            first = _pixels(canvas.screenshot())
            _check_mesh_is_drawn(first)

            page.locator("button.ctv-play").click()
            seen = _frames_seen_while_playing(page, canvas, seconds=2.5)  # 4 fps: ~10 frames
            page.locator("button.ctv-play").click()
            assert len(seen - {"-1"}) >= 3, f"playing showed only frames {sorted(seen)}"

            page.locator("input.ctv-frame").fill(str(N_FRAMES - 1))
            page.wait_for_function(f"() => document.querySelector('canvas.cfm-canvas').dataset.frame === '{N_FRAMES - 1}'")
            last = _pixels(canvas.screenshot())
            _check_mesh_is_drawn(last)
            assert _changed_fraction(first, last) > 0.005, "the last frame looks like the first"

            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 30, steps=5)
            page.mouse.up()
            assert _changed_fraction(last, _pixels(canvas.screenshot())) > 0.005, "dragging did not rotate"

            page.locator("button.ctv-export").click()
            page.wait_for_function("() => document.querySelector('.ctv-status').textContent.includes('exported')")
            written = sorted(p.name for p in (out_dir / "trajectory_clusters_0_2_straight").iterdir())
            assert written == sorted([f"vol_{i:03d}.mrc" for i in range(N_FRAMES)]
                                     + ["z_path.txt", "open_series.cxc", "movie.gif"]
                                     + (["movie.mp4"] if "movie.mp4" in written else []))
            assert page.locator(".ctv-error").count() == 0
            shot = ARTIFACTS / "trajectory_view.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        finally:
            browser.close()
