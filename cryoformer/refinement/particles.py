"""The particles a pose search reads: images at their original box and their CTF rows, with no
tie to how a trainer stores them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from cryoformer.physics.ctf import ctf_images
from cryoformer.physics.fourier import fft2_center

__all__ = ["ImageRows", "Particles"]

# rows [b] int64 → images [b, D, D] float32 at the original box, contrast already handled
# (inverted and scaled as the model sees them).
ImageRows = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class Particles:
    """Particle images and CTF for the search and the back-projected references.

    Attributes
    ----------
    images : ImageRows
        ``images(rows)`` → ``[b, D, D]`` float32 images of positions ``rows`` (``0 … N−1``) at
        the original box ``D``, as the model sees them (contrast inverted and scaled).
    count : int
        ``N``.
    box_size : int
        ``D`` (px).
    ctf : np.ndarray, optional
        ``[N, 9]`` CTF parameters (cryoDRGN order; column 0 is ``D``, column 1 the Å/px), or
        None for no CTF.
    """

    images: ImageRows
    count: int
    box_size: int
    ctf: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.count

    @property
    def pixel_size_angstrom(self) -> Optional[float]:
        """Å/px of the CTF rows (None without a CTF)."""
        return None if self.ctf is None else float(self.ctf[0, 1])

    def spectra(self, band: torch.Tensor, device: Optional[torch.device] = None,
                chunk: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """The particles in chunks of ``chunk``: ``(positions [b], spectra [b, M], ctf [b, M])``.

        The centred spectra (:func:`~cryoformer.physics.fourier.fft2_center`) and the CTF at
        the ``M`` frequencies where ``band`` (``[D, D]`` bool, CPU) is true; read and computed
        on the CPU, then sent to ``device`` (default: stay)."""
        for start in range(0, self.count, chunk):
            pos = np.arange(start, min(start + chunk, self.count))
            img_f = fft2_center(self.images(pos))[:, band]  # [b, M]
            if self.ctf is not None:
                ctf = ctf_images(self.ctf[pos], self.box_size)[:, band]
            else:
                ctf = torch.ones(len(pos), int(band.sum()))
            yield pos, img_f.to(device), ctf.to(device)
