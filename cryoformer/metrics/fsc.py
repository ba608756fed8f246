"""Fourier shell correlation, resolution and AU-FSC (docs/conventions.md, "Metrics").

Shells are one Fourier pixel wide: shell ``k`` holds the frequencies ``(kx, ky, kz)`` (integer
Fourier pixels) with ``round(|k|) == k``, for ``k = 0 … D//2``; its frequency is ``k / D``
cycles/px (``k / (D·apix)`` 1/Å). Frequencies beyond ``D//2`` (the corners of the cube) are not
used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import numpy as np

from cryoformer.errors import PathLike
from cryoformer.io.atomic import atomic_open, atomic_path


def _as_numpy(volume) -> np.ndarray:
    """A float64 numpy array from a numpy array or a (any-device) torch tensor."""
    if hasattr(volume, "detach"):
        volume = volume.detach().to("cpu").numpy()
    return np.asarray(volume, dtype=np.float64)


def _shell_index(D: int) -> Tuple[np.ndarray, np.ndarray]:
    """Shell number and Hermitian weight of each ``rfftn`` coefficient of a ``D³`` volume.

    ``rfftn`` keeps ``kx ≥ 0`` only; every coefficient with ``0 < kx < D/2`` stands for itself and
    its conjugate mirror ``−k`` (same shell), so it is weighted 2, which makes the half-spectrum
    sums equal to full-spectrum sums exactly.
    """
    kz = np.fft.fftfreq(D, 1.0 / D)[:, None, None]
    ky = np.fft.fftfreq(D, 1.0 / D)[None, :, None]
    kx = np.fft.rfftfreq(D, 1.0 / D)[None, None, :]
    shell = np.rint(np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)).astype(np.int64)  # [D, D, D//2+1]
    weight = np.full(kx.shape, 2.0)
    weight[..., 0] = 1.0
    if D % 2 == 0:
        weight[..., -1] = 1.0  # the kx = D/2 plane holds its own mirror
    return shell, np.broadcast_to(weight, shell.shape)


def fsc(vol_a, vol_b, mask=None) -> Tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two cubic volumes.

    Parameters
    ----------
    vol_a, vol_b : np.ndarray or torch.Tensor
        ``[D, D, D]`` real volumes (any float type, any device).
    mask : array-like, optional
        ``[D, D, D]`` real-space mask multiplied into both volumes before the transform
        (e.g. :func:`soft_spherical_mask`).

    Returns
    -------
    freq : np.ndarray
        ``[D//2 + 1]`` shell frequencies in cycles/px (``0 … 0.5`` for even D).
    curve : np.ndarray
        ``[D//2 + 1]`` FSC per shell, ``Re Σ A·B̄ / sqrt(Σ|A|² Σ|B|²)``; 0 for a shell where either
        volume has no power (below 1e-20 of its strongest shell).
    """
    a, b = _as_numpy(vol_a), _as_numpy(vol_b)
    if a.ndim != 3 or len(set(a.shape)) != 1 or a.shape != b.shape:
        raise ValueError(f"need two cubic volumes of one shape, got {a.shape} and {b.shape}")
    if mask is not None:
        m = _as_numpy(mask)
        a, b = a * m, b * m
    D = a.shape[0]
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)  # [D, D, D//2+1]
    shell, weight = _shell_index(D)
    n_shells = D // 2 + 1
    keep = shell < n_shells
    s, w = shell[keep], weight[keep]

    def shell_sum(values):
        return np.bincount(s, weights=w * values[keep], minlength=n_shells)

    cross = shell_sum((fa * np.conj(fb)).real)
    power_a, power_b = shell_sum(np.abs(fa) ** 2), shell_sum(np.abs(fb) ** 2)
    # A shell with no power (up to float64 round-off, 1e-20 of the strongest shell) has no
    # defined correlation; report 0 rather than the ratio of two round-off residues.
    ok = (power_a > 1e-20 * power_a.max()) & (power_b > 1e-20 * power_b.max())
    curve = np.zeros(n_shells)
    curve[ok] = cross[ok] / np.sqrt(power_a[ok] * power_b[ok])
    return np.arange(n_shells) / D, curve


def soft_spherical_mask(D: int, radius_px: float, edge_px: float = 3.0) -> np.ndarray:
    """Sphere about voxel ``D//2`` with a raised-cosine edge.

    ``[D, D, D]`` float32: 1 within ``radius_px``, ``½(1 + cos(π (r − radius)/edge))`` for
    ``radius < r < radius + edge``, 0 beyond (``edge_px = 0``: a hard sphere).
    """
    c = np.arange(D) - D // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    if edge_px <= 0:
        return (r <= radius_px).astype(np.float32)
    x = np.clip((r - radius_px) / edge_px, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * x))).astype(np.float32)


