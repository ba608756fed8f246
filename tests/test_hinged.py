"""The embedded hinged molecule: rigid body, moving arm, determinism, box fit, motion map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cryoformer.simulation.density import atoms_to_volume, read_atomic_models
from cryoformer.simulation.hinged import (
    HingedMoleculeConfig,
    arm_atom_mask,
    domain_atom_labels,
    domain_motion_maps,
    hinged_molecule_atoms,
    hinged_molecule_structure,
    hinged_molecule_volume,
    hinged_state_times,
    hinged_state_volumes,
    motion_map,
    swept_radius,
)

D, APIX = 32, 7.0  # the default molecule at its design size (fills 60 % of 224 Å)


def _rotation_angle(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def test_body_is_rigid_and_arm_rotates_by_the_hinge_angle():
    cfg = HingedMoleculeConfig()
    p0, els = hinged_molecule_atoms(0.0, cfg)
    p1, els1 = hinged_molecule_atoms(1.0, cfg)
    arm = arm_atom_mask(cfg)
    assert els == els1 and len(els) == len(p0) and set(els) == {"C", "N", "O"}
    assert 0.15 < arm.mean() < 0.5
    np.testing.assert_array_equal(p0[~arm], p1[~arm])  # the body does not move at all
    # The arm moves rigidly: the best rotation between its two poses is the hinge range.
    a0, a1 = p0[arm] - p0[arm].mean(0), p1[arm] - p1[arm].mean(0)
    U, _, Vt = np.linalg.svd(a0.T @ a1)
    R = Vt.T @ U.T
    assert _rotation_angle(R) == pytest.approx(45.0, abs=1e-6)
    np.testing.assert_allclose(a0 @ R.T, a1, atol=1e-8)
    # Bond-scale spacing along the chain (N–CA).
    assert np.linalg.norm(p0[1] - p0[0]) == pytest.approx(1.46, abs=1e-6)


def test_deterministic_given_seed_and_different_otherwise():
    p_a, _ = hinged_molecule_atoms(0.3, HingedMoleculeConfig(seed=3))
    p_b, _ = hinged_molecule_atoms(0.3, HingedMoleculeConfig(seed=3))
    p_c, _ = hinged_molecule_atoms(0.3, HingedMoleculeConfig(seed=4))
    np.testing.assert_array_equal(p_a, p_b)
    assert p_a.shape != p_c.shape or not np.allclose(p_a, p_c)


def test_n_atoms_and_motion_parameter_checks():
    p, _ = hinged_molecule_atoms(0.0, HingedMoleculeConfig(n_atoms=1000, box_fill=None))
    assert len(p) == 1000
    with pytest.raises(ValueError):
        hinged_molecule_atoms(1.5)
    np.testing.assert_allclose(hinged_state_times(5), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(hinged_state_times(1), [0.0])


@pytest.mark.parametrize("d, apix", [(32, 7.0), (32, 3.5), (48, 3.0)])
def test_fitted_molecule_fills_sixty_percent_of_the_box(d, apix):
    fitted = HingedMoleculeConfig().fitted(d, apix)
    assert fitted.box_fill is None
    assert swept_radius(fitted) == pytest.approx(0.3 * d * apix, rel=0.08)


def test_volumes_differ_only_where_the_arm_is_and_keep_their_sum():
    cfg = HingedMoleculeConfig().fitted(D, APIX)
    vols = hinged_state_volumes(3, D, APIX, cfg)
    assert vols.shape == (3, D, D, D) and vols.dtype == np.float32
    np.testing.assert_allclose(vols[1], hinged_molecule_volume(0.5, D, APIX, cfg))
    # Same atoms, all inside the box: the total potential is the same in every state.
    sums = vols.reshape(3, -1).sum(1)
    np.testing.assert_allclose(sums, sums[0], rtol=1e-5)
    # Voxels the arm reaches in neither state are bit-for-bit the body alone.
    arm = arm_atom_mask(cfg)
    arm_maps = []
    for t in (0.0, 1.0):
        pos, els = hinged_molecule_atoms(t, cfg)
        arm_maps.append(atoms_to_volume(pos[arm], [e for e, a in zip(els, arm) if a], D, APIX))
    body_only = (arm_maps[0] == 0) & (arm_maps[1] == 0)
    assert body_only.sum() > 0.9 * D ** 3
    np.testing.assert_allclose(vols[0][body_only], vols[2][body_only], rtol=1e-6, atol=1e-9)
    # ... and where the arm is, the maps do change.
    arm_region = np.maximum(arm_maps[0], arm_maps[1]) > 0.1 * vols[0].max()
    assert np.abs(vols[0] - vols[2])[arm_region].mean() > 0.05 * vols[0].max()


def test_default_config_renders_any_box_inside_the_sphere():
    vol = hinged_molecule_volume(1.0, 24, 5.0)  # default config, auto-fitted
    c = np.arange(24) - 12
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    assert vol[r > 11].sum() < 1e-3 * vol.sum()  # nothing leaves the projection sphere


def test_motion_map_is_high_on_the_arm_and_zero_on_the_body():
    cfg = HingedMoleculeConfig().fitted(D, APIX)
    m = motion_map(D, APIX, cfg)
    assert m.shape == (D, D, D) and m.dtype == np.float32
    arm = arm_atom_mask(cfg)
    p0, els = hinged_molecule_atoms(0.0, cfg)
    p1, _ = hinged_molecule_atoms(1.0, cfg)
    body_map = atoms_to_volume(p0[~arm], [e for e, a in zip(els, arm) if not a], D, APIX)
    arm_maps = [atoms_to_volume(p[arm], [e for e, a in zip(els, arm) if a], D, APIX) for p in (p0, p1)]
    arm_any = arm_maps[0] + arm_maps[1]
    body_voxels = (body_map > 0.05 * body_map.max()) & (arm_any == 0)
    arm_voxels = (arm_any > 0.2 * arm_any.max()) & (body_map < 1e-3 * body_map.max())
    assert body_voxels.sum() > 50 and arm_voxels.sum() > 20
    assert np.all(m[body_voxels] == 0.0)
    max_disp = np.linalg.norm(p1 - p0, axis=1).max()
    assert m.max() <= max_disp + 1e-3
    assert np.median(m[arm_voxels]) > 0.3 * max_disp
    # A threshold separates them perfectly: ROC-AUC 1 for "moving vs still".
    assert m[arm_voxels].min() > m[body_voxels].max()


def test_structure_writes_and_reads_back(tmp_path):
    cfg = dataclasses.replace(HingedMoleculeConfig(n_atoms=500, box_fill=None), seed=1)
    st = hinged_molecule_structure([0.0, 1.0], cfg)
    path = tmp_path / "hinged.pdb"
    st.write_pdb(str(path))
    models = read_atomic_models(path)
    assert len(models) == 2
    for t, (pos, els) in zip((0.0, 1.0), models):
        ref, ref_els = hinged_molecule_atoms(t, cfg)
        assert els == ref_els
        np.testing.assert_allclose(pos, ref, atol=1e-3)


# ---------------------------------------------------------------- the optional second hinge
def test_two_hinges_move_independently_and_the_body_stays():
    cfg = HingedMoleculeConfig(n_hinges=2, n_atoms=3000, box_fill=None)
    domain = domain_atom_labels(cfg)
    assert set(np.unique(domain)) == {0, 1, 2} and np.array_equal(arm_atom_mask(cfg), domain > 0)
    p00, _ = hinged_molecule_atoms((0.0, 0.0), cfg)
    p10, _ = hinged_molecule_atoms((1.0, 0.0), cfg)
    p01, _ = hinged_molecule_atoms((0.0, 1.0), cfg)
    moved_first = np.linalg.norm(p10 - p00, axis=1) > 1e-9
    moved_second = np.linalg.norm(p01 - p00, axis=1) > 1e-9
    assert np.array_equal(moved_first, domain == 1) and np.array_equal(moved_second, domain == 2)
    # Each arm turns rigidly through the whole hinge range about its own axis.
    for moved, a, b in ((domain == 1, p00, p10), (domain == 2, p00, p01)):
        a0, a1 = a[moved] - a[moved].mean(0), b[moved] - b[moved].mean(0)
        U, _, Vt = np.linalg.svd(a0.T @ a1)
        assert _rotation_angle(Vt.T @ U.T) == pytest.approx(45.0, abs=1e-6)
    # A single number moves both arms; one hinge keeps the original molecule exactly.
    np.testing.assert_array_equal(hinged_molecule_atoms(1.0, cfg)[0], hinged_molecule_atoms((1.0, 1.0), cfg)[0])
    one = dataclasses.replace(cfg, n_hinges=1)
    assert arm_atom_mask(one).mean() < 0.75 * arm_atom_mask(cfg).mean()  # same atoms, one arm fewer
    with pytest.raises(ValueError):
        hinged_molecule_atoms((0.0, 0.5, 1.0), cfg)
    with pytest.raises(ValueError):
        HingedMoleculeConfig(n_hinges=3)
    st = hinged_molecule_structure([(0.0, 1.0)], cfg)  # chain C holds the second arm
    assert [ch.name for ch in st[0]] == ["A", "B", "C"]
    assert sum(len(ch) for ch in st[0]) * 5 == len(p00) and len(st[0]["C"]) * 5 == np.sum(domain == 2)


def test_two_hinge_states_are_a_grid_and_arms_uncorrelated():
    t = hinged_state_times(9, 2)
    assert t.shape == (9, 2)
    assert {tuple(row) for row in t} == {(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)}
    assert abs(np.corrcoef(t.T)[0, 1]) < 1e-12
    with pytest.raises(ValueError):
        hinged_state_times(10, 2)


def test_two_hinge_truth_has_two_separate_motion_regions():
    cfg = HingedMoleculeConfig(n_hinges=2).fitted(D, APIX)
    per_domain = domain_motion_maps(D, APIX, cfg)
    assert per_domain.shape == (2, D, D, D) and per_domain.dtype == np.float32
    moving = per_domain > APIX  # more than one voxel
    assert moving[0].sum() > 30 and moving[1].sum() > 30
    assert not np.any(moving[0] & moving[1])  # no voxel is moved by both arms
    centres = [np.argwhere(m).mean(0) for m in moving]
    assert np.linalg.norm(centres[0] - centres[1]) * APIX > 60.0  # Å: opposite sides of the body
    total = motion_map(D, APIX, cfg)  # both arms through their whole range
    for m in moving:
        assert np.median(total[m]) > APIX
    # The atoms render inside the projection sphere in every corner of the motion grid.
    assert swept_radius(cfg) == pytest.approx(0.3 * D * APIX, rel=0.08)


def test_simulate_two_hinges_writes_each_arm_motion(tmp_path):
    from cryoformer.cli import main
    from cryoformer.io.mrc import read_volume

    out = tmp_path / "sim"
    assert main(["simulate", "--hinges", "2", "--n-states", "4", "-D", "32", "--Apix", "7", "-n", "8",
                 "-o", str(out)]) == 0
    maps = [read_volume(out / "gt" / f"motion_domain_{h}.mrc")[0] for h in range(2)]
    assert all(m.max() > 7.0 for m in maps) and not np.any((maps[0] > 7.0) & (maps[1] > 7.0))
    assert (out / "gt" / "motion.mrc").is_file() and len(list((out / "gt").glob("state_*.mrc"))) == 4
    assert main(["simulate", "--hinges", "2", "--n-states", "5", "-D", "32", "--Apix", "7", "-n", "8",
                 "-o", str(tmp_path / "bad")]) != 0
