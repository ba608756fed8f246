"""Conformational states from a molecular-dynamics trajectory (needs ``cryoformer[sim]``).

MDAnalysis reads the topology (PDB, GRO, PSF, TPR, ...) and trajectory (DCD, XTC, TRR, a
multi-model PDB, ...). Frames are sampled evenly, the selected atoms of every frame are
superimposed on the first sampled frame (Kabsch, so rigid tumbling in the box does not count as
conformational change), and returned as ``(positions, elements)`` ready for
:func:`cryoformer.simulation.density.atoms_to_volume`.
"""

from __future__ import annotations

import re
import warnings
from typing import List, Optional, Tuple

import gemmi
import numpy as np

from cryoformer.errors import InputError, PathLike, require_file


def sample_frame_indices(n_frames: int, n_states: int) -> np.ndarray:
    """``[n_states]`` evenly spaced frame indices from ``0`` to ``n_frames − 1`` inclusive."""
    if n_states < 1:
        raise ValueError("n_states must be >= 1")
    if n_states > n_frames:
        raise ValueError(f"{n_states} states requested from {n_frames} frames")
    return np.rint(np.linspace(0, n_frames - 1, n_states)).astype(np.int64)


def kabsch(mobile: np.ndarray, reference: np.ndarray, weights: Optional[np.ndarray] = None
           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rigid motion superimposing ``mobile`` on ``reference`` (least squares, no reflection).

    Parameters
    ----------
    mobile, reference : np.ndarray
        ``[n, 3]`` corresponding points.
    weights : np.ndarray, optional
        ``[n]`` non-negative weights.

    Returns
    -------
    R : np.ndarray
        ``[3, 3]`` rotation.
    c_mobile, c_reference : np.ndarray
        ``[3]`` weighted centroids; the superimposed points are ``(x − c_mobile) @ R.T + c_reference``.
    """
    w = np.ones(len(mobile)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    cm = w @ mobile
    cr = w @ reference
    H = (mobile - cm).T @ ((reference - cr) * w[:, None])  # [3, 3] cross-covariance
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0  # −1 would be a reflection: flip the last axis
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return R, cm, cr


def guess_element(name: str, resname: str = "") -> Optional[str]:
    """Element symbol from a PDB-style atom name, or ``None``.

    Digits are dropped (``"1HB" → "H"``). Two letters are used only for single-atom residues
    whose name is the residue name (ions such as ``ZN``/``ZN``, ``CL``/``CL``); otherwise the first
    letter, since in macromolecules ``CA`` is a C-alpha, not calcium.
    """
    letters = re.sub(r"[^A-Za-z]", "", name)
    if not letters:
        return None
    if resname and resname.strip().upper() == name.strip().upper() and len(letters) >= 2:
        candidate = letters[:2].capitalize()
        if gemmi.Element(candidate).atomic_number > 0:
            return candidate
    candidate = letters[0].upper()
    return candidate if gemmi.Element(candidate).atomic_number > 0 else None


def _elements_of(atoms, path: str) -> List[str]:
    """Element symbols of an AtomGroup: from the topology where present, else guessed."""
    try:
        given = [str(e) for e in atoms.elements]
    except (AttributeError, ValueError):  # MDAnalysis NoDataError when the topology has none
        given = [""] * len(atoms)
    out = []
    for el, name, resname in zip(given, atoms.names, atoms.resnames):
        el = el.strip().capitalize()
        if not el or gemmi.Element(el).atomic_number == 0:
            el = guess_element(str(name), str(resname))
        if el is None:
            raise InputError(path, "elements", f"cannot tell the element of atom {resname} {name}")
        out.append(el)
    return out


def load_trajectory_states(
    topology_path: PathLike,
    trajectory_path: Optional[PathLike] = None,
    n_states: int = 10,
    selection: str = "protein and not name H*",
    align: bool = True,
    align_selection: Optional[str] = None,
    center: bool = True,
) -> List[Tuple[np.ndarray, List[str]]]:
    """Evenly sampled frames of a trajectory as atomic states.

    Parameters
    ----------
    topology_path : str or path-like
        Topology file (or a multi-model PDB holding the frames itself).
    trajectory_path : str or path-like, optional
        Coordinates file; ``None`` uses the frames in the topology file.
    n_states : int
        Number of frames to return, evenly spaced from the first to the last frame.
    selection : str
        MDAnalysis selection of the atoms to keep (default: protein heavy atoms).
    align : bool
        Superimpose every frame on the first sampled frame (Kabsch on ``align_selection``).
    align_selection : str, optional
        Atoms to superimpose on (a subset of ``selection``, e.g. a rigid domain so a hinge
        motion is measured relative to it); default ``selection``.
    center : bool
        Subtract the first sampled frame's centroid (of the selection) from every frame, so the
        states share one box-centred frame.

    Returns
    -------
    list of (np.ndarray, list of str)
        ``n_states`` pairs ``(positions [N, 3] float64 Å (x, y, z), elements)``, same atoms
        in the same order in every state.

    Raises
    ------
    InputError
        MDAnalysis missing, unreadable files, empty selection, too few frames, unknown elements.
    """
    try:
        import MDAnalysis as mda  # optional dependency (cryoformer[sim]): imported only when used
    except ImportError as exc:
        raise InputError(None, "MDAnalysis", "reading trajectories needs MDAnalysis: "
                         "pip install 'cryoformer[sim]'") from exc
    topology = require_file(topology_path, "topology")
    files = [topology] + ([require_file(trajectory_path, "trajectory")] if trajectory_path else [])
    try:
        with warnings.catch_warnings():
            # We fill in missing elements ourselves (see _elements_of); MDAnalysis's advice
            # about guessing them would only confuse.
            warnings.filterwarnings("ignore", message="Element information is missing")
            universe = mda.Universe(*files)
    except Exception as exc:  # MDAnalysis raises many types for bad files
        raise InputError(files[-1], None, f"MDAnalysis cannot read it: {exc}") from exc
    atoms, ref_atoms = _select_atoms(universe, topology, selection, align_selection, align)
    n_frames = len(universe.trajectory)
    try:
        frames = sample_frame_indices(n_frames, n_states)
    except ValueError as exc:
        raise InputError(files[-1], "n_states", str(exc)) from exc
    elements = _elements_of(atoms, topology)
    states = _frame_positions(universe, frames, atoms, ref_atoms, align)
    if center:
        centre = states[0].mean(axis=0)
        states = [p - centre for p in states]
    return [(p, list(elements)) for p in states]


def _select_atoms(universe, topology: str, selection: str, align_selection: Optional[str], align: bool):
    """The kept atoms and the atoms superimposed on (AtomGroups), checked non-empty."""
    try:
        atoms = universe.select_atoms(selection)
        ref_atoms = universe.select_atoms(align_selection) if align_selection else atoms
    except Exception as exc:
        raise InputError(topology, "selection", f"bad selection: {exc}") from exc
    if len(atoms) == 0:
        raise InputError(topology, "selection", f"{selection!r} selects no atoms")
    if align and len(ref_atoms) < 3:
        raise InputError(topology, "align_selection", "need at least 3 atoms to superimpose")
    return atoms, ref_atoms


def _frame_positions(universe, frames: np.ndarray, atoms, ref_atoms, align: bool) -> List[np.ndarray]:
    """``[N, 3]`` float64 positions (Å) of ``atoms`` at each frame, superimposed (Kabsch on
    ``ref_atoms``) on the first frame when ``align``."""
    states, reference = [], None
    for f in frames:
        universe.trajectory[int(f)]
        pos = atoms.positions.astype(np.float64)  # [N, 3] Å
        ref_pos = ref_atoms.positions.astype(np.float64)
        if align:
            if reference is None:
                reference = ref_pos
            else:
                R, cm, cr = kabsch(ref_pos, reference)
                pos = (pos - cm) @ R.T + cr
        states.append(pos)
    return states
