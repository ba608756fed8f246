"""Lazy particle sources (.mrcs, .txt, .star, .cs) and the atomic stack writer."""

from __future__ import annotations

import os
import pickle

import mrcfile
import numpy as np
import pytest

import cryoformer.io.particles as particles_module
from cryoformer.errors import InputError
from cryoformer.io import StackWriter, open_particles, write_cs, write_stack, write_star
from cryoformer.io.validate import scan_images


def leftovers(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


@pytest.fixture
def two_stacks(tmp_path, rng):
    """stacks/a.mrcs (5 images) and stacks/b.mrcs (3 images), 8×8 px, 1.5 Å/px."""
    (tmp_path / "stacks").mkdir()
    a = rng.normal(size=(5, 8, 8)).astype(np.float32)
    b = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "stacks" / "a.mrcs", a, 1.5)
    write_stack(tmp_path / "stacks" / "b.mrcs", b, 1.5)
    return tmp_path, a, b


def test_stack_round_trip_and_random_access(two_stacks):
    root, a, _ = two_stacks
    src = open_particles(root / "stacks" / "a.mrcs")
    assert len(src) == 5 and src.box_size == 8 and src.pixel_size_angstrom == pytest.approx(1.5)
    np.testing.assert_array_equal(src.images([4, 0, 4, 2]), a[[4, 0, 4, 2]])
    chunks = list(src.chunks(2))
    assert [s for s, _ in chunks] == [0, 2, 4]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), a)
    with mrcfile.open(root / "stacks" / "a.mrcs") as mrc:  # what RELION expects of an .mrcs
        assert mrc.is_image_stack() and mrc.header.mode == 2
        assert float(mrc.voxel_size.x) == pytest.approx(1.5)
        assert float(mrc.header.dmean) == pytest.approx(a.mean(), abs=1e-5)
    clone = pickle.loads(pickle.dumps(src))  # DataLoader workers receive a pickled source
    np.testing.assert_array_equal(clone.images([1]), a[[1]])
    src.close()


def test_txt_list_relative_and_datadir(two_stacks):
    root, a, b = two_stacks
    lst = root / "list.txt"
    lst.write_text("stacks/a.mrcs\n\n# comment\nstacks/b.mrcs\n")
    src = open_particles(lst)
    assert len(src) == 8
    np.testing.assert_array_equal(src.images([6, 1]), np.stack([b[1], a[1]]))
    other = root / "elsewhere"
    other.mkdir()
    (other / "list.txt").write_text("a.mrcs\nb.mrcs\n")
    src = open_particles(other / "list.txt", datadir=root / "stacks")
    np.testing.assert_array_equal(src.images(np.arange(8)), np.concatenate([a, b]))


def test_star_source_with_datadir(two_stacks, monkeypatch):
    root, a, b = two_stacks
    monkeypatch.setattr(particles_module, "MAX_OPEN_STACKS", 1)  # exercise unmapping/reopening
    meta = root / "meta"
    meta.mkdir()
    names = ["000003@Extract/a.mrcs", "000001@Extract/b.mrcs", "000005@Extract/a.mrcs"]
    write_star(meta / "p.star", None, None, names, 1.5)
    src = open_particles(meta / "p.star", datadir=root / "stacks")  # found by base name
    assert len(src) == 3 and src.pixel_size_angstrom == pytest.approx(1.5)
    np.testing.assert_array_equal(src.images([0, 1, 2, 1]), np.stack([a[2], b[0], a[4], b[0]]))


def test_star_index_out_of_range(two_stacks):
    root, _, _ = two_stacks
    star = root / "bad.star"
    write_star(star, None, None, ["000001@stacks/b.mrcs", "000004@stacks/b.mrcs"], 1.5)
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert err.value.path == str(star) and err.value.field == "_rlnImageName"
    assert "image 4" in str(err.value) and "holds 3 images" in str(err.value)


def test_star_missing_stack(two_stacks):
    root, _, _ = two_stacks
    star = root / "missing.star"
    write_star(star, None, None, ["000001@stacks/nothere.mrcs"], 1.5)
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert err.value.path == str(star) and err.value.field == "_rlnImageName"
    assert "nothere.mrcs does not exist" in str(err.value)


def test_cs_source(two_stacks):
    root, a, b = two_stacks
    cs = root / "p.cs"
    with pytest.raises(ValueError, match="box size is unknown"):
        write_cs(cs, None, None, ["stacks/b.mrcs", "stacks/a.mrcs"], [2, 0], pixel_size_angstrom=1.5)
    assert not cs.exists()
    write_cs(cs, None, None, ["stacks/b.mrcs", "stacks/a.mrcs"], [2, 0], pixel_size_angstrom=1.5, box_size=8)
    src = open_particles(cs)
    np.testing.assert_array_equal(src.images([0, 1]), np.stack([b[2], a[0]]))


