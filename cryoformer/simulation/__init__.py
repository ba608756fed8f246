"""cryoformer.simulation: ground-truth maps and synthetic datasets.

* :mod:`~cryoformer.simulation.density`: atomic models → electron-scattering potential maps.
* :mod:`~cryoformer.simulation.hinged`: the embedded procedural hinged molecule (no download).
* :mod:`~cryoformer.simulation.trajectory`: states from an MD trajectory (``cryoformer[sim]``).
"""

from cryoformer.simulation.density import (
    atoms_to_volume,
    center_positions,
    displacement_map,
    read_atomic_model,
    read_atomic_models,
)
from cryoformer.simulation.hinged import (
    HingedMoleculeConfig,
    hinged_molecule_atoms,
    hinged_molecule_structure,
    hinged_molecule_volume,
    hinged_state_times,
    hinged_state_volumes,
    motion_map,
)
from cryoformer.simulation.trajectory import load_trajectory_states

__all__ = [
    "atoms_to_volume",
    "center_positions",
    "displacement_map",
    "read_atomic_model",
    "read_atomic_models",
    "HingedMoleculeConfig",
    "hinged_molecule_atoms",
    "hinged_molecule_structure",
    "hinged_molecule_volume",
    "hinged_state_times",
    "hinged_state_volumes",
    "motion_map",
    "load_trajectory_states",
]
