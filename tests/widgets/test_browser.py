"""End to end in a real browser: JupyterLab + headless Chromium (Playwright), no browser download.

A small notebook that shows a ``LatentExplorer`` of the test run is opened in JupyterLab; the
test runs it, clicks a cluster centre on the explorer's canvas and checks that the slice image
of the decoded volume changed. It then builds a trajectory between two clusters from the
explorer's controls, plays it in the volume panel's 3D (WebGL) view and measures from
screenshots that the mesh is drawn and changes between frames, checks that the path is drawn on
the scatter, and exports the series. A second notebook shows 500 000 particles (a synthetic latent set
decoded by the test run's model, with a defocus per particle): the wheel zooms, a pan moves the
view, a lasso drawn after zooming selects exactly the particles inside it (counted over all
500 000 with an independent points-in-polygon), and colouring by defocus shows a colour bar and
a colour ramp on the canvas. Screenshots and the measured redraw time are kept in
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
from PIL import Image

from cryoformer.analysis.latent_space import pca
from test_explorer_scale import N as N_BIG, big_latents, ctf_for, ray_casting

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
# SwiftShader: WebGL on the CPU (the explorer's 3D view), as on CI machines without a GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"]
N_FRAMES = 5                   # maps of the trajectory built in the explorer
MESH_BACKGROUND_RGB = (32, 32, 32)  # mesh_view.js clears to 0.125 grey

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(run_dir: str, out_dir: str) -> dict:
    source = ("from cryoformer_widgets import LatentExplorer\n"
              f"ex = LatentExplorer({run_dir!r}, k=3, output_dir={out_dir!r})\n"
              "ex")
    return _one_cell(source)


def _big_notebook(run_dir: str, data: str, out_dir: str) -> dict:
    """A 500 000-particle latent set with its defocus, decoded by the run's model."""
    source = ("import numpy as np\n"
              "from cryoformer_widgets import LatentExplorer, RunSession\n"
              "from cryoformer_widgets.particle_values import ParticleMetadata\n"
              f"data = np.load({data!r})\n"
              f"session = RunSession.from_latents({run_dir!r}, data['latents'], kmeans_labels=data['labels'],\n"
              "                                  metadata=ParticleMetadata(ctf=data['ctf']))\n"
              f"ex = LatentExplorer(session, output_dir={out_dir!r})\n"
              "ex")
    return _one_cell(source)


def _one_cell(source: str) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": "explorer", "metadata": {}, "execution_count": None,
                       "outputs": [], "source": source}]}


