"""What several benchmarks share: a command timed under GNU ``time -v`` (wall time and the peak
resident memory of the whole process), and the simulated hinged set they train on."""

from __future__ import annotations

import os
import re
import subprocess
import time

from machine import CFORMER


def peak_rss_gb(report: str) -> float:
    """Peak resident memory (GB) from GNU time's report in ``report``; NaN without one."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return int(m.group(1)) / 1e6 if m else float("nan")


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` → wall time (s), peak resident memory (GB), stdout.

    Raises RuntimeError when the command fails or GNU time gave no report."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd[1]} failed ({proc.returncode}): {proc.stderr[-800:]}")
    rss = peak_rss_gb(proc.stderr)
    if rss != rss:
        raise RuntimeError(f"{cmd[1]}: no peak memory in GNU time's report")
    return {"wall_s": wall, "peak_rss_gb": rss, "stdout": proc.stdout}


def simulate_hinged(data: str, box: int, n: int) -> str:
    """The hinged molecule at ``box`` px (3 Å/px at 64, the same physical box at any ``box``),
    SNR 0.1, shifts ±2 px, seed 0, into ``data`` unless it is already there."""
    if not os.path.isfile(os.path.join(data, "simulation.json")):
        subprocess.run([CFORMER, "simulate", "-o", data, "-n", str(n), "-D", str(box), "--Apix",
                        f"{3.0 * 64 / box:g}", "--snr", "0.1", "--shift-range", "2", "--seed", "0"], check=True)
    return data
