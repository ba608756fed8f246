"""Both distributions build as wheels, and the core installs headless.

``pip install cryoformer`` on a CPU machine must bring no GUI toolkit, browser driver or GPU
compiler (no Qt, napari, Jupyter, Playwright, Triton, CUDA libraries): those belong to the
widgets' ``jupyter`` / ``napari`` / ``test`` extras and to the core's ``dev`` extra. The wheels
are built from a copy of the sources (``python -m build --no-isolation``, so no network is needed
to build), the core is installed into a new virtual environment with the CPU torch this machine
uses, and its command-line tool runs from there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Distributions a headless core install must not pull in (lower-case, as pip lists them).
GUI_OR_GPU = re.compile(r"^(pyqt\d?|pyside\d?|qtpy|napari.*|jupyter.*|ipywidgets|anywidget|playwright|"
                        r"triton|nvidia-.*|pytest-qt)$")

pytestmark = pytest.mark.slow


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "cryoformer", dest / "cryoformer", ignore=ignore)
    (dest / "widgets").mkdir()
    shutil.copy2(ROOT / "widgets" / "pyproject.toml", dest / "widgets" / "pyproject.toml")
    shutil.copytree(ROOT / "widgets" / "cryoformer_widgets", dest / "widgets" / "cryoformer_widgets", ignore=ignore)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, **kw)


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    pytest.importorskip("build", reason="the 'build' package (dev extra) builds the wheels")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _copy_sources(src)
    for project in (src, src / "widgets"):
        proc = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, project])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    core = sorted(dist.glob("cryoformer-*.whl"))
    widgets = sorted(dist.glob("cryoformer_widgets-*.whl"))
    assert len(core) == 1 and len(widgets) == 1, sorted(p.name for p in dist.iterdir())
    return core[0], widgets[0]


def test_wheels_declare_gui_and_test_tools_only_as_extras(wheels):
    core, widgets = wheels
    for wheel in (core, widgets):
        unconditional = [_name(r) for r in _requirements(wheel) if "extra ==" not in r]
        assert not [n for n in unconditional if GUI_OR_GPU.match(n)], (wheel.name, unconditional)
    extras = {_name(r): re.search(r'extra == "(\w+)"', r).group(1) for r in _requirements(widgets) if "extra ==" in r}
    assert extras["napari"] == "napari" and extras["playwright"] == "test"
    assert extras["anywidget"] == "jupyter" and extras["ipywidgets"] == "jupyter"
    with zipfile.ZipFile(core) as zf:  # the notebook `analyze` copies into its folder
        assert "cryoformer/notebooks/your_data.ipynb" in zf.namelist()
    with zipfile.ZipFile(widgets) as zf:  # the plugin manifest and the front end travel with it
        names = zf.namelist()
    assert "cryoformer_widgets/napari.yaml" in names
    assert any(n.startswith("cryoformer_widgets/static/") and n.endswith(".js") for n in names)


def test_core_wheel_installs_headless_and_its_cli_runs(wheels, tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("checks a CPU machine's install; this torch is a CUDA build")
    core, widgets = wheels
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    py, cli = venv / "bin" / "python", venv / "bin" / "cryoformer"
    torch_pin = "torch==" + torch.__version__.split("+")[0]  # the CPU build this machine has
    proc = _run([py, "-m", "pip", "install", "-q", torch_pin, core], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the widgets without their extras: the GUI-free session must import without Jupyter or napari
    proc = _run([py, "-m", "pip", "install", "-q", "--no-deps", widgets], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = _run([py, "-m", "pip", "list", "--format=freeze"]).stdout
    installed = [line.split("==")[0].lower() for line in listed.splitlines() if "==" in line]
    assert "cryoformer" in installed and "torch" in installed
    assert not [n for n in installed if GUI_OR_GPU.match(n)], installed
    out = tmp_path / "sim"
    proc = _run([cli, "simulate", "-o", out, "-n", "8", "-D", "16", "--Apix", "6", "--n-states", "2"],
                cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "particles.mrcs").is_file() and (out / "particles.star").is_file()
    proc = _run([py, "-c", "import cryoformer_widgets, cryoformer_widgets.session, sys; "
                 "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'ipywidgets', 'anywidget', 'PyQt6')]; "
                 "print(bad); sys.exit(1 if bad else 0)"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