@pytest.fixture
def sync_api():
    """Playwright's sync API, skipping visibly without Chromium or Playwright."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture
def jupyterlab(sync_api, spread_run, tmp_path):
    """A JupyterLab server on a free port, serving a notebook that shows the explorer."""
    yield from _serve_lab(tmp_path, _notebook(spread_run, str(tmp_path / "out")))


@pytest.fixture
def jupyterlab_big(sync_api, spread_run, tmp_path):
    """A JupyterLab server serving a notebook that shows 500 000 particles; yields (url, data path)."""
    z, labels, defocus = big_latents()
    data = tmp_path / "big.npz"
    np.savez(data, latents=z, labels=labels, ctf=ctf_for(defocus))
    for url in _serve_lab(tmp_path, _big_notebook(spread_run, str(data), str(tmp_path / "out"))):
        yield url, data


def _serve_lab(tmp_path, notebook: dict, name: str = "explorer.ipynb"):
    """Start JupyterLab on ``notebook`` (saved as ``name``), yield its URL, stop it."""
    pytest.importorskip("jupyterlab")
    pytest.importorskip("anywidget")
    root = tmp_path / "lab"
    root.mkdir()
    (root / name).write_text(json.dumps(notebook))
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
        yield f"http://127.0.0.1:{port}/lab/tree/{name}?token={token}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


EXPLORER_READY = ("() => { const i = document.querySelector('img.cfx-slices');"
                  " return i && i.complete && i.naturalWidth > 0; }")


def _run_notebook(page, sync_api, url: str, ready: str = EXPLORER_READY, what: str = "latent_explorer") -> None:
    """Open the notebook, wait for its kernel, run it and wait until ``ready`` (a JS predicate;
    default: the explorer shows its first volume); on a time-out keep ``<what>_failed.png``."""
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
        page.wait_for_function(ready)
    except sync_api.TimeoutError:
        page.screenshot(path=str(ARTIFACTS / f"{what}_failed.png"))
        pytest.fail(f"{what}: the notebook's widget did not get ready:\n" + page.inner_text(".jp-Notebook")[-3000:])


def _check_click_on_centre(page, canvas, title, cluster: int) -> None:
    """Clicking cluster ``cluster``'s centre decodes and shows that particle's volume."""
    before = page.locator("img.cfx-slices").screenshot()
    centres = json.loads(canvas.get_attribute("data-centers"))
    target = next(c for c in centres if c["cluster"] == cluster)
    canvas.click(position={"x": target["x"], "y": target["y"]})
    page.wait_for_function(
        f"() => document.querySelector('.cfx-title').textContent.includes('cluster {cluster}')")
    page.wait_for_function(  # the new image has loaded
        "() => { const i = document.querySelector('img.cfx-slices');"
        " return i.complete && i.naturalWidth > 0; }")
    page.wait_for_timeout(300)
    after = page.locator("img.cfx-slices").screenshot()
    assert title.inner_text().startswith(f"particle {target['row']} ")
    assert after != before, "the slice image did not change after clicking a cluster centre"


def _check_box_selects_all(page, canvas, n: int) -> None:
    """A box drag over the whole plot selects every one of the ``n`` particles (counted in Python)."""
    page.locator("button.cfx-mode", has_text="box").click()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=4)
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=4)
    page.mouse.up()
    page.wait_for_function(f"() => document.querySelector('.cfx-nsel').textContent.startsWith('{n} selected')")


def _mesh_pixels(locator) -> np.ndarray:
    """``[H, W, 3]`` uint8 screenshot of the 3D view's canvas."""
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"))


def _check_mesh_is_drawn(shot: np.ndarray, min_fraction: float = 0.02, min_levels: int = 10) -> None:
    """A shaded surface: part of the canvas off the background, in many grey levels."""
    off = np.abs(shot.astype(np.int16) - np.array(MESH_BACKGROUND_RGB)).max(axis=2) > 6
    assert off.mean() > min_fraction, f"only {off.mean():.1%} of the 3D view shows the mesh"
    luminance = (shot[off] @ np.array([0.299, 0.587, 0.114])).round().astype(int)
    assert np.unique(luminance).size > min_levels, "the surface is flat: Lambert shading gives many grey levels"


