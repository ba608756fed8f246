"""Does ``train --max-minutes`` hold as the whole run's wall time? (docs/benchmarks.md)

Simulates ``-n`` particles of the embedded molecule once (cached in ``--data``), then runs
``cryoformer train`` with a time budget as a user would (a subprocess, output to a file as in a
batch job) for each budget given, and reports the wall time of the whole command beside the
budget, with the passes ``RUN/run.log`` records after the stop (latents, held-out) and their
durations.

    python bench/bench_budget.py -n 20000 -D 32 --minutes 0.4 1 --out bench_out/budget
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402

PASS = re.compile(r"pass (latents|held-out) \(epoch \d+\): .* in ([\d.]+) s$")


def simulate(data: str, n: int, box: int) -> None:
    if os.path.isfile(os.path.join(data, "particles.star")):
        return
    subprocess.run([sys.executable, "-m", "cryoformer", "simulate", "-o", data, "-n", str(n), "-D", str(box),
                    "--Apix", str(192.0 / box), "--snr", "0.1", "--seed", "3"], check=True)


def one_budget(data: str, run: str, minutes: float) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    argv = [sys.executable, "-m", "cryoformer", "train", os.path.join(data, "particles.star"), "-o", run,
            "-n", "50", "--max-minutes", str(minutes)]
    t0 = time.monotonic()
    with open(run + ".out", "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    with open(os.path.join(run, "run.log"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    passes = {m.group(1): float(m.group(2)) for m in (PASS.search(line) for line in lines) if m}
    end = [line for line in lines if " end: " in line]
    return {"budget_s": 60 * minutes, "wall_s": round(wall, 1), "exit": proc.returncode,
            "latents_s": passes.get("latents"), "heldout_s": passes.get("held-out"),
            "end": end[-1].split(" end: ", 1)[1] if end else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20000, help="particles (default 20000)")
    p.add_argument("-D", type=int, default=32, help="box (default 32)")
    p.add_argument("--minutes", type=float, nargs="+", default=[0.4, 1.0], help="budgets to run")
    p.add_argument("--out", default="bench_out/budget", help="work folder")
    args = p.parse_args()
    data = os.path.join(args.out, f"data_{args.n}_{args.D}")
    simulate(data, args.n, args.D)
    rows = [one_budget(data, os.path.join(args.out, f"run_{m:g}"), m) for m in args.minutes]
    print(json.dumps({"machine": machine.describe(), "particles": args.n, "box": args.D}, default=str))
    print("| budget (s) | whole command (s) | latent pass (s) | held-out pass (s) | end |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_s']:.0f} | {r['wall_s']:.1f} | {r['latents_s']} | {r['heldout_s']} | {r['end']} |")


if __name__ == "__main__":
    main()
