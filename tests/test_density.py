"""Atomic models → potential maps: known integrals, positions, translations, file reading."""

from __future__ import annotations

import time

import gemmi
import numpy as np
import pytest

from cryoformer.errors import InputError
from cryoformer.simulation.density import (
    atoms_to_volume,
    center_positions,
    displacement_map,
    read_atomic_model,
    read_atomic_models,
    scattering_coefficients,
)


def _sum_a(symbol: str) -> float:
    return float(sum(gemmi.Element(symbol).c4322.a))


@pytest.mark.parametrize("symbol", ["C", "S", "Fe"])
def test_integral_of_one_atom_is_sum_of_gaussian_amplitudes(symbol):
    # ∫ a (4π/b)^{3/2} exp(−4π² r²/b) d³r = a, so a whole atom integrates to Σ a_i (Å).
    apix = 1.3
    vol = atoms_to_volume([[0.3, -0.2, 0.1]], [symbol], 32, apix, bfactor_angstrom2=10.0)
    assert vol.dtype == np.float32 and vol.shape == (32, 32, 32)
    assert vol.sum() * apix ** 3 == pytest.approx(_sum_a(symbol), rel=1e-5)


def test_point_sampling_matches_gemmi_density_and_integrates_when_fine():
    apix, D, B = 0.5, 40, 20.0
    vol = atoms_to_volume([[0.0, 0.0, 0.0]], ["N"], D, apix, bfactor_angstrom2=B, sampling="point")
    coef = gemmi.Element("N").c4322
    c = D // 2
    for (z, y, x) in [(c, c, c), (c, c, c + 1), (c + 2, c - 1, c + 3), (c + 5, c, c)]:
        r2 = ((np.array([x, y, z]) - c) * apix) ** 2
        assert vol[z, y, x] == pytest.approx(coef.calculate_density_iso(float(r2.sum()), B), rel=1e-4)
    # Finely sampled (σ ≈ 0.6 Å > voxel), the point samples also integrate to Σ a.
    assert vol.sum() * apix ** 3 == pytest.approx(_sum_a("N"), rel=1e-3)