def _frames_seen_while_playing(page, canvas, seconds: float) -> set:
    """Frames the 3D canvas drew while playing (its data-frame attribute, polled)."""
    seen, deadline = set(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(canvas.get_attribute("data-frame"))
        page.wait_for_timeout(60)
    return seen


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels that differ by more than 8 grey levels in some channel."""
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 8))


def _check_trajectory(page, scatter, out_dir: Path) -> None:
    """Build a trajectory between clusters 0 and 2 from the explorer's controls, play it in the
    3D view, step to its last frame, export it."""
    root, gl = page.locator(".cfx-root"), page.locator(".cfx-mesh canvas.cfm-canvas")
    if root.get_attribute("data-webgl") == "none":
        pytest.skip("headless Chromium offers no WebGL here (SwiftShader missing): the 3D view is off")
    page.locator("button.cfx-v3d").click()
    # a lower surface level than the 3 σ set above: the 16³ maps of the test run give larger surfaces
    page.locator(".cfx-root input[type=range]").first.fill("1")
    page.wait_for_function("() => document.querySelector('.cfx-value').textContent.startsWith('1.0')")
    page.locator("select.cfx-traj-start").select_option("0")
    page.locator("select.cfx-traj-end").select_option("2")
    page.locator("input.cfx-traj-n").fill(str(N_FRAMES))
    page.locator("button.cfx-traj-build").click()
    page.wait_for_function(f"() => document.querySelector('.cfx-root').dataset.trajReceived === '{N_FRAMES}'")
    assert "s/map" in page.locator(".cfx-traj-status").inner_text()   # decoding time is shown
    assert scatter.get_attribute("data-trajectory") == str(N_FRAMES)  # the path on the scatter
    page.wait_for_function("() => document.querySelector('.cfx-mesh canvas').dataset.frame === '0'")
    first = _mesh_pixels(gl)
    Image.fromarray(first).save(ARTIFACTS / "explorer_trajectory_first_frame.png")
    _check_mesh_is_drawn(first)
    page.locator("button.cfx-traj-play").click()
    seen = _frames_seen_while_playing(page, gl, seconds=2.5)          # 5 fps: ~12 frames
    page.locator("button.cfx-traj-play").click()
    assert len(seen - {"-1", "volume"}) >= 3, f"playing showed only frames {sorted(seen)}"
    page.locator("input.cfx-traj-frame").fill(str(N_FRAMES - 1))
    page.wait_for_function(f"() => document.querySelector('.cfx-mesh canvas').dataset.frame === '{N_FRAMES - 1}'")
    last = _mesh_pixels(gl)
    _check_mesh_is_drawn(last)
    changed = _changed_fraction(first, last)
    assert changed > 0.005, "the trajectory's last map looks like its first"
    page.locator("button.cfx-traj-export").click()
    page.wait_for_function("() => document.querySelector('.cfx-traj-status').textContent.includes('exported')")
    written = sorted(p.name for p in (out_dir / "trajectory_clusters_0_2_straight").iterdir())
    assert written == sorted([f"vol_{i:03d}.mrc" for i in range(N_FRAMES)] + ["z_path.txt", "open_series.cxc", "movie.gif"]
                             + (["movie.mp4"] if "movie.mp4" in written else []))


def test_click_in_explorer_changes_the_volume(sync_api, jupyterlab, spread_run, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _run_notebook(page, sync_api, jupyterlab)
            canvas = page.locator("canvas.cfx-scatter")
            title = page.locator(".cfx-title")
            assert "cluster 0" in title.inner_text()
            _check_click_on_centre(page, canvas, title, cluster=2)

            # the threshold slider re-renders the isosurface (the ray-cast image; the 3D view is the default)
            page.locator("button.cfx-vimg").click()
            iso_before = page.locator("img.cfx-iso").screenshot()
            page.locator(".cfx-root input[type=range]").first.fill("3")
            page.wait_for_function("() => document.querySelector('.cfx-value').textContent.startsWith('3.0')")
            page.wait_for_timeout(1500)  # throttled sync, render in the kernel, image reload
            assert page.locator("img.cfx-iso").screenshot() != iso_before

            _check_box_selects_all(page, canvas, len(np.load(Path(spread_run) / "particle_indices.npy")))
            assert page.locator(".cfx-error").count() == 0
            shot = ARTIFACTS / "latent_explorer.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            t0 = time.monotonic()
            _check_trajectory(page, canvas, tmp_path / "out")
            assert page.locator(".cfx-error").count() == 0
            page.screenshot(path=str(ARTIFACTS / "latent_explorer_trajectory.png"), full_page=True)
            print(f"trajectory built, played and exported in the browser in {time.monotonic() - t0:.1f} s")
        finally:
            browser.close()


def _zoom_and_time(page, canvas) -> dict:
    """One wheel step (zoom in) over the plot, timed in the page: the handler redraws at once."""
    return page.evaluate(
        """(c) => { const r = c.getBoundingClientRect();
        const ev = new WheelEvent('wheel', { deltaY: -240, clientX: r.left + 200, clientY: r.top + 180,
                                            bubbles: true, cancelable: true });
        const before = JSON.parse(c.dataset.view); const t0 = performance.now();
        c.dispatchEvent(ev);
        return { ms: performance.now() - t0, drawMs: Number(c.dataset.drawMs), before,
                 after: JSON.parse(c.dataset.view) }; }""", canvas.element_handle())


def _lasso(page, canvas) -> list:
    """Draw a pentagon lasso over the plot; returns the polygon the front end sent (data units)."""
    page.locator("button.cfx-mode", has_text="lasso").click()
    box = canvas.bounding_box()
    corners = [(80, 60), (330, 90), (360, 300), (200, 360), (60, 250)]  # CSS px inside the plot
    page.mouse.move(box["x"] + corners[0][0], box["y"] + corners[0][1])
    page.mouse.down()
    for x, y in corners[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=3)
    page.mouse.up()
    return json.loads(canvas.get_attribute("data-last-polygon"))


def _hue_bins(png: bytes) -> int:
    """Distinct coarse colours among the saturated pixels of a screenshot (the scatter's colours)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    vivid = rgb[(rgb.max(1) - rgb.min(1)) > 60]
    return len({tuple(c // 40) for c in vivid})


def test_500k_particles_zoom_lasso_and_colour_by_defocus(sync_api, jupyterlab_big):
    url, data = jupyterlab_big
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _run_notebook(page, sync_api, url)
            canvas = page.locator("canvas.cfx-scatter")
            assert canvas.get_attribute("data-n-drawn") == str(N_BIG)
            ticks = canvas.get_attribute("data-ticks")
            timing = _zoom_and_time(page, canvas)
            (b0, b1), (a0, a1) = timing["before"][:2], timing["after"][:2]
            assert 0 < a1 - a0 < 0.8 * (b1 - b0), timing  # zoomed in
            assert timing["ms"] < 1000, f"a redraw of 500 000 points took {timing['ms']:.0f} ms"
            assert canvas.get_attribute("data-ticks") != ticks  # the axes follow the zoom
            page.locator("button.cfx-mode", has_text="pan").click()
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + 200, box["y"] + 200)
            page.mouse.down()
            page.mouse.move(box["x"] + 260, box["y"] + 200, steps=3)
            page.mouse.up()
            panned = json.loads(canvas.get_attribute("data-view"))
            assert panned[0] < a0 and panned[1] - panned[0] == pytest.approx(a1 - a0)
            polygon = _lasso(page, canvas)  # after zoom and pan: the polygon must be in data units
            z = np.load(data)["latents"]
            xy = _pcs(z)
            want = ray_casting(xy, polygon).size
            page.wait_for_function(
                f"() => document.querySelector('.cfx-nsel').textContent.startsWith('{want} selected')")
            assert 1000 < want < N_BIG
            page.locator("button.cfx-reset").click()
            page.locator("select.cfx-color").select_option("defocus_angstrom")
            page.wait_for_function("() => document.querySelector('.cfx-cbar-name')"
                                   " && document.querySelector('.cfx-cbar-name').textContent === 'defocus_angstrom'")
            page.locator("button", has_text="clear").first.click()
            page.wait_for_function("() => document.querySelector('.cfx-nsel').textContent.startsWith('0 selected')")
            page.wait_for_timeout(300)
            assert page.locator(".cfx-colorbar").is_visible()
            hues = _hue_bins(canvas.screenshot())
            assert hues > 6, f"colouring by defocus shows {hues} colours on the canvas"
            assert page.locator(".cfx-error").count() == 0
            page.screenshot(path=str(ARTIFACTS / "latent_explorer_500k.png"), full_page=True)
            (ARTIFACTS / "latent_explorer_500k.json").write_text(json.dumps(
                {"particles": N_BIG, "zoom_redraw_ms": timing["ms"], "draw_ms": timing["drawMs"],
                 "lasso_selected": want, "canvas_colours": hues}, indent=1))
            print(f"500 000 points: zoom + redraw {timing['ms']:.0f} ms (raster {timing['drawMs']:.0f} ms)")
        finally:
            browser.close()


def _pcs(z: np.ndarray) -> np.ndarray:
    """PC1, PC2 of ``z`` as the session computes them (the explorer's first axes)."""
    return pca(z).projections[:, :2]


# ---------------------------------------------------------------------- the standalone player
TV_FRAMES = 6


@pytest.fixture
def jupyterlab_trajectory(sync_api, spread_run, tmp_path):
    """JupyterLab serving a notebook that shows a TrajectoryView between clusters 0 and 2;
    yields (url, output folder)."""
    pytest.importorskip("skimage", reason="the meshes need scikit-image (pip install scikit-image)")
    out = tmp_path / "out"
    source = ("from cryoformer_widgets import TrajectoryView\n"
              f"tv = TrajectoryView({spread_run!r}, clusters=(0, 2), n_frames={TV_FRAMES}, k=3, fps=4,\n"
              f"                    output_dir={str(out)!r})\n"
              "tv")
    for url in _serve_lab(tmp_path, _one_cell(source), name="trajectory.ipynb"):
        yield url, out


def test_trajectory_view_plays_and_exports(sync_api, jupyterlab_trajectory):
    """The player on its own: the mesh is drawn and shaded, playing shows several frames, the
    last differs from the first, dragging rotates, and export writes what ``traverse`` writes."""
    url, out_dir = jupyterlab_trajectory
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            ready = (f"() => {{ const r = document.querySelector('.ctv-root');"
                     f" return r && r.dataset.received === '{TV_FRAMES}'; }}")
            _run_notebook(page, sync_api, url, ready=ready, what="trajectory_view")
            root, canvas = page.locator(".ctv-root"), page.locator("canvas.cfm-canvas")
            if root.get_attribute("data-webgl") == "none":
                pytest.skip("headless Chromium offers no WebGL here (SwiftShader missing)")
            assert canvas.get_attribute("data-frame") == "0"
            first = _mesh_pixels(canvas)
            _check_mesh_is_drawn(first, min_fraction=0.03, min_levels=20)

            page.locator("button.ctv-play").click()
            seen = _frames_seen_while_playing(page, canvas, seconds=2.5)  # 4 fps: ~10 frames
            page.locator("button.ctv-play").click()
            assert len(seen - {"-1"}) >= 3, f"playing showed only frames {sorted(seen)}"

            page.locator("input.ctv-frame").fill(str(TV_FRAMES - 1))
            page.wait_for_function(
                f"() => document.querySelector('canvas.cfm-canvas').dataset.frame === '{TV_FRAMES - 1}'")
            last = _mesh_pixels(canvas)
            _check_mesh_is_drawn(last, min_fraction=0.03, min_levels=20)
            assert _changed_fraction(first, last) > 0.005, "the last frame looks like the first"

            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 30, steps=5)
            page.mouse.up()
            assert _changed_fraction(last, _mesh_pixels(canvas)) > 0.005, "dragging did not rotate"

            page.locator("button.ctv-export").click()
            page.wait_for_function("() => document.querySelector('.ctv-status').textContent.includes('exported')")
            written = sorted(p.name for p in (out_dir / "trajectory_clusters_0_2_straight").iterdir())
            assert written == sorted([f"vol_{i:03d}.mrc" for i in range(TV_FRAMES)]
                                     + ["z_path.txt", "open_series.cxc", "movie.gif"]
                                     + (["movie.mp4"] if "movie.mp4" in written else []))
            assert page.locator(".ctv-error").count() == 0
            page.screenshot(path=str(ARTIFACTS / "trajectory_view.png"), full_page=True)
        finally:
            browser.close()
