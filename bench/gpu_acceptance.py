"""The GPU acceptance check: one command for the first GPU this project is lent (docs/benchmarks.md).

On one NVIDIA GPU with PyTorch (and Triton) installed and no network, in a few minutes:

1. **environment** — CPU, GPU name and capability, torch / Triton / CUDA versions;
2. **gpu tests** — the ``gpu``-marked tests (Triton hash-grid kernel against torch, the pose
   search on CUDA against the CPU, a bf16-autocast training step against fp32, a 128³ decode on
   CUDA against the CPU), run by pytest in a subprocess;
3. **data** — the embedded hinged molecule simulated at each ``--boxes`` size (``cryoformer
   simulate``, SNR 0.1, CTF), ``--n-images`` particles;
4. **cryoformer** — ``cryoformer train`` for ``--epochs`` epochs at each box on the device
   (bf16 autocast on CUDA, the default), images/s of the last epoch (``RUN/log.csv``);
5. **cryodrgn** — ``cryodrgn train_vae`` one epoch at each box, default (3×1024) and small
   (3×256) architectures, ``--amp`` on CUDA, images/s from its epoch time; skipped, with the
   reason, when no ``cryodrgn`` executable is found (``--cryodrgn``, or on ``PATH``);
6. **decode** — the 128³ decode of the trained model (``--decode-box``), median of 5 after a
   warm-up, synchronised.

Writes ``OUT/acceptance.json`` (every step: status ``ok`` / ``skipped`` / ``failed``, its
numbers or its reason, its seconds) and ``OUT/acceptance.md`` (one table, the device named on
every row). Exit status 0 when no step failed.

    python bench/gpu_acceptance.py -o gpu_out                       # on the GPU machine
    python bench/gpu_acceptance.py -o /tmp/dry --device cpu --tiny  # the CPU dry run CI runs

``--tiny`` shrinks every size (boxes 16 and 24, 24 images, 2 epochs, decode at 16³) so that
every code path the real run calls is exercised in under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import pandas as pd
import torch

from cryoformer.cli import main as cli
from cryoformer.trainer import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import machine  # noqa: E402

SMALL_DRGN = ["--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3"]
GPU_TEST_FILES = ["tests/test_hash_grid.py", "tests/test_pose_search.py", "tests/test_gpu.py"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--outdir", required=True, help="results and scratch data go here")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to train and decode")
    ap.add_argument("--tiny", action="store_true", help="the CPU dry run: every size shrunk")
    ap.add_argument("--boxes", type=int, nargs="+", default=None, help="training boxes (default 128 256)")
    ap.add_argument("--n-images", type=int, default=None, help="particles per box (default 256)")
    ap.add_argument("--epochs", type=int, default=None, help="cryoformer epochs per box (default 3)")
    ap.add_argument("--decode-box", type=int, default=None, help="decode edge in voxels (default 128)")
    ap.add_argument("--cryodrgn", default=None, help="the cryodrgn executable (default: from PATH)")
    ap.add_argument("--no-cryodrgn", action="store_true", help="leave out the cryoDRGN steps")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the pytest step")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.boxes = args.boxes or ([16, 24] if tiny else [128, 256])
    args.n_images = args.n_images or (24 if tiny else 256)
    args.epochs = args.epochs or (2 if tiny else 3)
    args.decode_box = args.decode_box or (16 if tiny else 128)
    return args


def step(results: dict, name: str, fn: Callable[[], dict]) -> Optional[dict]:
    """Run one step, record its status, numbers and seconds; a failure is recorded, not raised."""
    t0 = time.monotonic()
    try:
        out = fn()
        status = out.pop("status", "ok")
    except Exception as exc:  # noqa: BLE001 — the run goes on; the failure is in the table
        out, status = {"error": f"{type(exc).__name__}: {exc}"}, "failed"
    results["steps"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 2), **out}
    print(f"[{status}] {name}: {json.dumps(out)[:300]}", flush=True)
    return out if status == "ok" else None


def environment(device: str) -> dict:
    info = {"machine": machine.describe(), "device": device}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["cuda"] = torch.version.cuda
    try:
        import triton  # optional: the hash grid's GPU kernel

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def gpu_tests() -> dict:
    """pytest -m gpu over the files that hold the GPU tests; on a CPU they skip (visibly)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
           "-o", "addopts=", *GPU_TEST_FILES]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    out = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary}
    if proc.returncode != 0:
        raise RuntimeError(f"gpu tests failed: {summary}")
    return out


def simulate(outdir: str, box: int, n: int) -> str:
    data = os.path.join(outdir, f"data_D{box}")
    if not os.path.isfile(os.path.join(data, "simulation.json")):
        rc = cli(["simulate", "-o", data, "-n", str(n), "-D", str(box), "--Apix", f"{3.0 * 64 / box:g}",
                  "--snr", "0.1", "--shift-range", "2", "--seed", "0", "--force"])
        if rc:
            raise RuntimeError(f"cryoformer simulate failed (exit {rc})")
    return data