def test_atom_at_voxel_centre_peaks_there_with_zyx_order():
    apix, D = 2.0, 24
    x, y, z = 2, -3, 1  # voxels from the centre
    vol = atoms_to_volume([[x * apix, y * apix, z * apix]], ["O"], D, apix)
    peak = np.unravel_index(np.argmax(vol), vol.shape)
    assert peak == (D // 2 + z, D // 2 + y, D // 2 + x)
    # Symmetric about the atom along each axis.
    pz, py, px = peak
    assert vol[pz, py, px - 1] == pytest.approx(vol[pz, py, px + 1], rel=1e-6)
    assert vol[pz - 1, py, px] == pytest.approx(vol[pz + 1, py, px], rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_pixel_translation_rolls_the_map_by_one_voxel(axis, rng):
    apix, D = 3.0, 32
    pos = rng.uniform(-25.0, 25.0, size=(40, 3))
    els = ["C", "N", "O", "S"] * 10
    shift = np.zeros(3)
    shift[axis] = apix  # positions are (x, y, z); the map is [z, y, x]
    v0 = atoms_to_volume(pos, els, D, apix)
    v1 = atoms_to_volume(pos + shift, els, D, apix)
    np.testing.assert_allclose(v1, np.roll(v0, 1, axis=2 - axis), rtol=1e-5, atol=1e-6 * v0.max())


def test_occupancy_and_elements_scale_the_map():
    pos = [[1.0, 2.0, -1.0]]
    c = atoms_to_volume(pos, ["C"], 24, 1.5)
    c2 = atoms_to_volume(pos, [6], 24, 1.5, occupancy=[2.0])
    np.testing.assert_allclose(c2, 2 * c, rtol=1e-6)
    s = atoms_to_volume(pos, ["S"], 24, 1.5)
    assert s.sum() / c.sum() == pytest.approx(_sum_a("S") / _sum_a("C"), rel=1e-5)


def test_atoms_outside_the_box_drop_out_and_empty_input_is_zero():
    apix, D = 2.0, 16
    assert atoms_to_volume(np.zeros((0, 3)), [], D, apix).sum() == 0
    assert atoms_to_volume([[100.0, 0.0, 0.0]], ["C"], D, apix).sum() == 0


def test_unknown_element_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="unknown element"):
        scattering_coefficients(["C", "Xx"])
    with pytest.raises(ValueError):
        atoms_to_volume([[0, 0, 0]], ["C", "N"], 8, 1.0)


def test_five_thousand_atoms_in_a_64_box_is_fast(rng):
    pos = rng.uniform(-60.0, 60.0, size=(5000, 3))
    els = ["C", "N", "C", "O", "C"] * 1000
    t0 = time.perf_counter()
    vol = atoms_to_volume(pos, els, 64, 3.5)
    elapsed = time.perf_counter() - t0
    # Measured 0.2–0.6 s on 2 loaded cores (any CPU kernel path): a guard against a rewrite
    # that loops over voxels, with room for a slow or busy machine; not a benchmark.
    assert elapsed < 10.0, f"{elapsed:.2f} s"
    assert vol.sum() * 3.5 ** 3 == pytest.approx(sum(_sum_a(e) for e in els), rel=1e-5)


def test_displacement_map_marks_moving_atoms_only():
    apix, D = 2.0, 32
    a = np.array([[-12.0, 0.0, 0.0], [12.0, 0.0, 0.0]])
    b = a + np.array([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # second atom moves 4 Å along y
    m = displacement_map(a, b, ["C", "C"], D, apix)
    c = D // 2
    assert m[c, c, c - 6] == 0.0  # on the still atom
    assert m[c, c + 1, c + 6] == pytest.approx(4.0, rel=1e-5)  # between old and new place
    assert m[0, 0, 0] == 0.0  # empty space


def test_center_positions():
    pos = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [10.0, 2.0, 0.0]])
    centred, centre = center_positions(pos, method="box")
    np.testing.assert_allclose(centre, [5.0, 1.0, 0.0])
    np.testing.assert_allclose(centred + centre, pos)
    _, c_mass = center_positions(pos[:2], ["C", "S"], method="mass")
    w_c, w_s = gemmi.Element("C").weight, gemmi.Element("S").weight
    assert c_mass[0] == pytest.approx(4.0 * w_s / (w_c + w_s))
    np.testing.assert_allclose(center_positions(pos, method="centroid")[1], pos.mean(0))


def _small_structure() -> gemmi.Structure:
    """Two models; chain A: one ALA (4 heavy atoms + 1 H); a water; a zinc ion."""
    st = gemmi.Structure()
    for m, dz in enumerate((0.0, 1.5)):
        model = gemmi.Model(m + 1)
        chain = gemmi.Chain("A")
        specs = [("ALA", 1, [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"), ("H", "H")]),
                 ("HOH", 2, [("O", "O")]), ("ZN", 3, [("ZN", "Zn")])]
        k = 0
        for resname, num, atoms in specs:
            res = gemmi.Residue()
            res.name, res.seqid = resname, gemmi.SeqId(num, " ")
            res.het_flag = "A" if resname == "ALA" else "H"
            for name, el in atoms:
                atom = gemmi.Atom()
                atom.name, atom.element = name, gemmi.Element(el)
                atom.pos = gemmi.Position(1.0 * k, 2.0, 3.0 + dz)
                atom.occ = 1.0
                res.add_atom(atom)
                k += 1
            chain.add_residue(res)
        model.add_chain(chain)
        st.add_model(model)
    st.setup_entities()
    return st


@pytest.mark.parametrize("ext", ["pdb", "cif"])
def test_read_atomic_model_roundtrip(tmp_path, ext):
    st = _small_structure()
    path = tmp_path / f"model.{ext}"
    if ext == "pdb":
        st.write_pdb(str(path))
    else:
        st.make_mmcif_document().write_file(str(path))
    pos, els = read_atomic_model(path)
    assert els == ["N", "C", "C", "O", "Zn"]  # water and hydrogen removed
    np.testing.assert_allclose(pos[:, 0], [0, 1, 2, 3, 6], atol=1e-3)
    np.testing.assert_allclose(pos[:, 2], 3.0, atol=1e-3)
    models = read_atomic_models(path, remove_waters=False, remove_hydrogens=False)
    assert len(models) == 2 and len(models[1][1]) == 7
    pos2, _ = read_atomic_model(path, model_index=1)
    np.testing.assert_allclose(pos2 - pos, [[0, 0, 1.5]] * 5, atol=1e-3)
    with pytest.raises(InputError, match="model 2 requested"):
        read_atomic_model(path, model_index=2)


def test_read_atomic_model_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_atomic_model(tmp_path / "missing.pdb")
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\nEND\n")
    with pytest.raises(InputError):
        read_atomic_model(empty)
    waters_only = tmp_path / "water.pdb"
    waters_only.write_text(
        "HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00 20.00           O\nEND\n")
    with pytest.raises(InputError, match="no atoms left"):
        read_atomic_model(waters_only)
    garbage = tmp_path / "garbage.cif"
    garbage.write_bytes(b"\x00\x01 not a structure at all")
    with pytest.raises(InputError):
        read_atomic_model(garbage)
