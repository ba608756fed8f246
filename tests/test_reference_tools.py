"""cryoformer against the real tools: outputs of RELION 3.1.3 and cryoDRGN 4.3.1 committed in
``tests/data/reference/`` (made by ``scripts/make_reference_data.sh``; see the README there).

Nothing here runs RELION or cryoDRGN. What is checked:

* poses and CTF parameters we parse from RELION 3.0 / 3.1 / 5 STAR files and a cryoSPARC
  ``.cs`` file equal what cryoDRGN's ``parse_pose_*`` / ``parse_ctf_*`` wrote for them;
* our ``compute_ctf`` / ``ctf_images`` equal cryoDRGN's ``compute_ctf``;
* our ``project`` equals ``relion_project`` (and cryoDRGN's image-formation model) at the poses
  of ``relion31.star``, and with ``--ctf`` equals ``-(projection ⊛ CTF)`` (SPEC §2).
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryoformer.io import (
    ctf_from_cs,
    ctf_from_star,
    load_pickle,
    open_particles,
    poses_from_cs,
    poses_from_star,
    read_cs,
    read_ctf_pkl,
    read_poses_pkl,
    read_star,
    read_volume,
)
from cryoformer.physics import (
    apply_ctf,
    compute_ctf,
    ctf_images,
    euler_relion_to_matrix,
    frequency_grid_2d,
    matrix_to_axis_angle,
    project,
)

pytestmark = pytest.mark.reference

REF = Path(__file__).parent / "data" / "reference"
D = 32

# Tolerances. Rotations: cryoDRGN keeps float64 (STAR) or float32 (.cs); ours are float32.
ROT_ATOL = 1e-5
SHIFT_ATOL = 1e-5  # pixels
MIN_CORRELATION = 0.99  # per image, noise-free (SPEC §2)

# (file stem, keyword arguments that mirror the cryoDRGN command line used for it)
STAR_CASES = [
    ("relion30", dict(box_size=32)),  # parse_pose_star -D 32
    ("relion30_converted_by_relion31", dict(box_size=32)),
    ("relion31", {}),
    ("relion31_particles_first", {}),
    ("relion31_two_optics", {}),
    ("relion5", {}),
]
STAR_CTF_CASES = [
    ("relion30", dict(box_size=32, pixel_size_angstrom=2.0)),  # parse_ctf_star -D 32 --Apix 2.0
    ("relion30_converted_by_relion31", dict(box_size=32)),
    ("relion31", {}),
    ("relion31_particles_first", {}),
    ("relion31_two_optics", {}),
    ("relion5", {}),
]


def _cryodrgn_poses(stem: str):
    rot, trans = load_pickle(REF / f"{stem}.cryodrgn_poses.pkl")
    return np.asarray(rot, dtype=np.float64), np.asarray(trans, dtype=np.float64) * D


def _cryodrgn_ctf(stem: str) -> np.ndarray:
    return np.asarray(load_pickle(REF / f"{stem}.cryodrgn_ctf.pkl"))


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _stack(name: str) -> np.ndarray:
    with mrcfile.open(REF / name, permissive=False) as mrc:
        return np.array(mrc.data, dtype=np.float32)  # a writable copy


@pytest.fixture(scope="module")
def truth():
    return np.load(REF / "truth.npz")


# --------------------------------------------------------------------------- parsing: poses
@pytest.mark.parametrize("stem,kwargs", STAR_CASES, ids=[c[0] for c in STAR_CASES])
def test_star_poses_match_cryodrgn(stem, kwargs):
    poses = poses_from_star(read_star(REF / f"{stem}.star"), **kwargs)
    rot, shifts = _cryodrgn_poses(stem)
    assert len(poses) == len(rot) == 20
    np.testing.assert_allclose(poses.rotations, rot, rtol=0, atol=ROT_ATOL)
    np.testing.assert_allclose(poses.shifts_px, shifts, rtol=0, atol=SHIFT_ATOL)


@pytest.mark.parametrize("stem,kwargs", STAR_CASES, ids=[c[0] for c in STAR_CASES])
def test_read_cryodrgn_pose_pkl(stem, kwargs):
    """Our reader of cryoDRGN's own pose pickles (numpy-2 pickles, float64 arrays)."""
    poses = read_poses_pkl(REF / f"{stem}.cryodrgn_poses.pkl", box_size=D)
    rot, shifts = _cryodrgn_poses(stem)
    np.testing.assert_allclose(poses.rotations, rot, rtol=0, atol=ROT_ATOL)
    np.testing.assert_allclose(poses.shifts_px, shifts, rtol=0, atol=SHIFT_ATOL)
    assert poses.box_size == D


