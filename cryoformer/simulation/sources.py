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
    """

    volumes: np.ndarray
    pixel_size_angstrom: float
    description: str
    motion_map: Optional[np.ndarray] = None


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


def _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2):
    """Render ``[(positions, elements), ...]`` centred on the first state's centroid."""
    from cryoformer.simulation.density import atoms_to_volume

    centre = states[0][0].mean(axis=0)
    vols = [
        atoms_to_volume(pos - centre, el, box_size, pixel_size_angstrom, bfactor_angstrom2=bfactor_angstrom2)
        for pos, el in states
    ]
    return np.stack(vols).astype(np.float32)


def maps_from_atomic_models(
    paths: Sequence[str], box_size: int, pixel_size_angstrom: float, bfactor_angstrom2: float = 20.0
) -> StateMaps:
    """One state per model file (or per model of a single multi-model file)."""
    import gemmi

    from cryoformer.simulation.density import read_atomic_model

    _check_box(box_size, pixel_size_angstrom)
    states = []
    if len(paths) == 1:
        n_models = len(gemmi.read_structure(str(paths[0])))
        states = [read_atomic_model(paths[0], model_index=i) for i in range(n_models)]
    else:
        states = [read_atomic_model(p) for p in paths]
    vols = _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2)
    return StateMaps(vols, pixel_size_angstrom, f"atomic models: {', '.join(map(str, paths))}",
                     _displacement_map(states, box_size, pixel_size_angstrom))


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
    from cryoformer.simulation.trajectory import load_trajectory_states

    _check_box(box_size, pixel_size_angstrom)
    states = load_trajectory_states(topology, trajectory, n_states=n_states, selection=selection)
    vols = _render_states(states, box_size, pixel_size_angstrom, bfactor_angstrom2)
    return StateMaps(vols, pixel_size_angstrom, f"trajectory: {topology} {trajectory or ''} ({n_states} states)",
                     _displacement_map(states, box_size, pixel_size_angstrom))


def maps_from_hinged_molecule(n_states: int, box_size: int, pixel_size_angstrom: float) -> StateMaps:
    """The embedded hinged molecule at ``n_states`` evenly spaced hinge angles."""
    from cryoformer.simulation.hinged import HingedMoleculeConfig, hinged_state_volumes, motion_map

    _check_box(box_size, pixel_size_angstrom)
    cfg = HingedMoleculeConfig()
    vols = hinged_state_volumes(n_states, box_size, pixel_size_angstrom, cfg)
    motion = motion_map(box_size, pixel_size_angstrom, cfg)
    return StateMaps(np.asarray(vols, np.float32), pixel_size_angstrom,
                     f"embedded hinged molecule ({n_states} states)", motion)


def _displacement_map(states, box_size, pixel_size_angstrom) -> Optional[np.ndarray]:
    """Per-voxel atom displacement (Å) between first and last state, when atoms correspond."""
    first, last = states[0][0], states[-1][0]
    if len(states) < 2 or first.shape != last.shape:
        return None
    disp = np.linalg.norm(last - first, axis=1)  # [N_atoms] Å
    centre = first.mean(axis=0)
    idx = np.rint((first - centre) / pixel_size_angstrom).astype(int) + box_size // 2  # [N_atoms, 3] (x,y,z)
    keep = np.all((idx >= 0) & (idx < box_size), axis=1)
    out = np.zeros((box_size,) * 3, np.float32)
    # Max displacement of the atoms falling in each voxel, indexed [z, y, x].
    np.maximum.at(out, (idx[keep, 2], idx[keep, 1], idx[keep, 0]), disp[keep].astype(np.float32))
    return out


def _check_box(box_size: int, pixel_size_angstrom: float) -> None:
    if box_size < 8 or box_size % 2:
        raise InputError(None, "--box", f"box size must be an even number >= 8, got {box_size}")
    if not pixel_size_angstrom > 0:
        raise InputError(None, "--apix", f"pixel size must be > 0 Å, got {pixel_size_angstrom}")
