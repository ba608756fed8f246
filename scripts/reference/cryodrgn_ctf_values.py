"""CTF values computed by cryoDRGN's own ``cryodrgn.ctf.compute_ctf`` on the frequency grid of
cryoDRGN's ``add_ctf`` / docs/conventions.md: ``arange(-D/2, D/2) / (D * apix)``, x along columns.

Run with the cryoDRGN virtual environment's python.  Usage: python cryodrgn_ctf_values.py OUT.npz
"""

from __future__ import annotations

import sys

import cryodrgn
import numpy as np
import torch
from cryodrgn.ctf import compute_ctf

D = 32

# name: (apix, dfu, dfv, dfang_deg, kv, cs_mm, w, phase_deg, bfactor or nan)
PARAMETER_SETS = {
    "plain": (2.0, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0, np.nan),
    "astigmatic": (2.0, 21000.0, 17500.0, 37.5, 300.0, 2.7, 0.07, 0.0, np.nan),
    "astig_negative_angle": (1.6, 9000.0, 7800.0, -121.0, 200.0, 1.4, 0.1, 0.0, np.nan),
    "phase_shift": (2.0, 6000.0, 5200.0, 80.0, 300.0, 0.01, 0.1, 90.0, np.nan),
    "bfactor": (1.3, 12000.0, 11000.0, 15.0, 300.0, 2.7, 0.1, 30.0, 150.0),
    "low_kv_high_cs": (3.0, 30000.0, 24000.0, 170.0, 100.0, 4.0, 0.15, 0.0, 80.0),
}


def freq_grid(apix: float) -> np.ndarray:
    f = np.arange(-D // 2, D // 2, dtype=np.float64) / (D * apix)
    fx, fy = np.meshgrid(f, f)  # fx varies along columns (x), fy along rows (y)
    return np.stack([fx, fy], -1)  # [D, D, 2]


def main(out: str) -> None:
    names = list(PARAMETER_SETS)
    params = np.array([PARAMETER_SETS[n] for n in names], dtype=np.float64)
    values32 = np.empty((len(names), D, D), dtype=np.float32)
    values64 = np.empty((len(names), D, D), dtype=np.float64)
    for i, name in enumerate(names):
        apix, dfu, dfv, ang, kv, cs, w, ph, b = PARAMETER_SETS[name]
        freqs = freq_grid(apix)
        for dtype, store in ((torch.float32, values32), (torch.float64, values64)):
            t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
            c = compute_ctf(
                torch.tensor(freqs, dtype=dtype), t(dfu), t(dfv), t(ang), t(kv), t(cs),
                t(w), phase_shift=t(ph), bfactor=None if np.isnan(b) else t(b),
            )
            store[i] = c.numpy()
    np.savez_compressed(
        out,
        names=np.array(names),
        columns=np.array(["pixel_size_angstrom", "defocus_u_angstrom", "defocus_v_angstrom",
                          "astigmatism_angle_deg", "voltage_kv", "spherical_aberration_mm",
                          "amplitude_contrast", "phase_shift_deg", "bfactor_angstrom2"]),
        params=params,
        box_size=D,
        ctf_float32=values32,
        ctf_float64=values64,
        cryodrgn_version=cryodrgn.__version__,
    )
    print(f"wrote {out} ({len(names)} parameter sets, cryodrgn {cryodrgn.__version__})")


if __name__ == "__main__":
    main(sys.argv[1])
