"""States from an MD trajectory (MDAnalysis), on tiny multi-frame files written here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoformer.errors import InputError
from cryoformer.simulation.hinged import (
    HingedMoleculeConfig,
    arm_atom_mask,
    hinged_molecule_atoms,
    hinged_molecule_structure,
)
from cryoformer.simulation.trajectory import (
    guess_element,
    kabsch,
    load_trajectory_states,
    sample_frame_indices,
)

CFG = HingedMoleculeConfig(n_atoms=400, box_fill=None, seed=2)
TIMES = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture
def mda():
    return pytest.importorskip("MDAnalysis")


@pytest.fixture
def tumbling_pdb(tmp_path):
    """Five models of the hinged molecule, each also rotated and moved as a whole."""
    st = hinged_molecule_structure(TIMES, CFG)
    rots = Rotation.random(len(TIMES), random_state=5).as_matrix()
    rots[0] = np.eye(3)
    for model, R, shift in zip(st, rots, np.arange(len(TIMES))[:, None] * [3.0, -2.0, 5.0]):
        for chain in model:
            for res in chain:
                for atom in res:
                    p = R @ np.array([atom.pos.x, atom.pos.y, atom.pos.z]) + shift
                    atom.pos = type(atom.pos)(*p)
    path = tmp_path / "traj.pdb"
    st.write_pdb(str(path))
    return path


def test_sample_frame_indices():
    np.testing.assert_array_equal(sample_frame_indices(5, 3), [0, 2, 4])
    np.testing.assert_array_equal(sample_frame_indices(10, 1), [0])
    with pytest.raises(ValueError):
        sample_frame_indices(3, 4)


def test_kabsch_recovers_a_rigid_motion(rng):
    x = rng.normal(size=(30, 3)) * 10
    R = Rotation.random(random_state=2).as_matrix()
    y = x @ R.T + [1.0, -4.0, 2.5]
    R_est, cm, cr = kabsch(x, y)
    np.testing.assert_allclose((x - cm) @ R_est.T + cr, y, atol=1e-9)
    # a mirror image is not "superimposed" by a reflection
    assert np.linalg.det(kabsch(x, y * [1, 1, -1])[0]) == pytest.approx(1.0)


def test_guess_element():
    assert guess_element("CA", "ALA") == "C"
    assert guess_element("CA", "CA") == "Ca"
    assert guess_element("ZN", "ZN") == "Zn"
    assert guess_element("1HB", "ALA") == "H"
    assert guess_element("OXT") == "O"
    assert guess_element("123") is None


def test_frames_sampled_superimposed_on_the_body(mda, tumbling_pdb):
    states = load_trajectory_states(tumbling_pdb, n_states=3, align_selection="chainID A")
    assert len(states) == 3
    arm = arm_atom_mask(CFG)
    ref_els = hinged_molecule_atoms(0.0, CFG)[1]
    for (pos, els), t in zip(states, (0.0, 0.5, 1.0)):
        assert els == ref_els
        truth, _ = hinged_molecule_atoms(t, CFG)
        # Registered on the body of frame 0 and centred on its centroid: equal to the ground
        # truth up to that one translation and the PDB's 0.001 Å rounding.
        offset = (truth - pos)[~arm].mean(0)
        np.testing.assert_allclose(pos + offset, truth, atol=5e-3)
    np.testing.assert_allclose(states[0][0].mean(0), 0.0, atol=1e-9)
    moved = np.linalg.norm(states[2][0] - states[0][0], axis=1)
    assert moved[~arm].max() < 5e-3 and moved[arm].max() > 10.0


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_separate_topology_and_trajectory_files(mda, tumbling_pdb, tmp_path):
    universe = mda.Universe(str(tumbling_pdb))
    dcd = tmp_path / "traj.dcd"
    with mda.Writer(str(dcd), universe.atoms.n_atoms) as writer:
        for _ in universe.trajectory:
            writer.write(universe.atoms)
    top = tmp_path / "top.pdb"
    universe.trajectory[0]
    universe.atoms.write(str(top))
    states = load_trajectory_states(top, dcd, n_states=5, align=False, center=False)
    assert len(states) == 5
    np.testing.assert_allclose(states[4][0], universe.trajectory[4].positions, atol=1e-3)


def test_elements_guessed_when_the_topology_has_none(mda, tumbling_pdb, tmp_path):
    lines = tumbling_pdb.read_text().splitlines()
    stripped = tmp_path / "noelem.pdb"
    stripped.write_text("\n".join(l[:76] if l.startswith(("ATOM", "HETATM")) else l for l in lines) + "\n")
    states = load_trajectory_states(stripped, n_states=2)
    assert states[0][1] == hinged_molecule_atoms(0.0, CFG)[1]


def test_input_errors(mda, tumbling_pdb, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_trajectory_states(tmp_path / "missing.pdb")
    with pytest.raises(InputError, match="selects no atoms"):
        load_trajectory_states(tumbling_pdb, n_states=2, selection="resname XYZ")
    with pytest.raises(InputError, match="6 states requested from 5 frames"):
        load_trajectory_states(tumbling_pdb, n_states=6)
    bad = tmp_path / "bad.pdb"
    bad.write_bytes(b"\x00\x01\x02")
    with pytest.raises(InputError):
        load_trajectory_states(bad, n_states=1)
