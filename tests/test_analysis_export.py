"""Export of chosen particles: verbatim star rows, cryoSPARC .cs / index, cryoDRGN pickle."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from cryoformer.analysis.export import (export_run, filter_star_rows, load_selection, select_clusters,
                                       to_original_indices, write_cs_subset, write_index_npy,
                                       write_index_pkl)
from cryoformer.errors import InputError
from cryoformer.io import open_particles, read_cs, read_star, write_cs, write_stack, write_star
from cryoformer.io.safe_pickle import load_pickle
from cryoformer.metadata import CtfParameters, Poses


def metadata(n, D=32, apix=2.5, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    q *= np.sign(np.linalg.det(q))[:, None, None]
    poses = Poses(q, rng.uniform(-3, 3, (n, 2)), box_size=D)
    ctf = CtfParameters.from_columns(n, box_size=D, pixel_size_angstrom=apix,
                                     defocus_u_angstrom=rng.uniform(1e4, 2e4, n),
                                     defocus_v_angstrom=rng.uniform(1e4, 2e4, n),
                                     astigmatism_angle_deg=rng.uniform(0, 180, n), voltage_kv=300.0,
                                     spherical_aberration_mm=2.7, amplitude_contrast=0.1,
                                     phase_shift_deg=0.0)
    return poses, ctf


@pytest.fixture
def star_file(tmp_path):
    poses, ctf = metadata(12)
    path = tmp_path / "particles.star"
    write_star(path, poses, ctf, [f"{i + 1:06d}@stack.mrcs" for i in range(12)], 2.5,
               extra_columns={"rlnRandomSubset": np.arange(12) % 2 + 1, "rlnClassNumber": np.arange(12)})
    return path


def data_rows(path):
    """Non-header lines of the particles loop (the rows as text)."""
    lines = open(path).read().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
    return [line for line in lines[start + 1:] if line.strip()]


def test_star_rows_copied_verbatim(tmp_path, star_file):
    idx = np.array([1, 4, 5, 11])
    out = tmp_path / "sub.star"
    assert filter_star_rows(star_file, out, idx) == 4
    assert data_rows(out) == [data_rows(star_file)[i] for i in idx]
    a, b = read_star(star_file), read_star(out)
    assert list(a.particles.columns) == list(b.particles.columns)
    pd.testing.assert_frame_equal(a.particles.iloc[idx].reset_index(drop=True), b.particles)
    pd.testing.assert_frame_equal(a.optics, b.optics)


def test_star_written_elsewhere_still_reaches_its_stacks(tmp_path, star_file):
    """Exported into another folder, the relative stack names are made absolute; everything
    else stays as it was, and the new file opens the same images without --datadir."""
    write_stack(tmp_path / "stack.mrcs", np.arange(12 * 16, dtype=np.float32).reshape(12, 4, 4), 2.5)
    idx = np.array([2, 7, 9])
    out = tmp_path / "elsewhere" / "deeper" / "sub.star"
    assert filter_star_rows(star_file, out, idx) == 3
    a, b = read_star(star_file), read_star(out)
    stack = str(tmp_path / "stack.mrcs")
    assert list(b.particles["rlnImageName"]) == [f"{i + 1:06d}@{stack}" for i in idx]
    rest = [c for c in a.particles.columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(a.particles.iloc[idx][rest].reset_index(drop=True), b.particles[rest])
    np.testing.assert_array_equal(open_particles(out).images([0, 1, 2]),
                                  open_particles(star_file).images(idx))


def test_star_relion30_single_block(tmp_path):
    path = tmp_path / "old.star"
    with open(path, "w") as fh:
        fh.write("\ndata_\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnMagnification #3\n")
        for i in range(5):
            fh.write(f"{i + 1:06d}@s.mrcs  {10000 + i:.3f}  50000\n")
    out = tmp_path / "sub.star"
    filter_star_rows(path, out, np.array([0, 3]))
    assert read_star(out).particles["rlnDefocusU"].tolist() == [10000.0, 10003.0]
    with pytest.raises(InputError, match="beyond"):
        filter_star_rows(path, out, np.array([7]))


def test_cs_subset_and_indices(tmp_path):
    poses, ctf = metadata(10)
    src = tmp_path / "particles.cs"
    write_cs(src, poses, ctf, "stack.mrcs", np.arange(10))
    idx = np.array([0, 2, 9])
    write_cs_subset(src, tmp_path / "sub.cs", idx)
    a, b = read_cs(src), read_cs(tmp_path / "sub.cs")
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a[idx], b)
    write_index_npy(tmp_path / "ind.npy", idx)
    np.testing.assert_array_equal(np.load(tmp_path / "ind.npy"), idx)
    write_index_pkl(tmp_path / "ind.pkl", idx)
    back = load_pickle(tmp_path / "ind.pkl")
    assert back.dtype == np.int64 and back.tolist() == [0, 2, 9]


def test_selection_and_clusters(tmp_path):
    labels = np.array([0, 1, 2, 1, 0])
    assert select_clusters(labels, [1, 2]).tolist() == [1, 2, 3]
    with pytest.raises(InputError, match=r"out of range.*0…2"):
        select_clusters(labels, [3])
    np.save(tmp_path / "mask.npy", labels == 1)
    assert load_selection(tmp_path / "mask.npy", 5).tolist() == [1, 3]
    np.save(tmp_path / "rows.npy", np.array([4, 0, 4]))
    assert load_selection(tmp_path / "rows.npy", 5).tolist() == [0, 4]
    write_index_pkl(tmp_path / "rows.pkl", np.array([2]))
    assert load_selection(tmp_path / "rows.pkl", 5).tolist() == [2]
    with pytest.raises(InputError, match="0…4"):
        load_selection(_save(tmp_path, [5]), 5)
    with pytest.raises(InputError, match="6 entries"):
        np.save(tmp_path / "bad.npy", np.ones(6, bool))
        load_selection(tmp_path / "bad.npy", 5)
    # Run rows map to the original stack through the training subset (--ind).
    assert to_original_indices(np.array([2, 0]), np.array([10, 20, 30])).tolist() == [10, 30]


def _save(tmp_path, values):
    path = tmp_path / "sel.npy"
    np.save(path, np.asarray(values))
    return path


class FakeRun:
    """What export_run reads from a TrainedRun."""

    def __init__(self, particles, poses, ctf, particle_indices, box=32, apix=2.5):
        self.paths = {"particles": str(particles), "poses": str(poses), "ctf": str(ctf), "datadir": None}
        self.particle_indices = np.asarray(particle_indices)
        self.box_size, self.pixel_size_angstrom = box, apix


def test_export_run_writes_new_star_from_mrcs_input(tmp_path):
    from cryoformer.io import write_ctf_pkl, write_poses_pkl, write_stack

    poses, ctf = metadata(8)
    write_stack(tmp_path / "stack.mrcs", np.zeros((8, 32, 32), np.float32), 2.5)
    write_poses_pkl(poses, tmp_path / "poses.pkl")
    write_ctf_pkl(ctf, tmp_path / "ctf.pkl")
    run = FakeRun(tmp_path / "stack.mrcs", tmp_path / "poses.pkl", tmp_path / "ctf.pkl", [1, 3, 5, 7])
    os.makedirs(tmp_path / "out")
    info = export_run(run, np.array([0, 2]), "star", tmp_path / "out" / "sel.star")
    star = read_star(tmp_path / "out" / "sel.star")
    assert info["n_particles"] == 2
    assert star.particles["rlnImageName"].tolist() == ["000002@../stack.mrcs", "000006@../stack.mrcs"]
    np.testing.assert_allclose(star.particles["rlnDefocusU"], ctf.column("defocus_u_angstrom")[[1, 5]], rtol=1e-6)
    export_run(run, np.array([3]), "pkl", tmp_path / "sel.pkl")
    assert load_pickle(tmp_path / "sel.pkl").tolist() == [7]
