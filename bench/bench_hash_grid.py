"""Throughput of the hash-grid encoding (docs/benchmarks.md): points per second, forward and
forward + backward, for each backend that runs on the chosen device.

    python bench/bench_hash_grid.py                      # CPU, torch backend, 2 threads
    python bench/bench_hash_grid.py --device cuda        # + triton / tinycudann when present

Reports the best and the median of ``--repeats`` timed runs (after one warm-up) as
points/s, with the machine, so numbers can go into docs/benchmarks.md as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import platform
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402

from cryoformer.model import hash_grid_tcnn, hash_grid_triton
from cryoformer.model.hash_grid import HashGridConfig, HashGridEncoding


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_backend(backend: str, args, device: torch.device) -> None:
    config = HashGridConfig(
        n_levels=args.levels, n_features_per_level=args.features, log2_hashmap_size=args.log2_hashmap_size
    ).with_box_size(args.box_size)
    gen = torch.Generator(device=device).manual_seed(0)
    enc = HashGridEncoding(config, backend=backend, device=device)
    x = torch.rand(args.points, 3, device=device, generator=gen)
    weight = torch.randn(args.points, config.output_dim, device=device, generator=gen)

    def forward():
        with torch.no_grad():
            enc(x)

    def forward_backward(need_x: bool):
        def run():
            enc.params.grad = None
            xi = x.requires_grad_(need_x)
            (enc(xi) * weight).sum().backward()

        return run

    cases = [("forward", forward), ("fwd+bwd (params)", forward_backward(False)),
             ("fwd+bwd (params, x)", forward_backward(True))]
    for name, fn in cases:
        times = timed(fn, device, args.repeats)
        best, median = args.points / min(times), args.points / statistics.median(times)
        print(f"  {backend:10s} {name:22s} best {best / 1e6:7.2f} M points/s   median {median / 1e6:7.2f} M points/s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1 << 18, help="points per call (default 262144)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--box-size", type=int, default=128, help="finest resolution D (default 128)")
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--log2-hashmap-size", type=int, default=15)
    parser.add_argument("--backends", default="all", help="comma list of torch,triton,tinycudann (default all that run)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.system()} {platform.release()}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    print(f"grid: L={args.levels} F={args.features} T=2^{args.log2_hashmap_size} D={args.box_size}, "
          f"{args.points} points, best/median of {args.repeats}")

    available = ["torch"]
    if hash_grid_triton.is_available(device):
        available.append("triton")
    if device.type == "cuda" and hash_grid_tcnn.is_available():
        available.append("tinycudann")
    wanted = available if args.backends == "all" else [b for b in args.backends.split(",") if b in available]
    for backend in wanted:
        bench_backend(backend, args, device)


if __name__ == "__main__":
    main()
