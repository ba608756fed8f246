"""The GPU acceptance script's CPU dry run: every step it takes on a GPU runs here, tiny."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import gpu_acceptance  # noqa: E402


def test_gpu_acceptance_dry_run_on_cpu(tmp_path):
    rc = gpu_acceptance.main(["-o", str(tmp_path), "--device", "cpu", "--tiny", "--no-cryodrgn"])
    result = json.loads((tmp_path / "acceptance.json").read_text())
    steps = result["steps"]
    assert rc == 0, {k: v for k, v in steps.items() if v["status"] == "failed"}
    assert steps["environment"]["status"] == "ok" and steps["environment"]["machine"]["cpu"]
    # the gpu-marked tests were collected and skipped visibly, not deselected to nothing
    tests = steps["gpu tests"]
    assert tests["status"] == "ok" and tests["returncode"] == 0 and "skipped" in tests["summary"]
    for box in (16, 24):
        assert steps[f"data D={box}"]["status"] == "ok"
        assert steps[f"cryoformer D={box}"]["images_per_s"] > 0 and steps[f"cryoformer D={box}"]["epochs"] == 2
        # no cryoDRGN here: skipped with its reason, never reported as a number
        for arch in ("default", "small"):
            s = steps[f"cryodrgn-{arch} D={box}"]
            assert s["status"] == "skipped" and s["reason"] == "--no-cryodrgn"
    assert steps["decode 16³"]["median_s"] > 0
    table = (tmp_path / "acceptance.md").read_text()
    assert "| cryoformer D=16 |" in table and "(cpu)" in table


def test_gpu_acceptance_reports_a_failed_step(tmp_path):
    """A step that fails is in the table as failed and makes the exit status 1."""
    rc = gpu_acceptance.main(["-o", str(tmp_path), "--device", "cpu", "--tiny", "--skip-tests",
                              "--boxes", "16", "--cryodrgn", str(tmp_path / "no-such-cryodrgn")])
    steps = json.loads((tmp_path / "acceptance.json").read_text())["steps"]
    assert rc == 1
    assert steps["cryodrgn-default D=16"]["status"] == "failed"
    assert steps["gpu tests"]["status"] == "skipped"


@pytest.mark.parametrize("argv", [["--device", "cuda"]])
def test_gpu_acceptance_refuses_cuda_without_a_gpu(tmp_path, argv):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc = gpu_acceptance.main(["-o", str(tmp_path), "--tiny", "--skip-tests", "--boxes", "16", *argv])
    steps = json.loads((tmp_path / "acceptance.json").read_text())["steps"]
    assert rc == 1 and steps["environment"]["status"] == "failed"
    assert list(steps) == ["environment"]  # nothing else was tried on a device that is not there
