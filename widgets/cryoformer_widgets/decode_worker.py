"""Decode volumes in a background thread, with an LRU cache keyed by latent (no GUI).

A widget asks for the volume at a latent ``z``; the answer comes back through a callback when
the single worker thread has decoded it, so the interface never waits on the model. Requests
made while the worker is busy replace each other: only the newest one still waiting is decoded
(dragging a slider across twenty positions decodes the last, not all twenty). A volume decoded
once is kept in a small LRU cache, so going back to a latent costs nothing.

Errors raised by the decoder are caught in the worker and delivered as a message in the
:class:`DecodeResult`; they never propagate into the widget's event handlers.

>>> worker = DecodeWorker(lambda z, D: model.decode_volume(z, D).cpu().numpy(), default_box=64)
>>> future = worker.submit(z)          # returns at once
>>> future.result().volume.shape       # (64, 64, 64)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional

import numpy as np
import torch

__all__ = ["VolumeCache", "DecodeResult", "DecodeWorker", "KnownMapsDecoder", "latent_key"]


def latent_key(z: np.ndarray, D: int) -> tuple:
    """Cache key of the volume at latent ``z`` ``[zdim]`` decoded at ``D`` voxels.

    The latent is rounded to float32, the precision the model computes in, so a latent read
    back from a ``.npy`` file and the same latent computed in float64 share one entry.
    """
    return int(D), np.ascontiguousarray(np.asarray(z, dtype=np.float32).reshape(-1)).tobytes()


class VolumeCache:
    """Least-recently-used store of decoded volumes.

    Parameters
    ----------
    max_items : int
        Volumes kept (each ``D³ × 4`` bytes: 1 MiB at ``D = 64``, 8 MiB at ``D = 128``).
    """

    def __init__(self, max_items: int = 32) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = int(max_items)
        self._items: "OrderedDict[Hashable, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        """The volume stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            vol = self._items.get(key)
            if vol is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return vol

    def put(self, key: Hashable, volume: np.ndarray) -> None:
        """Store ``volume`` (read-only from now on), evicting the least recently used."""
        volume.setflags(write=False)
        with self._lock:
            self._items[key] = volume
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class KnownMapsDecoder:
    """The ``model`` :func:`~cryoformer.analysis.traversal.write_series` decodes with when a front
    end already holds the series' maps: those maps (keyed by :func:`latent_key`), else
    ``fallback(z [zdim], D) → [D, D, D]`` (e.g. ``RunSession.volume_at``), so an export writes
    what was shown without decoding it again.

    Parameters
    ----------
    known : dict
        ``latent_key(z, D)`` → ``[D, D, D]`` float32 map.
    fallback : callable, optional
        Decodes a latent that is not known; None: every latent asked for must be known.
    """

    def __init__(self, known: Dict[tuple, np.ndarray],
                 fallback: Optional[Callable[[np.ndarray, int], np.ndarray]] = None) -> None:
        self._known, self._fallback = known, fallback

    def decode_volume(self, z: np.ndarray, D: int) -> torch.Tensor:
        """``[b, D, D, D]`` float32 maps at latents ``z`` ``[b, zdim]``."""
        vols = []
        for zi in np.atleast_2d(np.asarray(z, dtype=np.float32)):
            vol = self._known.get(latent_key(zi, D))
            if vol is None:
                if self._fallback is None:
                    raise KeyError(f"no map known at this latent for a {D}³ box")
                vol = self._fallback(zi, D)
            vols.append(vol)
        return torch.from_numpy(np.stack(vols))


@dataclass
class DecodeResult:
    """What one request produced.

    Attributes
    ----------
    request_id : int
        Increasing number of the request.
    latent : np.ndarray
        ``[zdim]`` float32 latent asked for.
    box : int
        Edge ``D`` of the volume in voxels.
    volume : np.ndarray or None
        ``[D, D, D]`` float32 ``[z, y, x]`` (read-only; shared with the cache); None on error
        or when the request was superseded.
    error : str or None
        ``"ExceptionType: message"`` when decoding failed.
    cached : bool
        Served from the cache.
    superseded : bool
        Dropped unseen because a newer request arrived first.
    seconds : float
        Wall-clock decoding time (0 for cached or superseded requests).
    tag : Any
        Whatever the caller attached (what the volume is, for display).
    """

    request_id: int
    latent: np.ndarray
    box: int
    volume: Optional[np.ndarray] = None
    error: Optional[str] = None
    cached: bool = False
    superseded: bool = False
    seconds: float = 0.0
    tag: Any = None

    @property
    def ok(self) -> bool:
        return self.volume is not None and self.error is None


