"""Progress of long loops, readable on a terminal and in a batch job's log file.

On a terminal (or in a notebook) a tqdm bar redraws one line with carriage returns. Written to
a file — a SLURM job's ``--output`` — those redraws pile up as one unreadable line of ``\\r``
fragments, so there :class:`Progress` prints plain lines instead: one every ``every_steps``
steps or ``every_s`` seconds, whichever comes first, and one at the end, each with
step/total, the loss (when reported), images/s and the ETA (the trainer asks for one every
30 s and one per epoch, so a day-long job's log stays readable)::

    epoch 3/20: step 120/625 (19%) loss 0.8123 img/s 412.5 elapsed 0:00:04 ETA 0:00:18

:func:`progress_style` decides which, from the stream the bar would go to.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Optional, TextIO

from tqdm.auto import tqdm

BARS = "bars"
LINES = "lines"
OFF = "off"
STYLES = (BARS, LINES, OFF)

# A plain line at least this often (seconds), so a slow step count still shows signs of life.
DEFAULT_EVERY_S = 30.0


def progress_style(progress: Optional[bool] = True, stream: Optional[TextIO] = None) -> str:
    """How to show progress: :data:`BARS` on a terminal or in a notebook, :data:`LINES`
    when ``stream`` (default ``sys.stderr``) is a file or pipe, :data:`OFF` when
    ``progress`` is False."""
    if progress is False:
        return OFF
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    interactive = (isatty is not None and isatty()) or _in_notebook()
    return BARS if interactive else LINES


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel, whose stderr is no TTY yet where tqdm.auto
    draws a widget, not ``\\r`` redraws. (ipykernel being imported is not enough: test
    runners and tools import it without running a kernel.)"""
    ipython = sys.modules.get("IPython")  # never imported here: only asked if already loaded
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def resolve_style(progress) -> str:
    """A style from ``progress``: one of :data:`STYLES` as it is, else a bool for
    :func:`progress_style` (True: bars on a terminal, plain lines elsewhere)."""
    if isinstance(progress, str):
        if progress not in STYLES:
            raise ValueError(f"progress style must be one of {STYLES}, got {progress!r}")
        return progress
    return progress_style(bool(progress))


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (seconds rounded), e.g. ``0:01:05``."""
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class Progress:
    """Progress of ``total`` steps, as a tqdm bar or as plain lines (see the module docstring).

    Parameters
    ----------
    total : int
        Steps in the loop.
    desc : str
        What runs ("epoch 3/20", "latents").
    style : str
        One of :data:`STYLES` (:func:`progress_style`).
    initial : int
        Steps already done (a resumed epoch).
    unit : str
        What a step is, for the bar.
    images_per_step : int
        Images per step, for images/s when :meth:`update` is not told.
    every_steps : int or None
        Plain lines: also one every this many steps (None: by time only).
    every_s : float
        Plain lines: one at least every this many seconds.
    stream : file, optional
        Where to write (default ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, style: str, initial: int = 0, unit: str = "batch",
                 images_per_step: int = 0, every_steps: Optional[int] = None, every_s: float = DEFAULT_EVERY_S,
                 stream: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.style = int(total), desc, style
        self.done, self.start_done = int(initial), int(initial)
        self.every_steps, self.every_s = every_steps, float(every_s)
        self.images_per_step, self.images = images_per_step, 0
        self.stream = sys.stderr if stream is None else stream
        self._t0 = self._last_line = time.monotonic()
        self._loss: Optional[float] = None
        self._printed_at = -1  # ``done`` when the last plain line was written
        self._bar = None
        if style == BARS:
            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=False,
                             dynamic_ncols=True, file=self.stream)

    def update(self, steps: int = 1, loss: Optional[float] = None, images: Optional[int] = None) -> None:
        """``steps`` more steps done, covering ``images`` images (default
        ``steps · images_per_step``); ``loss``: the latest loss, shown beside."""
        self.done += steps
        self.images += self.images_per_step * steps if images is None else images
        if loss is not None:
            self._loss = loss
        if self._bar is not None:
            self._bar.update(steps)
            postfix = {"img_s": f"{self.rate():.1f}"}
            if self._loss is not None:
                postfix = {"loss": f"{self._loss:.4g}", **postfix}
            self._bar.set_postfix(postfix)
        elif self.style == LINES:
            now = time.monotonic()
            by_steps = self.every_steps is not None and self.done % self.every_steps == 0
            if by_steps or now - self._last_line >= self.every_s:
                self._line(now)

    def rate(self) -> float:
        """Images per second since this progress began (0 when unknown)."""
        dt = time.monotonic() - self._t0
        return self.images / dt if dt > 0 and self.images else 0.0

    def line(self) -> str:
        """The plain line describing where the loop stands."""
        elapsed = time.monotonic() - self._t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: step {self.done}/{self.total}{pct}"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4g}")
        if self.images:
            parts.append(f"img/s {self.rate():.1f}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        ran = self.done - self.start_done
        if 0 < ran and self.done < self.total:
            parts.append(f"ETA {format_duration(elapsed / ran * (self.total - self.done))}")
        return " ".join(parts)

    def _line(self, now: float) -> None:
        self._last_line, self._printed_at = now, self.done
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or write the final plain line (unless the last step already did)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.style == LINES and self._printed_at != self.done:
            self._line(time.monotonic())
        self.style = OFF  # closing twice writes nothing more

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
