"""End to end in a real browser: JupyterLab + headless Chromium (Playwright), no browser download.

A small notebook that shows a ``LatentExplorer`` of the test run is opened in JupyterLab; the
test runs it, clicks a cluster centre on the explorer's canvas and checks that the slice image
of the decoded volume changed. A screenshot is kept in ``test-artifacts/browser/``.
"""

from __future__ import annotations

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
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(run_dir: str, out_dir: str) -> dict:
    source = ("from cryoformer_widgets import LatentExplorer\n"
              f"ex = LatentExplorer({run_dir!r}, k=3, output_dir={out_dir!r})\n"
              "ex")
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
    pytest.importorskip("jupyterlab")
    pytest.importorskip("anywidget")
    root = tmp_path / "lab"
    root.mkdir()
    (root / "explorer.ipynb").write_text(json.dumps(_notebook(spread_run, str(tmp_path / "out"))))
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
        yield f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?token={token}"
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
    """Open the notebook, wait for its kernel, run it and wait for the explorer's first volume."""
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
            "() => { const i = document.querySelector('img.cfx-slices');"
            " return i && i.complete && i.naturalWidth > 0; }")
    except sync_api.TimeoutError:
        page.screenshot(path=str(ARTIFACTS / "latent_explorer_failed.png"))
        pytest.fail("the explorer did not show a volume:\n" + page.inner_text(".jp-Notebook")[-3000:])


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


def test_click_in_explorer_changes_the_volume(sync_api, jupyterlab, spread_run):
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

            # the threshold slider re-renders the isosurface
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
        finally:
            browser.close()