def test_star_poses_are_relion_matrices(truth):
    """The rotations are RELION's Euler_angles2matrix of (rot, tilt, psi), origins in px."""
    rot, shifts = _cryodrgn_poses("relion31")
    np.testing.assert_allclose(rot, truth["rotations"], rtol=0, atol=ROT_ATOL)
    np.testing.assert_allclose(shifts, truth["shifts_px"], rtol=0, atol=SHIFT_ATOL)
    ours = euler_relion_to_matrix(torch.tensor(truth["euler_deg"], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, rot, rtol=0, atol=ROT_ATOL)


def test_two_optics_groups_use_their_own_pixel_size(truth):
    """rlnOriginXAngst is divided by the pixel size of each particle's optics group."""
    poses = poses_from_star(read_star(REF / "relion31_two_optics.star"))
    np.testing.assert_allclose(poses.shifts_px, truth["shifts_px"], rtol=0, atol=SHIFT_ATOL)
    ctf = ctf_from_star(read_star(REF / "relion31_two_optics.star"))
    group = truth["group_two_optics"]
    np.testing.assert_allclose(ctf.column("pixel_size_angstrom"), np.where(group == 1, 2.0, 1.6), rtol=1e-6)
    np.testing.assert_allclose(ctf.column("voltage_kv"), np.where(group == 1, 300.0, 200.0), rtol=1e-6)


def test_cs_poses_match_cryodrgn():
    poses = poses_from_cs(REF / "cryosparc.cs")
    rot, shifts = _cryodrgn_poses("cryosparc")
    np.testing.assert_allclose(poses.rotations, rot, rtol=0, atol=ROT_ATOL)
    np.testing.assert_allclose(poses.shifts_px, shifts, rtol=0, atol=SHIFT_ATOL)


def test_cs_axis_angle_is_transposed_rotation(truth):
    """cryoSPARC stores log(Rᵀ): our matrix_to_axis_angle of Rᵀ gives the file's vectors."""
    cs = read_cs(REF / "cryosparc.cs")
    rt = torch.tensor(np.swapaxes(truth["rotations"], 1, 2))
    np.testing.assert_allclose(matrix_to_axis_angle(rt).numpy(), cs["alignments3D/pose"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- parsing: CTF
@pytest.mark.parametrize("stem,kwargs", STAR_CTF_CASES, ids=[c[0] for c in STAR_CTF_CASES])
def test_star_ctf_matches_cryodrgn(stem, kwargs):
    ctf = ctf_from_star(read_star(REF / f"{stem}.star"), **kwargs)
    np.testing.assert_allclose(ctf.array, _cryodrgn_ctf(stem), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(read_ctf_pkl(REF / f"{stem}.cryodrgn_ctf.pkl").array, _cryodrgn_ctf(stem))


def test_relion30_pixel_size_from_detector_and_magnification():
    """cryoDRGN needs --Apix for RELION 3.0; we derive 5 µm · 1e4 / 25000 = 2.0 Å ourselves."""
    ctf = ctf_from_star(read_star(REF / "relion30.star"), box_size=D)
    np.testing.assert_allclose(ctf.array, _cryodrgn_ctf("relion30"), rtol=1e-6, atol=1e-6)


def test_star_ctf_overrides_match_cryodrgn():
    """parse_ctf_star -D 32 --Apix 2.0 --kv 200 --cs 2.0 -w 0.08 --ps 15 (file values replaced)."""
    ctf = ctf_from_star(
        read_star(REF / "relion30.star"), box_size=32, pixel_size_angstrom=2.0, voltage_kv=200,
        spherical_aberration_mm=2.0, amplitude_contrast=0.08, phase_shift_deg=15,
    )
    np.testing.assert_allclose(ctf.array, _cryodrgn_ctf("relion30_overrides"), rtol=1e-6, atol=1e-6)


def test_relion5_bfactor_is_read(truth):
    ctf = ctf_from_star(read_star(REF / "relion5.star"))
    assert ctf.bfactor_angstrom2 is not None
    np.testing.assert_allclose(ctf.bfactor_angstrom2, truth["bfactor_relion5"], rtol=0, atol=1e-5)


def test_cs_ctf_matches_cryodrgn():
    ctf = ctf_from_cs(REF / "cryosparc.cs")
    np.testing.assert_allclose(ctf.array, _cryodrgn_ctf("cryosparc"), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- CTF values
@pytest.fixture(scope="module")
def ctf_reference():
    return np.load(REF / "ctf_cryodrgn.npz")


@pytest.mark.parametrize("dtype,key", [(torch.float32, "ctf_float32"), (torch.float64, "ctf_float64")])
def test_compute_ctf_matches_cryodrgn(ctf_reference, dtype, key):
    """Same inputs (0-d tensors of ``dtype``, as cryoDRGN was called) → the same numbers."""
    for i, name in enumerate(ctf_reference["names"]):
        apix, dfu, dfv, ang, kv, cs, w, phase, bfac = ctf_reference["params"][i]

        def t(v):
            return torch.tensor(v, dtype=dtype)

        freqs = frequency_grid_2d(D, float(apix), dtype=dtype)
        ours = compute_ctf(
            freqs, t(dfu), t(dfv), t(ang), t(kv), t(cs), t(w), t(phase),
            None if np.isnan(bfac) else t(bfac),
        )
        np.testing.assert_allclose(ours.numpy(), ctf_reference[key][i], rtol=0, atol=1e-6, err_msg=str(name))


def test_ctf_images_match_cryodrgn(ctf_reference):
    p = ctf_reference["params"]
    array = np.column_stack([np.full(len(p), D), p[:, :8]])  # cryoDRGN [N, 9] order
    bfactor = np.nan_to_num(p[:, 8], nan=0.0)  # exp(-0·s²/4) = 1: no envelope
    ours = ctf_images(torch.tensor(array, dtype=torch.float64), bfactor=bfactor)
    np.testing.assert_allclose(ours.numpy(), ctf_reference["ctf_float64"], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- projections
@pytest.fixture(scope="module")
def relion31_projection():
    vol, voxel = read_volume(REF / "volume_D32.mrc")
    assert vol.shape == (D, D, D) and voxel == pytest.approx(2.0)
    poses = poses_from_star(read_star(REF / "relion31.star"))
    images = project(torch.from_numpy(vol), torch.from_numpy(poses.rotations), torch.from_numpy(poses.shifts_px))
    return images


def test_project_matches_relion_project(relion31_projection):
    """relion_project --i volume_D32.mrc --ang relion31.star (no CTF), origins applied."""
    corr = _correlations(relion31_projection.numpy(), _stack("proj_relion.mrcs"))
    assert corr.min() > MIN_CORRELATION, corr


def test_project_matches_cryodrgn_model():
    vol, _ = read_volume(REF / "volume_D32.mrc")
    poses = read_poses_pkl(REF / "relion31.cryodrgn_poses.pkl", box_size=D)
    images = project(torch.from_numpy(vol), torch.from_numpy(poses.rotations), torch.from_numpy(poses.shifts_px))
    corr = _correlations(images.numpy(), _stack("proj_cryodrgn.mrcs"))
    assert corr.min() > MIN_CORRELATION, corr


def test_relion_and_cryodrgn_projections_agree():
    """The two tools agree with each other (so the shift/rotation conventions are shared)."""
    corr = _correlations(_stack("proj_relion.mrcs"), _stack("proj_cryodrgn.mrcs"))
    assert corr.min() > MIN_CORRELATION, corr


def test_wrong_conventions_do_not_match():
    """Guard against a vacuous pass: the opposite shift sign or the transposed rotation must
    clearly fail the comparison (median correlation far below the threshold)."""
    vol = torch.from_numpy(read_volume(REF / "volume_D32.mrc")[0])
    poses = poses_from_star(read_star(REF / "relion31.star"))
    rot, shifts = torch.from_numpy(poses.rotations), torch.from_numpy(poses.shifts_px)
    relion = _stack("proj_relion.mrcs")
    flipped_shift = _correlations(project(vol, rot, -shifts).numpy(), relion)
    transposed = _correlations(project(vol, rot.transpose(1, 2), shifts).numpy(), relion)
    assert np.median(flipped_shift) < 0.9, flipped_shift
    assert np.median(transposed) < 0.9, transposed


def test_relion_ctf_projection_is_negative_projection_times_ctf(relion31_projection):
    """SPEC §2: relion_project --ctf = -(projection ⊛ cryoDRGN CTF)."""
    ctf = ctf_from_star(read_star(REF / "relion31.star"))
    relion = _stack("proj_relion_ctf.mrcs")
    cryodrgn_convention = apply_ctf(relion31_projection, ctf_images(ctf.array)).numpy()
    assert _correlations(cryodrgn_convention, relion).max() < -MIN_CORRELATION
    relion_convention = apply_ctf(relion31_projection, ctf_images(ctf.array, invert_contrast=True)).numpy()
    corr = _correlations(relion_convention, relion)
    assert corr.min() > MIN_CORRELATION, corr


def test_relion_ctf_is_exactly_negated_cryodrgn_ctf():
    """On RELION's own projections the relation is exact: slope -1, correlation ≈ -1."""
    ctf = ctf_from_star(read_star(REF / "relion31.star"))
    plain = torch.from_numpy(_stack("proj_relion.mrcs"))
    with_ctf = _stack("proj_relion_ctf.mrcs").astype(np.float64)
    ours = apply_ctf(plain, ctf_images(ctf.array, invert_contrast=True)).numpy().astype(np.float64)
    assert _correlations(ours, with_ctf).min() > 0.99999
    slope = (ours * with_ctf).sum((1, 2)) / (ours * ours).sum((1, 2))
    np.testing.assert_allclose(slope, 1.0, atol=1e-4)


def test_open_particles_reads_relion_output_star():
    """The STAR file relion_project wrote points at its .mrcs; reading through it gives the stack."""
    source = open_particles(REF / "proj_relion.star")
    assert len(source) == 20 and source.box_size == D
    assert source.pixel_size_angstrom == pytest.approx(2.0)
    np.testing.assert_array_equal(np.asarray(source.images(np.arange(20))), _stack("proj_relion.mrcs"))