def train_cryoformer(data: str, run: str, epochs: int, device: str) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    rc = cli(["train", os.path.join(data, "particles.star"), "-o", run, "--epochs", str(epochs), "--seed", "0",
              "--device", device, "--heldout-fraction", "0"])
    if rc:
        raise RuntimeError(f"cryoformer train failed (exit {rc})")
    log = pd.read_csv(os.path.join(run, "log.csv"))
    epochs_rows = log[log.kind == "epoch"]
    return {"images_per_s": round(float(epochs_rows.images_per_s.iloc[-1]), 2), "epochs": int(len(epochs_rows)),
            "amp_bf16": device == "cuda"}


def cryodrgn_exe(args: argparse.Namespace) -> tuple[Optional[str], str]:
    """(the cryodrgn executable or None, why there is none)."""
    if args.no_cryodrgn:
        return None, "--no-cryodrgn"
    exe = args.cryodrgn or shutil.which("cryodrgn")
    return exe, "" if exe else "no cryodrgn executable (--cryodrgn, or on PATH)"


def train_cryodrgn(exe: str, data: str, out: str, n: int, device: str, small: bool) -> dict:
    """One ``train_vae`` epoch; images/s from the epoch time cryoDRGN logs."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "train_vae", os.path.join(data, "particles.mrcs"), "--poses", os.path.join(data, "poses.pkl"),
           "--ctf", os.path.join(data, "ctf.pkl"), "--zdim", "8", "-n", "1", "-o", out, "--no-analysis"]
    cmd += (SMALL_DRGN if small else []) + (["--amp"] if device == "cuda" else [])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")) \
        if device == "cuda" else dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    text = proc.stdout + proc.stderr
    m = re.search(r"Epoch: \d+ .*?Finished in (\d+):(\d+):([\d.]+)", text)
    if not m:
        raise RuntimeError(f"no epoch time in cryoDRGN's output (exit {proc.returncode}): {text[-300:]}")
    h, mnt, s = m.groups()
    return {"images_per_s": round(n / (3600 * int(h) + 60 * int(mnt) + float(s)), 2)}


def decode_time(run: str, box: int, device: str) -> dict:
    """Median seconds of 5 decodes at new latents, after one warm-up (synchronised on CUDA)."""
    trained = load_run(run, device=device)
    model = trained.model
    z = torch.randn(6, model.config.zdim, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            vol = model.decode_volume(z[i], D=box)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if tuple(vol.shape) != (box, box, box) or not bool(torch.isfinite(vol).all()):
        raise RuntimeError(f"decode gave {tuple(vol.shape)}, finite: {bool(torch.isfinite(vol).all())}")
    return {"box": box, "median_s": round(statistics.median(times[1:]), 4)}


def markdown(results: dict) -> str:
    env = results["steps"].get("environment", {})
    where = env.get("machine", {}).get("gpu") or env.get("machine", {}).get("cpu", "?")
    rows = ["| step | device | status | result | seconds |", "|---|---|---|---|---|"]
    for name, s in results["steps"].items():
        shown = {k: v for k, v in s.items() if k not in ("status", "seconds", "machine")}
        rows.append(f"| {name} | {where} ({results['device']}) | {s['status']} | "
                    f"{json.dumps(shown)[:200].replace('|', '/')} | {s['seconds']} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    results = {"device": args.device, "tiny": args.tiny, "args": vars(args), "steps": {}}
    if step(results, "environment", lambda: environment(args.device)) is None:
        return write_results(results, args.outdir)  # nothing else can run on this device
    if args.skip_tests:
        results["steps"]["gpu tests"] = {"status": "skipped", "seconds": 0, "reason": "--skip-tests"}
    else:
        step(results, "gpu tests", gpu_tests)
    exe, no_exe = cryodrgn_exe(args)
    decoded_run = None
    for box in args.boxes:
        data = step(results, f"data D={box}", lambda: {"path": simulate(args.outdir, box, args.n_images)})
        if data is None:
            continue
        run = os.path.join(args.outdir, f"cryoformer_D{box}")
        if step(results, f"cryoformer D={box}",
                lambda: train_cryoformer(data["path"], run, args.epochs, args.device)) and decoded_run is None:
            decoded_run = run
        for small in (False, True):
            name = f"cryodrgn-{'small' if small else 'default'} D={box}"
            if exe is None:
                results["steps"][name] = {"status": "skipped", "seconds": 0, "reason": no_exe}
                continue
            step(results, name, lambda: train_cryodrgn(exe, data["path"], os.path.join(args.outdir, name.replace(
                " ", "_")), args.n_images, args.device, small))
    if decoded_run is not None:
        step(results, f"decode {args.decode_box}³", lambda: decode_time(decoded_run, args.decode_box, args.device))
    else:
        results["steps"][f"decode {args.decode_box}³"] = {"status": "failed", "seconds": 0,
                                                         "error": "no trained run to decode"}
    return write_results(results, args.outdir)


def write_results(results: dict, outdir: str) -> int:
    """``acceptance.json`` and ``acceptance.md`` → exit status (1 when a step failed)."""
    with open(os.path.join(outdir, "acceptance.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(outdir, "acceptance.md"), "w") as handle:
        handle.write(markdown(results))
    failed = [n for n, s in results["steps"].items() if s["status"] == "failed"]
    print(markdown(results))
    print("failed steps: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