def resolution_at(freq, curve, threshold: float, pixel_size_angstrom: float) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``.

    The first shell ``k ≥ 1`` with ``curve[k] < threshold`` is found and the crossing frequency
    is interpolated linearly between shells ``k − 1`` and ``k``; the result is
    ``pixel_size_angstrom / f`` (``f`` in cycles/px). If the curve never falls below the
    threshold, the resolution of the last shell is returned: the Nyquist resolution
    ``2 · pixel_size_angstrom`` for a full curve. (The DC shell is ignored: its correlation says
    nothing about resolution. CryoBench takes the first shell below without interpolating.)
    Use 0.5 against a ground truth and 0.143 between half-maps (docs/conventions.md, "Metrics").
    """
    f = np.asarray(freq, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return float(pixel_size_angstrom / f[-1])
    k = int(below[0]) + 1
    if c[k - 1] >= threshold:
        f_cross = f[k - 1] + (c[k - 1] - threshold) / (c[k - 1] - c[k]) * (f[k] - f[k - 1])
    else:  # only possible when k − 1 is the DC shell
        f_cross = f[k - 1]
    return float(pixel_size_angstrom / f_cross) if f_cross > 0 else float("inf")


def au_fsc(freq, curve, max_freq: float = 0.5, absolute: bool = True) -> float:
    """Area under the FSC curve over ``0 … max_freq`` cycles/px (trapezoid rule).

    With the default (|FSC|, up to Nyquist) a perfect curve scores 0.5 and the score is in
    ``[0, 0.5]``. CryoBench (Jeon et al. 2024; ``metrics/fsc/per_conf_plot.py``) integrates the
    signed FSC with ``sklearn.metrics.auc`` over its shells ``0 … (D/2 − 1)/D`` (its curves stop
    one shell short of Nyquist), so its perfect score is ``0.5 − 1/D``; to reproduce it pass
    ``absolute=False, max_freq=0.5 − 1/D``. the metric definition (docs/conventions.md) asks for |FSC| up to 0.5, the default here.
    """
    f = np.asarray(freq, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    keep = f <= max_freq + 1e-12
    y = np.abs(c[keep]) if absolute else c[keep]
    x = f[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


@dataclass(frozen=True)
class FscResult:
    """An FSC curve with its pixel size and label.

    Attributes
    ----------
    freq_cycles_per_px : np.ndarray
        ``[n_shells]`` shell frequencies (cycles/px).
    curve : np.ndarray
        ``[n_shells]`` FSC values.
    pixel_size_angstrom : float
    label : str
    """

    freq_cycles_per_px: np.ndarray
    curve: np.ndarray
    pixel_size_angstrom: float
    label: str = ""

    @classmethod
    def compute(cls, vol_a, vol_b, pixel_size_angstrom: float, mask=None, label: str = "") -> "FscResult":
        """FSC of two volumes (see :func:`fsc`)."""
        freq, curve = fsc(vol_a, vol_b, mask)
        return cls(freq, curve, float(pixel_size_angstrom), label)

    @property
    def freq_per_angstrom(self) -> np.ndarray:
        """``[n_shells]`` shell frequencies in 1/Å."""
        return self.freq_cycles_per_px / self.pixel_size_angstrom

    def resolution(self, threshold: float = 0.5) -> float:
        """Resolution (Å) at ``threshold`` (see :func:`resolution_at`)."""
        return resolution_at(self.freq_cycles_per_px, self.curve, threshold, self.pixel_size_angstrom)

    @property
    def au_fsc(self) -> float:
        """Area under |FSC| up to Nyquist (see :func:`au_fsc`; perfect = 0.5)."""
        return au_fsc(self.freq_cycles_per_px, self.curve)

    def summary(self) -> dict:
        """``{"label", "resolution_fsc0.5_angstrom", "resolution_fsc0.143_angstrom", "au_fsc"}``."""
        return {"label": self.label, "resolution_fsc0.5_angstrom": self.resolution(0.5),
                "resolution_fsc0.143_angstrom": self.resolution(0.143), "au_fsc": self.au_fsc}

    def to_text(self, path: Optional[PathLike] = None) -> str:
        """The curve as two space-separated columns with the header ``pixres fsc``.

        ``pixres`` is the frequency in cycles/px: the layout cryoDRGN's ``fsc`` command and
        CryoBench's scripts write and read (``pandas.read_csv(path, sep=" ")``). The text is
        returned and, when ``path`` is given, also written there atomically.
        """
        lines = ["pixres fsc"] + [f"{f:.6f} {c:.6f}" for f, c in zip(self.freq_cycles_per_px, self.curve)]
        text = "\n".join(lines) + "\n"
        if path is not None:
            with atomic_open(path, "w") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_text(cls, path: PathLike, pixel_size_angstrom: float, label: str = "") -> "FscResult":
        """Read a curve written by :meth:`to_text` (or cryoDRGN / CryoBench)."""
        data = np.loadtxt(os.fspath(path), skiprows=1, ndmin=2)
        return cls(data[:, 0], data[:, 1], float(pixel_size_angstrom), label)


def plot_fsc(results: Union[FscResult, Iterable[FscResult]], path: PathLike,
             title: Optional[str] = None) -> None:
    """Plot FSC curves against frequency (1/Å) with the 0.5 and 0.143 thresholds; save to ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed); the file format
    follows the extension (``.png``, ``.pdf``, ``.svg``) and is written atomically.
    """
    # Imported here, not at the top: importing matplotlib sets up its cache directory and warns on
    # stderr where that is not writable, and every command loads this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [results] if isinstance(results, FscResult) else list(results)
    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        name = r.label or "FSC"
        ax.plot(r.freq_per_angstrom, r.curve, label=f"{name} ({r.resolution(0.5):.2f} Å @ 0.5)")
    for thr, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(thr, color="grey", linestyle=style, linewidth=1.0, label=f"FSC = {thr}")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(left=0.0)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    ext = os.path.splitext(os.fspath(path))[1]
    with atomic_path(path, suffix=ext) as tmp:
        fig.savefig(tmp, format=ext.lstrip(".") or "png", dpi=120)
