"""Atomic models → 3-D electron-scattering potential maps.

Each atom contributes the real-space form of its electron scattering factor, the sum of the five
Gaussians of International Tables Vol. C, Table 4.3.2.2 (``gemmi.Element(sym).c4322``),

    f(s) = Σ_i a_i exp(−b_i s²/4)          (s = |k|, spatial frequency in 1/Å, a_i in Å, b_i in Å²)

broadened by an isotropic B-factor (``b_i → b_i + B``). Its inverse Fourier transform is

    φ(r) = Σ_i a_i (4π/b_i')^{3/2} exp(−4π² r²/b_i')          (Å⁻², integral Σ_i a_i Å)

which is what :func:`atoms_to_volume` puts on the grid (the same function as gemmi's
``c4322.calculate_density_iso``). Each isotropic Gaussian is a product of three 1-D Gaussians, so
an atom's contribution to its neighbourhood is an outer product of three short 1-D profiles:
cheap to vectorise and exact to integrate over a voxel with ``erf``.

Conventions (docs/conventions.md): positions are ``(x, y, z)`` in Å relative to the box centre; the map is
indexed ``[z, y, x]`` and voxel ``i`` sits at coordinate ``(i − D//2)·pixel_size_angstrom``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import gemmi
import numpy as np
import torch
from scipy.special import erf

from cryoformer.errors import InputError, PathLike, require_file

ElementLike = Union[str, int]

DEFAULT_BFACTOR_ANGSTROM2 = 20.0


def scattering_coefficients(elements: Sequence[ElementLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Five-Gaussian electron scattering coefficients of each atom.

    Parameters
    ----------
    elements : sequence of str or int, length N
        Element symbols (case-insensitive, e.g. ``"C"``, ``"FE"``) or atomic numbers.

    Returns
    -------
    a : np.ndarray
        ``[N, 5]`` float64 amplitudes (Å).
    b : np.ndarray
        ``[N, 5]`` float64 widths (Å²), for ``f(s) = Σ a exp(−b s²/4)``.

    Raises
    ------
    ValueError
        For a symbol gemmi does not know (gemmi silently maps those to atomic number 0).
    """
    table = {}
    index = np.empty(len(elements), dtype=np.int64)
    for n, el in enumerate(elements):
        key = int(el) if isinstance(el, (int, np.integer)) else str(el).strip().capitalize()
        if key not in table:
            element = gemmi.Element(key)
            if element.atomic_number == 0:
                raise ValueError(f"unknown element {el!r}")
            table[key] = (len(table), element.c4322.a, element.c4322.b)
        index[n] = table[key][0]
    if not table:
        return np.zeros((0, 5)), np.ones((0, 5))
    rows = sorted(table.values())
    a_tab = np.array([r[1] for r in rows], dtype=np.float64)  # [n_unique, 5]
    b_tab = np.array([r[2] for r in rows], dtype=np.float64)
    return a_tab[index], b_tab[index]


def _axis_profiles(offsets_angstrom: np.ndarray, b_total: np.ndarray, pixel_size: float,
                   sampling: str) -> np.ndarray:
    """1-D factors of each Gaussian term on a window of voxels along one axis.

    ``offsets_angstrom`` is ``[n, W]`` (voxel coordinate − atom coordinate), ``b_total`` ``[n, 5]``.
    Returns ``[n, 5, W]``: point values of the normalised 1-D Gaussian (``sampling="point"``) or
    its mean over each voxel (``"average"``).
    """
    d = offsets_angstrom[:, None, :]  # [n, 1, W]
    scale = (2.0 * np.pi / np.sqrt(b_total))[:, :, None]  # [n, 5, 1]; 1/(σ√2), σ² = b/(8π²)
    if sampling == "point":
        return scale / np.sqrt(np.pi) * np.exp(-((scale * d) ** 2))
    half = 0.5 * pixel_size
    mass = 0.5 * (erf(scale * (d + half)) - erf(scale * (d - half)))  # [n, 5, W] per-voxel mass
    # Renormalise the truncated window to unit mass so the map integrates exactly to Σa.
    mass /= mass.sum(axis=-1, keepdims=True)
    return mass / pixel_size


