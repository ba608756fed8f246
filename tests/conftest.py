"""Shared fixtures and marker handling for the test suite."""

from __future__ import annotations

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests visibly when no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def single_thread():
    """Run a test on one torch thread, restoring the count afterwards.

    Tiny tensors are dominated by OpenMP synchronisation: on a loaded 2-core machine one
    thread is both faster and steadier than two.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    """A seeded numpy generator, so failures reproduce."""
    return np.random.default_rng(1234)