class DecodeWorker:
    """A single background thread that decodes volumes, newest request first.

    Parameters
    ----------
    decode_fn : callable
        ``decode_fn(z [zdim] float32, D) -> [D, D, D]`` array (numpy or torch); runs in the
        worker thread only.
    default_box : int
        ``D`` used when a request gives none.
    cache_size : int
        Volumes kept in the :class:`VolumeCache`.
    on_result : callable, optional
        ``on_result(DecodeResult)`` for every request that was not superseded, called in the
        worker thread (or in the caller's thread for cache hits). Exceptions it raises are
        caught and reported through ``on_busy``'s message.
    on_busy : callable, optional
        ``on_busy(busy: bool, message: str)`` whenever the worker starts or stops decoding.
    """

    def __init__(self, decode_fn: Callable[[np.ndarray, int], Any], default_box: int,
                 cache_size: int = 32, on_result: Optional[Callable[[DecodeResult], None]] = None,
                 on_busy: Optional[Callable[[bool, str], None]] = None) -> None:
        self._decode_fn = decode_fn
        self.default_box = int(default_box)
        self.cache = VolumeCache(cache_size)
        self.on_result = on_result
        self.on_busy = on_busy
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryoformer-decode")
        self._lock = threading.Lock()
        self._next_id = 0
        self._newest_id = -1
        self._pending = 0
        self._last_future: Optional[Future] = None
        self.last_error: Optional[str] = None

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """True while a request is queued or being decoded."""
        with self._lock:
            return self._pending > 0

    def _notify_busy(self, busy: bool, message: str) -> None:
        if self.on_busy is not None:
            try:
                self.on_busy(busy, message)
            except Exception:  # a display callback must never stop the worker
                pass

    def _deliver(self, result: DecodeResult) -> None:
        if result.error:
            self.last_error = result.error
        if self.on_result is None or result.superseded:
            return
        try:
            self.on_result(result)
        except Exception as exc:  # shown, never raised into the caller's event loop
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._notify_busy(self.busy, f"error while showing the volume: {self.last_error}")

    # ------------------------------------------------------------------ requests
    def submit(self, z: np.ndarray, D: Optional[int] = None, tag: Any = None) -> "Future[DecodeResult]":
        """Ask for the volume at ``z`` ``[zdim]``; returns at once.

        A cached volume is delivered immediately (``on_result`` runs before this returns);
        otherwise the request is queued for the worker, superseding any request still waiting.

        Returns
        -------
        concurrent.futures.Future
            Resolves to the :class:`DecodeResult` (never raises: errors are in ``.error``).
        """
        z = np.asarray(z, dtype=np.float32).reshape(-1).copy()
        D = int(D or self.default_box)
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            self._newest_id = request_id
        vol = self.cache.get(latent_key(z, D))
        if vol is not None:
            result = DecodeResult(request_id, z, D, volume=vol, cached=True, tag=tag)
            future: Future = Future()
            future.set_result(result)
            with self._lock:
                self._last_future = future
            self._deliver(result)
            return future
        with self._lock:
            self._pending += 1
            first = self._pending == 1
        if first:
            self._notify_busy(True, "decoding…")
        future = self._executor.submit(self._run, request_id, z, D, tag)
        with self._lock:
            self._last_future = future
        return future

    def _run(self, request_id: int, z: np.ndarray, D: int, tag: Any) -> DecodeResult:
        result = DecodeResult(request_id, z, D, tag=tag)
        try:
            with self._lock:
                stale = request_id < self._newest_id
            if stale:
                result.superseded = True
                return result
            key = latent_key(z, D)
            vol = self.cache.get(key)  # decoded meanwhile by an identical request
            if vol is not None:
                result.volume, result.cached = vol, True
            else:
                t0 = time.perf_counter()
                vol = self._decode_array(z, D)
                result.seconds = time.perf_counter() - t0
                self.cache.put(key, vol)
                result.volume = vol
        except Exception as exc:  # reported, not raised
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._pending -= 1
                idle = self._pending == 0
        self._deliver(result)
        if idle:
            self._notify_busy(False, result.error or ("" if result.superseded else
                                                       f"decoded in {result.seconds:.2f} s"))
        return result

    def _decode_array(self, z: np.ndarray, D: int) -> np.ndarray:
        """``decode_fn(z, D)`` as a C-contiguous ``[D, D, D]`` float32 numpy array (worker thread)."""
        out = self._decode_fn(z, D)
        if hasattr(out, "detach"):  # a torch tensor, possibly on the GPU
            out = out.detach().float().cpu().numpy()
        vol = np.ascontiguousarray(out, dtype=np.float32)
        if vol.shape != (D, D, D):
            raise ValueError(f"decoder returned shape {vol.shape}, expected {(D, D, D)}")
        return vol

    def decode_now(self, z: np.ndarray, D: Optional[int] = None) -> np.ndarray:
        """Decode in the calling thread's turn (queued behind pending work), using the cache.

        Returns
        -------
        np.ndarray
            ``[D, D, D]`` float32. Raises what the decoder raises.
        """
        z = np.asarray(z, dtype=np.float32).reshape(-1)
        D = int(D or self.default_box)
        key = latent_key(z, D)
        vol = self.cache.get(key)
        if vol is not None:
            return vol
        vol = self._executor.submit(self._decode_array, z, D).result()
        self.cache.put(key, vol)
        return vol

    def wait(self, timeout: Optional[float] = 60.0) -> Optional[DecodeResult]:
        """Block until the newest request is done; its result (None when there was none).

        Raises
        ------
        TimeoutError
            The request is still running after ``timeout`` seconds.
        """
        with self._lock:
            future = self._last_future
        if future is None:
            return None
        return future.result(timeout=timeout)  # on_result ran before the future resolved

    def shutdown(self) -> None:
        """Stop the worker (pending requests are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