def atoms_to_volume(
    positions_angstrom,
    elements: Sequence[ElementLike],
    D: int,
    pixel_size_angstrom: float,
    bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2,
    occupancy=None,
    sampling: str = "average",
    cutoff_sigmas: float = 4.0,
    max_chunk_values: int = 4_000_000,
) -> np.ndarray:
    """Electron-scattering potential of a set of atoms on a ``D³`` grid.

    Parameters
    ----------
    positions_angstrom : array-like
        ``[N, 3]`` atom coordinates ``(x, y, z)`` in Å relative to the box centre.
    elements : sequence of str or int, length N
        Element symbols or atomic numbers.
    D : int
        Box size in voxels.
    pixel_size_angstrom : float
        Voxel size (Å).
    bfactor_angstrom2 : float
        Isotropic B-factor (Å²) added to every Gaussian width; ``0`` gives the bare atoms.
    occupancy : array-like, optional
        ``[N]`` per-atom multipliers (occupancy, or any weight: :func:`displacement_map` uses it).
    sampling : {"average", "point"}
        ``"average"`` (default) stores the mean potential over each voxel (exact ``erf``
        integrals, so the map integrates to ``Σ a·occupancy`` however coarse the voxels and
        however sharp the atoms); ``"point"`` samples the potential at voxel centres (aliases
        badly when the atoms are narrower than a voxel).
    cutoff_sigmas : float
        Each atom is evaluated on a cube of half-width ``cutoff_sigmas`` × its widest Gaussian's
        standard deviation (plus half a voxel); the tails beyond are < 1e-4 of the mass.
    max_chunk_values : int
        Atoms are processed in chunks of at most this many (atom, voxel) pairs, bounding memory.

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` float32 map indexed ``[z, y, x]``, in Å⁻² (scattering length per volume).
        ``volume.sum() · pixel_size_angstrom³ = Σ a_i`` for atoms whose window lies in the box.
    """
    if sampling not in ("average", "point"):
        raise ValueError(f"sampling must be 'average' or 'point', got {sampling!r}")
    pos = np.asarray(positions_angstrom, dtype=np.float64).reshape(-1, 3)  # [N, 3] (x, y, z)
    if len(elements) != pos.shape[0]:
        raise ValueError(f"{pos.shape[0]} positions but {len(elements)} elements")
    if not pixel_size_angstrom > 0 or bfactor_angstrom2 < 0:
        raise ValueError("pixel size must be > 0 and the B-factor >= 0")
    D = int(D)
    apix = float(pixel_size_angstrom)
    out = torch.zeros(D ** 3, dtype=torch.float64)
    if pos.shape[0] == 0:
        return out.reshape(D, D, D).float().numpy()
    a, b = scattering_coefficients(elements)  # [N, 5] each
    if occupancy is not None:
        a = a * np.asarray(occupancy, dtype=np.float64).reshape(-1, 1)
    b_total = b + float(bfactor_angstrom2)
    if np.any(b_total <= 0):
        raise ValueError("Gaussian widths must be > 0 (use a B-factor > 0 for such atoms)")

    # One window size for all atoms: simple to vectorise, and the widest term sets it anyway.
    sigma_max = float(np.sqrt(b_total.max() / (8.0 * np.pi ** 2)))
    half_width = int(np.ceil(cutoff_sigmas * sigma_max / apix + 0.5))
    window = np.arange(-half_width, half_width + 1)  # [W]
    chunk = max(1, max_chunk_values // window.size ** 3)

    frac = pos / apix + D // 2  # [N, 3] fractional voxel index (x, y, z)
    centre = np.rint(frac).astype(np.int64)
    for start in range(0, pos.shape[0], chunk):
        sl = slice(start, start + chunk)
        _add_atoms(out, frac[sl], centre[sl], window, a[sl], b_total[sl], apix, sampling, D)
    return out.reshape(D, D, D).float().numpy()


def _add_atoms(out: torch.Tensor, frac: np.ndarray, centre: np.ndarray, window: np.ndarray, a: np.ndarray,
               b_total: np.ndarray, apix: float, sampling: str, D: int) -> None:
    """Add ``n`` atoms to the flat ``[D³]`` float64 map ``out``, each on its ``W³`` voxel window.

    ``frac`` ``[n, 3]`` fractional voxel indices ``(x, y, z)``, ``centre`` ``[n, 3]`` their
    rounding, ``window`` ``[W]`` voxel offsets, ``a``/``b_total`` ``[n, 5]`` Gaussian terms;
    voxels outside the box are dropped.
    """
    idx = centre[:, :, None] + window  # [n, 3, W] voxel index per axis
    offsets = (idx - frac[:, :, None]) * apix  # [n, 3, W] Å from the atom
    px, py, pz = (_axis_profiles(offsets[:, k], b_total, apix, sampling) for k in range(3))
    # Σ over the 5 terms of a_t · pz ⊗ py ⊗ px → [n, W, W, W] ordered (z, y, x).
    values = np.einsum("nt,ntz,nty,ntx->nzyx", a, pz, py, px, optimize=True)
    inside = (idx >= 0) & (idx < D)  # [n, 3, W]
    keep = inside[:, 2, :, None, None] & inside[:, 1, None, :, None] & inside[:, 0, None, None, :]
    flat = (idx[:, 2, :, None, None] * D + idx[:, 1, None, :, None]) * D + idx[:, 0, None, None, :]
    out.index_add_(0, torch.from_numpy(flat[keep]), torch.from_numpy(values[keep]))


def displacement_map(
    positions_a,
    positions_b,
    elements: Sequence[ElementLike],
    D: int,
    pixel_size_angstrom: float,
    bfactor_angstrom2: float = DEFAULT_BFACTOR_ANGSTROM2,
    min_density_fraction: float = 0.01,
) -> np.ndarray:
    """Per-voxel atom displacement (Å) between two conformations of the same atoms.

    Each voxel gets the density-weighted mean of ``|positions_b − positions_a|`` over the atoms
    that cover it in either state (weights: each atom's potential at ``a`` plus at ``b``), so the
    region an atom leaves and the region it enters are both marked as moving.

    Parameters
    ----------
    positions_a, positions_b : array-like
        ``[N, 3]`` coordinates (Å, box-centred, ``(x, y, z)``) of the same atoms in two states.
    elements : sequence, length N
    D, pixel_size_angstrom, bfactor_angstrom2
        As for :func:`atoms_to_volume`.
    min_density_fraction : float
        Voxels whose summed density is below this fraction of its maximum are set to 0
        (outside the molecule the ratio is noise).

    Returns
    -------
    np.ndarray
        ``[D, D, D]`` float32 displacement in Å, indexed ``[z, y, x]``.
    """
    pa = np.asarray(positions_a, dtype=np.float64).reshape(-1, 3)
    pb = np.asarray(positions_b, dtype=np.float64).reshape(-1, 3)
    if pa.shape != pb.shape:
        raise ValueError(f"the two states have different atoms: {pa.shape} vs {pb.shape}")
    disp = np.linalg.norm(pb - pa, axis=1)  # [N] Å
    both = np.concatenate([pa, pb])
    els = list(elements) * 2
    kw = dict(bfactor_angstrom2=bfactor_angstrom2)
    weight = atoms_to_volume(both, els, D, pixel_size_angstrom, **kw).astype(np.float64)
    moved = atoms_to_volume(both, els, D, pixel_size_angstrom, occupancy=np.tile(disp, 2), **kw)
    out = np.zeros_like(weight)
    ok = weight > min_density_fraction * weight.max() if weight.max() > 0 else weight > 0
    out[ok] = moved[ok] / weight[ok]
    return out.astype(np.float32)


def center_positions(positions_angstrom, elements: Optional[Sequence[ElementLike]] = None,
                     method: str = "mass") -> Tuple[np.ndarray, np.ndarray]:
    """Shift coordinates so a chosen centre sits at the origin (the box centre).

    Parameters
    ----------
    positions_angstrom : array-like
        ``[N, 3]`` coordinates (Å).
    elements : sequence, optional
        Needed for ``method="mass"``.
    method : {"mass", "centroid", "box"}
        Centre of mass (atomic weights), plain mean, or the middle of the bounding box (best
        for fitting an elongated molecule into the smallest box).

    Returns
    -------
    centred : np.ndarray
        ``[N, 3]`` float64 coordinates.
    centre : np.ndarray
        ``[3]`` the centre that was subtracted (apply it to other states to keep them registered).
    """
    pos = np.asarray(positions_angstrom, dtype=np.float64).reshape(-1, 3)
    if pos.shape[0] == 0:
        raise ValueError("no atoms to centre")
    if method == "mass":
        if elements is None:
            raise ValueError("method='mass' needs the elements")
        w = np.array([gemmi.Element(int(e) if isinstance(e, (int, np.integer)) else str(e)).weight
                      for e in elements])
        centre = (pos * w[:, None]).sum(0) / w.sum()
    elif method == "centroid":
        centre = pos.mean(0)
    elif method == "box":
        centre = 0.5 * (pos.min(0) + pos.max(0))
    else:
        raise ValueError(f"method must be 'mass', 'centroid' or 'box', got {method!r}")
    return pos - centre, centre


def read_atomic_models(path: PathLike, remove_waters: bool = True, remove_hydrogens: bool = True,
                       remove_ligands: bool = False) -> List[Tuple[np.ndarray, List[str]]]:
    """Every model of a PDB / mmCIF file as ``[(positions [N,3] Å, elements), ...]``.

    Alternative conformations are reduced to the first one so no atom is counted twice.
    Coordinates are those of the file (not centred; see :func:`center_positions`).

    Raises
    ------
    InputError
        If the file is missing, unreadable, has no model, or a model has no atoms left, or an
        atom has an unknown element.
    """
    path = require_file(path, "atomic model")
    try:
        st = gemmi.read_structure(path)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IOError for bad files
        raise InputError(path, None, f"cannot read as PDB or mmCIF: {exc}") from exc
    st.remove_alternative_conformations()
    if remove_ligands:
        st.remove_ligands_and_waters()
    elif remove_waters:
        st.remove_waters()
    if remove_hydrogens:
        st.remove_hydrogens()
    if len(st) == 0:
        raise InputError(path, None, "no model (no ATOM/HETATM records) in the file")
    models = []
    for m, model in enumerate(st):
        xyz, els = [], []
        for chain in model:
            for residue in chain:
                for atom in residue:
                    if atom.element.atomic_number == 0:
                        raise InputError(path, f"model {m + 1}", f"atom {residue.name} "
                                         f"{residue.seqid.num} {atom.name} has no known element")
                    xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                    els.append(atom.element.name)
        if not xyz:
            raise InputError(path, f"model {m + 1}", "no atoms left after removing waters/hydrogens")
        models.append((np.asarray(xyz, dtype=np.float64), els))
    return models


def read_atomic_model(path: PathLike, model_index: int = 0, **kwargs) -> Tuple[np.ndarray, List[str]]:
    """One model of a PDB / mmCIF file: ``(positions [N, 3] Å (x, y, z), elements)``.

    ``kwargs`` go to :func:`read_atomic_models` (``remove_waters``, ``remove_hydrogens``,
    ``remove_ligands``). ``model_index`` counts from 0 in file order.
    """
    models = read_atomic_models(path, **kwargs)
    if not -len(models) <= model_index < len(models):
        raise InputError(os.fspath(path), "model_index",
                         f"model {model_index} requested but the file has {len(models)}")
    return models[model_index]