def test_non_square_images(tmp_path):
    f = tmp_path / "rect.mrcs"
    with mrcfile.new(f) as mrc:
        mrc.set_data(np.zeros((2, 8, 10), np.float32))
    with pytest.raises(InputError, match=r"rect.mrcs.*10×8 pixels but square images are required"):
        open_particles(f)


def test_truncated_and_non_mrc_stack(two_stacks):
    root, _, _ = two_stacks
    data = (root / "stacks" / "a.mrcs").read_bytes()
    cut = root / "cut.mrcs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        open_particles(cut)
    assert err.value.path == str(cut) and "truncated" in str(err.value)
    junk = root / "junk.mrcs"
    junk.write_bytes(b"\x01" * 2000)
    with pytest.raises(InputError, match="junk.mrcs.*not a readable MRC"):
        open_particles(junk)


def test_unknown_extension_and_missing(tmp_path):
    f = tmp_path / "particles.hdf"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match=r"particles.hdf.*unknown particle file extension '\.hdf'"):
        open_particles(f)
    with pytest.raises(InputError, match="gone.mrcs.*does not exist"):
        open_particles(tmp_path / "gone.mrcs")


def test_stack_writer_chunks_out_of_order(tmp_path, rng):
    imgs = rng.normal(size=(7, 6, 6)).astype(np.float32)
    out = tmp_path / "w.mrcs"
    with StackWriter(out, 7, 6, 2.0) as writer:
        writer.write(imgs[4:], 4)
        writer.write(imgs[:4], 0)
    assert os.listdir(tmp_path) == ["w.mrcs"]
    np.testing.assert_array_equal(open_particles(out).images(np.arange(7)), imgs)


def test_stack_writer_error_leaves_nothing(tmp_path, rng):
    out = tmp_path / "w.mrcs"
    with pytest.raises(KeyError):
        with StackWriter(out, 4, 6, 1.0) as writer:
            writer.write(np.zeros((2, 6, 6)))
            raise KeyError("simulated crash half way")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="2 of 4 images were never written"):
        with StackWriter(out, 4, 6, 1.0) as writer:
            writer.write(np.zeros((2, 6, 6)))
    with pytest.raises(ValueError):
        with StackWriter(out, 4, 6, 1.0) as writer:
            writer.write(np.zeros((2, 5, 5)))
    assert os.listdir(tmp_path) == []


def test_star_paths_relative_to_relion_project_directory(tmp_path, rng):
    """RELION writes image paths relative to the project directory, two levels above the job."""
    images = rng.normal(size=(3, 8, 8)).astype(np.float32)
    job = tmp_path / "Extract" / "job005"
    (job / "Movies").mkdir(parents=True)
    write_stack(job / "Movies" / "mic1.mrcs", images, 1.5)
    refine = tmp_path / "Refine3D" / "job010"
    refine.mkdir(parents=True)
    names = [f"{i + 1:06d}@Extract/job005/Movies/mic1.mrcs" for i in (2, 0)]
    write_star(refine / "run_data.star", None, None, names, 1.5)
    source = open_particles(refine / "run_data.star")
    np.testing.assert_array_equal(source.images([0, 1]), images[[2, 0]])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read resident memory")
@pytest.mark.parametrize("release", [True, False])
def test_reading_a_stack_does_not_keep_it_resident(tmp_path, monkeypatch, release):
    """A pass over a mapped stack leaves the process's resident memory where it was: the pages
    read are released (they stay in the kernel's cache). Without the release the same pass
    keeps the whole stack resident, which is what the check measures against."""
    path = str(tmp_path / "big.mrcs")
    n, d = 1024, 128  # 64 MiB of float32 images
    with mrcfile.new_mmap(path, shape=(n, d, d), mrc_mode=2) as mrc:
        # image i holds i plus a ramp along x (not constant: the scan refuses blank images)
        mrc.data[:] = np.arange(n, dtype=np.float32)[:, None, None] + np.linspace(0, 0.5, d, dtype=np.float32)
        mrc.set_image_stack()
    if not release:
        monkeypatch.setattr(particles_module, "_release_pages", lambda data, rows: None)
    src = open_particles(path)
    before = _resident_bytes()
    for start, images in src.chunks(128, check=False):
        assert images[0, 0, 0] == start and images[-1, -1, -1] == start + len(images) - 1 + 0.5
    grown = _resident_bytes() - before
    stack = n * d * d * 4
    if release:
        assert grown < stack / 3, grown  # a chunk or two of copies (8 MiB each), not the stack
        # released pages read back the same
        rows = np.array([5, 900, 5, 17])
        np.testing.assert_array_equal(src.images(rows)[:, 3, 0], rows.astype(np.float32))
        # the start-up scan for NaN and blank images reads the stack the same way
        before = _resident_bytes()
        scan_images(src, progress=False)
        assert _resident_bytes() - before < stack / 3
    else:
        assert grown > 2 * stack / 3, grown  # the measurement sees a resident stack when there is one
    src.close()
