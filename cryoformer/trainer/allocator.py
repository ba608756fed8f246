"""Keep freed tensor memory inside the training process (glibc ``malloc`` tuning, CPU).

A CPU training step allocates and frees the same large temporaries (a slab's ``[B·P, H]``
head activations, ~10 MB each at D = 64) hundreds of times. glibc serves blocks this size
with ``mmap`` and hands them back to the kernel on ``free``, and it trims the heap top as soon
as 128 KiB are free, so every slab's fresh tensors are first touched page by page (page
faults), which measured ~12 % of a D = 64 step on the 2-core benchmark machine. Raising the
mmap and trim thresholds keeps that memory in the heap for reuse, as PyTorch's performance
guide achieves with jemalloc/tcmalloc, without an extra library.

The effect is process-wide and one-way (freed memory up to ``trim_threshold_bytes`` stays
mapped), so only the trainer calls :func:`keep_freed_memory`, once, for CPU runs. Elsewhere
(not Linux, or a libc without ``mallopt``, such as musl) it does nothing. An environment that
already sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory(mmap_threshold_bytes: int = MAX_MMAP_THRESHOLD_BYTES,
                      trim_threshold_bytes: int = 1 << 30,
                      top_pad_bytes: int = 1 << 28) -> bool:
    """Tune glibc ``malloc`` so freed blocks up to the thresholds are reused, not unmapped.

    Parameters
    ----------
    mmap_threshold_bytes : int
        Blocks smaller than this come from the heap (glibc's maximum, 32 MiB, by default).
    trim_threshold_bytes : int
        Free memory at the heap top kept before it is returned to the system (1 GiB).
    top_pad_bytes : int
        Extra bytes requested whenever the heap grows (256 MiB).

    Returns
    -------
    bool
        True when the settings are in force (now or from an earlier call), False when the
        platform has no glibc ``mallopt`` or the environment sets the thresholds itself.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, min(mmap_threshold_bytes, MAX_MMAP_THRESHOLD_BYTES)),
                (_M_TRIM_THRESHOLD, trim_threshold_bytes), (_M_TOP_PAD, top_pad_bytes))
    _applied = all(mallopt(param, int(value)) == 1 for param, value in settings)
    return _applied
