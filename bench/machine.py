"""Facts about the machine a benchmark ran on, for every result row (docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import sys

# The `cryoformer` command of the environment running the benchmark.
CFORMER = os.path.join(os.path.dirname(sys.executable), "cryoformer")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform string)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model, usable cores, GPU (if any) and library versions."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import cryoformer

        info["cryoformer"] = cryoformer.__version__
    except ImportError:
        pass
    return info


def one_line() -> str:
    d = describe()
    dev = d["gpu"] or f"{d['cpu']}, {d['cores']} cores"
    return f"{dev}; torch {d['torch']}"
