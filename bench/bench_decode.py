"""Decode-time benchmark for :meth:`cryoformer.model.CryoFormer.decode_volume` (docs/benchmarks.md).

Measures decoding a volume at a *new* latent (never decoded before):

* **cached** — the image-independent feature grid ``F_S`` is already cached (the normal case
  when decoding many latents: only the decoder blocks and the per-voxel head run);
* **uncached** — the cache is dropped first, so the hash grid and its MLP run too.

Targets (the decode-time goals of docs/benchmarks.md, paper-eccv preset): 64³ on CPU ≤ 0.5 s cached, ≤ 3 s uncached;
128³ on CUDA ≤ 20 ms. The model is randomly initialised: decode cost does not depend on the
weights' values.

Usage::

    python bench/bench_decode.py                      # paper-eccv, 64³ CPU (+128³ CUDA if any)
    python bench/bench_decode.py --presets paper-eccv n512 n64-c64 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from cryoformer.model import CryoFormer, model_config_from_preset


def machine_description() -> str:
    """One line naming CPU, cores, torch threads and version, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); {gpu}; {platform.platform()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model: CryoFormer, box: int, repeats: int, cached: bool,
                device: torch.device, generator: torch.Generator) -> list[float]:
    """Seconds per ``decode_volume`` at fresh random latents."""
    zdim = model.config.zdim
    model.decode_volume(torch.randn(zdim, generator=generator), D=box)  # warm-up, fills cache
    times = []
    for _ in range(repeats):
        z = torch.randn(zdim, generator=generator).to(device)
        if not cached:
            model.invalidate_cache()
        _sync(device)
        start = time.perf_counter()
        vol = model.decode_volume(z, D=box)
        _sync(device)
        times.append(time.perf_counter() - start)
        assert vol.shape == (box, box, box)
    return times


def run(preset: str, box: int, device: torch.device, repeats: int) -> dict[str, float]:
    # The network these timings were recorded for: the presets as they stood before the
    # library defaults became the trained network (64-wide head, block GetQuery).
    cfg = model_config_from_preset(preset, box, density_head_hidden=64, get_query="block")
    model = CryoFormer(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for cached in (True, False):
        t = time_decode(model, box, repeats, cached, device, gen)
        out["cached" if cached else "uncached"] = statistics.median(t)
        out[("cached" if cached else "uncached") + "_min"] = min(t)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["paper-eccv"])
    ap.add_argument("--cpu-box", type=int, default=64)
    ap.add_argument("--cuda-box", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {machine_description()}")
    targets = {"cpu": (0.5, 3.0), "cuda": (0.020, None)}
    runs = [(torch.device("cpu"), args.cpu_box)]
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), args.cuda_box))
    print("| preset | device | D | cached median (min) | uncached median (min) | target |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for device, box in runs:
            r = run(preset, box, device, args.repeats)
            tc, tu = targets[device.type]
            target = f"≤ {tc * 1e3:.0f} ms cached" + (f", ≤ {tu:.0f} s uncached" if tu else "")
            print(f"| {preset} | {device.type} | {box}³ | {r['cached'] * 1e3:.1f} ms "
                  f"({r['cached_min'] * 1e3:.1f}) | {r['uncached'] * 1e3:.1f} ms "
                  f"({r['uncached_min'] * 1e3:.1f}) | {target} |", flush=True)


if __name__ == "__main__":
    main()
