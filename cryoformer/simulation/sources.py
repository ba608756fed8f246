"""Where the state maps of a simulation come from.

Four sources, each returning ``StateMaps``:

* a list of ``.mrc`` maps (one per state),
* atomic models (PDB/mmCIF; one per state, or the models of one multi-model file),
  rendered as electron-scattering potential,
* a molecular-dynamics trajectory sampled into states (MDAnalysis, ``cryoformer[sim]``),
* the embedded hinged molecule (no download; used by the demo and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cryoformer.errors import InputError
from cryoformer.io.mrc import read_volume
from cryoformer.simulation.density import (atoms_to_volume, displacement_map, read_atomic_model,
                                           read_atomic_models)
from cryoformer.simulation.hinged import (HingedMoleculeConfig, domain_motion_maps, hinged_state_volumes,
                                          motion_map)
from cryoformer.simulation.trajectory import load_trajectory_states


@dataclass(frozen=True)
class StateMaps:
    """State maps and what is known about them.

    Attributes
    ----------
    volumes : np.ndarray
        ``[K, D, D, D]`` float32 maps, ``[z, y, x]``.
    pixel_size_angstrom : float
        Voxel size (Å).
    description : str
        Provenance, recorded in ``simulation.json``.
    motion_map : np.ndarray or None
        ``[D, D, D]`` per-voxel displacement (Å) between the first and last state, if known.
    domain_motion_maps : np.ndarray or None
        ``[H, D, D, D]`` displacement (Å) of each independently moving domain alone, if known
        (the embedded molecule with two hinges).
    """

    volumes: np.ndarray
    pixel_size_angstrom: float
    description: str
    motion_map: Optional[np.ndarray] = None
    domain_motion_maps: Optional[np.ndarray] = None


def maps_from_volumes(paths: Sequence[str]) -> StateMaps:
    """Read one ``.mrc`` per state; all must share box size and voxel size."""
    if not paths:
        raise InputError(None, "--volumes", "no volume files given")
    vols, apix0 = [], None
    for path in paths:
        vol, apix = read_volume(path, require_cubic=True)
        if vols and vol.shape != vols[0].shape:
            raise InputError(path, "shape", f"map is {vol.shape} but {paths[0]} is {vols[0].shape}")
        if apix0 is not None and not np.isclose(apix, apix0, rtol=1e-3):
            raise InputError(path, "voxel size", f"{apix:.4f} Å differs from {apix0:.4f} Å of {paths[0]}")
        apix0 = apix if apix0 is None else apix0
        vols.append(vol)
    if vols[0].shape[0] % 2:
        raise InputError(paths[0], "shape", f"box size {vols[0].shape[0]} is odd; an even box is required")
    return StateMaps(np.stack(vols), float(apix0), f"volumes: {', '.join(map(str, paths))}")


def _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2, centre: bool = True):
    """Render ``[(positions, elements), ...]`` with one common centring (the first state's centroid).

    Returns the ``[K, D, D, D]`` maps and the motion map between the first and last state
    (``None`` when the atoms of those states do not correspond one to one).
    """
    # One offset for all states, so the motion between states is kept.
    offset = states[0][0].mean(axis=0) if centre else np.zeros(3)
    vols = np.stack([
        atoms_to_volume(pos - offset, el, box_size, pixel_size_angstrom, bfactor_angstrom2=bfactor_angstrom2)
        for pos, el in states
    ]).astype(np.float32)
    (first, elements), (last, _) = states[0], states[-1]
    motion = None
    if len(states) > 1 and first.shape == last.shape:
        motion = displacement_map(first - offset, last - offset, elements, box_size, pixel_size_angstrom,
                                  bfactor_angstrom2=bfactor_angstrom2)
    return vols, motion


def maps_from_atomic_models(
    paths: Sequence[str], box_size: int, pixel_size_angstrom: float, bfactor_angstrom2: float = 20.0
) -> StateMaps:
    """One state per model file (or per model of a single multi-model file)."""
    _check_box(box_size, pixel_size_angstrom)
    if len(paths) == 1:
        states = read_atomic_models(paths[0])
    else:
        states = [read_atomic_model(p) for p in paths]
    vols, motion = _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2)
    return StateMaps(vols, pixel_size_angstrom, f"atomic models: {', '.join(map(str, paths))}", motion)


def maps_from_trajectory(
    topology: str,
    trajectory: Optional[str],
    n_states: int,
    box_size: int,
    pixel_size_angstrom: float,
    selection: str = "protein and not name H*",
    bfactor_angstrom2: float = 20.0,
) -> StateMaps:
    """``n_states`` frames sampled evenly from an MD trajectory (needs ``cryoformer[sim]``)."""
    _check_box(box_size, pixel_size_angstrom)
    states = load_trajectory_states(topology, trajectory, n_states=n_states, selection=selection)
    # load_trajectory_states has already aligned and centred the frames on frame 0.
    vols, motion = _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2, centre=False)
    return StateMaps(vols, pixel_size_angstrom, f"trajectory: {topology} {trajectory or ''} ({n_states} states)",
                     motion)


def maps_from_hinged_molecule(n_states: int, box_size: int, pixel_size_angstrom: float,
                              n_hinges: int = 1) -> StateMaps:
    """The embedded hinged molecule at ``n_states`` hinge settings (``n_hinges`` arms, see
    :func:`~cryoformer.simulation.hinged.hinged_state_times`); with two hinges the per-arm
    motion maps come too."""
    _check_box(box_size, pixel_size_angstrom)
    if n_hinges not in (1, 2):
        raise InputError(None, "--hinges", f"the embedded molecule has 1 or 2 hinges, got {n_hinges}")
    cfg = HingedMoleculeConfig(n_hinges=n_hinges)
    if n_hinges == 2 and (n_states < 4 or round(np.sqrt(n_states)) ** 2 != n_states):
        raise InputError(None, "--n-states", f"two hinges need a square number of states (a grid of "
                         f"settings per arm: 4, 9, 16, …), got {n_states}")
    vols = hinged_state_volumes(n_states, box_size, pixel_size_angstrom, cfg)
    motion = motion_map(box_size, pixel_size_angstrom, cfg)
    per_domain = domain_motion_maps(box_size, pixel_size_angstrom, cfg) if n_hinges > 1 else None
    label = "" if n_hinges == 1 else f", {n_hinges} independent hinges"
    return StateMaps(np.asarray(vols, np.float32), pixel_size_angstrom,
                     f"embedded hinged molecule ({n_states} states{label})", motion, per_domain)


def _check_box(box_size: int, pixel_size_angstrom: float) -> None:
    if box_size < 8 or box_size % 2:
        raise InputError(None, "--box", f"box size must be an even number >= 8, got {box_size}")
    if not pixel_size_angstrom > 0:
        raise InputError(None, "--apix", f"pixel size must be > 0 Å, got {pixel_size_angstrom}")
