"""The slab size of CPU training steps, chosen by timing this run's own steps on this machine.

On a CPU the density head runs over the grid in z-slabs, each slab's forward pass followed at
once by its backward pass while its ``[B·P, H]`` tensors are still in cache
(:mod:`cryoformer.model.density_field`). Which slab is fastest depends on the caches, the BLAS
and the thread count: the default, 2^17 / B voxels, was the best of those measured on a 2-vCPU
AMD EPYC (docs/benchmarks.md), where a 2-core Intel Xeon with another cache layout trained at
about half the relative speed. So the trainer times it instead of assuming it. The first steps
of an epoch run with slabs of ½, 1, 2 and 4 times the default (whole z-planes, the ones that
differ), interleaved, and the rest of the run uses the fastest by median step time. Every slab
size computes the same loss and gradients (the slabs only split a sum), so the steps spent
timing are ordinary training steps.
"""

from __future__ import annotations

import statistics
from typing import Optional

__all__ = ["SlabTuner", "candidate_planes"]

# Multiples of the default slab tried (then rounded to whole z-planes).
FACTORS = (0.5, 1.0, 2.0, 4.0)


def candidate_planes(default_voxels: int, resolution: int) -> list[int]:
    """Distinct z-planes per slab to time: ``FACTORS`` × the default slab (which is at least one
    plane: a slab is whole planes), at least one plane, at most the grid's ``resolution``."""
    plane = resolution * resolution
    base = max(default_voxels, plane)
    out: list[int] = []
    for f in FACTORS:
        p = min(resolution, max(1, int(f * base) // plane))
        if p not in out:
            out.append(p)
    return out


class SlabTuner:
    """Times training steps at each candidate slab and keeps the fastest.

    Parameters
    ----------
    default_voxels : int
        The slab the model would use (:func:`~cryoformer.model.density_field.slab_voxels`).
    resolution : int
        Edge of the grid the density head runs on (px).
    rounds : int
        Steps timed per candidate (interleaved; the median is compared).
    warmup : int
        Steps run first at the default and not timed (allocations, first-touch page faults).

    Use: before each step, :meth:`next_slab` (voxels per slab for that step, or None when
    done); after it, :meth:`record` with its wall time. :attr:`choice` is then the pick.
    """

    def __init__(self, default_voxels: int, resolution: int, rounds: int = 3, warmup: int = 1) -> None:
        self.default_voxels = default_voxels
        self.plane = resolution * resolution
        self.candidates = [p * self.plane for p in candidate_planes(default_voxels, resolution)]  # voxels
        self.schedule = [default_voxels] * warmup + self.candidates * rounds
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self._i, self._warmup = 0, warmup
        self.choice: Optional[int] = None if len(self.candidates) > 1 else self.candidates[0]

    @property
    def done(self) -> bool:
        return self.choice is not None

    def next_slab(self) -> Optional[int]:
        """Voxels per slab for the next step, or None when the choice is made."""
        return None if self.done else self.schedule[self._i]

    def record(self, seconds: float) -> None:
        """The wall time of the step :meth:`next_slab` set up."""
        if self.done:
            return
        if self._i >= self._warmup:
            self.times[self.schedule[self._i]].append(seconds)
        self._i += 1
        if self._i == len(self.schedule):
            self.choice = min(self.candidates, key=lambda c: statistics.median(self.times[c]))

    def summary(self) -> str:
        """One line for the run log: each candidate's median step time, the pick."""
        if not any(self.times.values()):
            return f"slab size: {self.choice // self.plane} z-plane(s) ({self.choice} voxels), not timed"
        parts = ", ".join(f"{c // self.plane} plane(s) {1e3 * statistics.median(t):.0f} ms"
                          for c, t in self.times.items() if t)
        return (f"slab size timed on this machine (median step): {parts}; using {self.choice // self.plane} "
                f"z-plane(s) ({self.choice} voxels) per slab")
