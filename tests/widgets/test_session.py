"""The run session both front ends share, without any GUI: LRU cache, background decoding,
K-means (the default of ``cryoformer analyze``), latent choices, selections, labels."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

import cryoformer_widgets
from cryoformer.analysis import (AnalyzeConfig, attention_stack, kmeans, load_selection,
                                 to_original_indices)
from cryoformer.cli import main
from cryoformer.errors import InputError
from cryoformer.io import image_locations, read_star
from cryoformer.io.guard import OutputError
from cryoformer.trainer import load_run
from cryoformer_widgets.decode_worker import DecodeWorker, VolumeCache, latent_key
from cryoformer_widgets.session import (DEFAULT_K, ExplorerState, RunSession, points_in_polygon,
                                        stratified_subsample)


@pytest.fixture(scope="module")
def run(spread_run):
    return load_run(spread_run)


def real_decoder(run, calls=None, gate=None):
    """The model's own decode, optionally counting calls / waiting on a gate (to hold the worker busy)."""
    def decode(z, D):
        if calls is not None:
            calls.append(np.array(z))
        if gate is not None:
            assert gate.wait(30)
        with torch.no_grad():
            return run.model.decode_volume(z, D)
    return decode


def test_volume_cache_is_lru():
    cache = VolumeCache(max_items=2)
    a, b, c = (np.full((2, 2, 2), v, np.float32) for v in (1, 2, 3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a          # "a" is now the most recently used
    cache.put("c", c)                   # evicts "b"
    assert "b" not in cache and cache.get("b") is None
    assert cache.get("a") is a and cache.get("c") is c
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)
    assert not a.flags.writeable        # shared volumes cannot be modified by a caller


def test_latent_key_float32_rounding():
    z64 = np.array([0.1, -2.0, 3.3], np.float64)
    assert latent_key(z64, 16) == latent_key(z64.astype(np.float32), 16)
    assert latent_key(z64, 16) != latent_key(z64, 32)
    assert latent_key(z64, 16) != latent_key(z64 + 1e-3, 16)


def test_background_decode_equals_direct_and_cache_hits(run):
    calls, results, busy = [], [], []
    worker = DecodeWorker(real_decoder(run, calls), run.box_size, cache_size=4,
                          on_result=results.append, on_busy=lambda b, m: busy.append(b))
    try:
        z = run.latents[3]
        res = worker.submit(z, tag="p3").result(30)
        direct = run.model.decode_volume(z).cpu().numpy()
        assert res.ok and not res.cached and res.tag == "p3" and res.seconds > 0
        np.testing.assert_allclose(res.volume, direct, rtol=0, atol=1e-6)
        assert busy == [True, False] and not worker.busy
        again = worker.submit(z.astype(np.float64), tag="again")  # resolved at once, in this thread
        assert again.done() and again.result().cached and again.result().volume is res.volume
        assert len(calls) == 1 and worker.cache.hits == 1
        assert [r.tag for r in results] == ["p3", "again"]
        other = worker.submit(run.latents[30]).result(30)
        assert not other.cached and len(calls) == 2
        assert np.abs(other.volume - res.volume).max() > 1e-3  # spread latents decode differently
        np.testing.assert_array_equal(worker.decode_now(run.latents[30]), other.volume)  # cached
        assert len(calls) == 2
    finally:
        worker.shutdown()


def test_newest_request_supersedes_waiting_ones(run):
    gate = threading.Event()
    calls, results = [], []
    worker = DecodeWorker(real_decoder(run, calls, gate), run.box_size, on_result=results.append)
    try:
        first = worker.submit(run.latents[0], tag=0)
        time.sleep(0.05)
        assert worker.busy
        middle = [worker.submit(run.latents[i], tag=i) for i in (1, 2)]
        last = worker.submit(run.latents[5], tag=5)
        gate.set()
        assert last.result(30).ok
        assert [f.result(30).superseded for f in middle] == [True, True]
        assert first.result(30).ok and not first.result(30).superseded  # already running: finished
        assert [r.tag for r in results] == [0, 5] and len(calls) == 2
        assert worker.wait(5).tag == 5 and not worker.busy
    finally:
        worker.shutdown()


def test_decode_errors_are_reported_not_raised(run):
    results, messages = [], []
    worker = DecodeWorker(real_decoder(run), run.box_size, on_result=results.append,
                          on_busy=lambda b, m: messages.append((b, m)))
    try:
        bad = worker.submit(np.zeros(run.latents.shape[1] + 2, np.float32)).result(30)  # wrong zdim
        assert bad.volume is None and "ValueError" in bad.error and "zdim" in bad.error
        assert worker.last_error == bad.error and results[-1] is bad
        assert messages[-1] == (False, bad.error)
        good = worker.submit(run.latents[0]).result(30)  # the worker goes on
        assert good.ok
    finally:
        worker.shutdown()


def test_state_kmeans_pca_and_labels(run, tiny_dataset):
    st = RunSession(run, k=3)
    try:
        rows = tiny_dataset.run_rows
        assert st.n_particles == rows.size and st.n_pcs == 3
        km = kmeans(st.latents, 3, seed=0)
        np.testing.assert_array_equal(st.labels["kmeans"], km.labels)
        np.testing.assert_array_equal(st.center_rows, km.center_indices)
        assert "computed" in st.kmeans_source
        # ground-truth states given for the whole stack are mapped through the --ind subset
        gt = np.load(tiny_dataset.sim / "gt" / "state.npy")
        assert gt.size > rows.size
        np.testing.assert_array_equal(st.add_labels("true state", gt), gt[rows])
        # the spread latents form one group per state: K-means finds them
        pairs = set(zip(st.labels["kmeans"].tolist(), st.labels["true state"].tolist()))
        assert len(pairs) == 3
        with pytest.raises(ValueError, match="labels"):
            st.add_labels("bad", np.arange(5))
        zs = st.traversal_latents(2, 5)
        assert zs.shape == (5, 3)
        assert st.voxel_size_angstrom == pytest.approx(12.0)  # 6 Å × 32 / 16
    finally:
        st.close()


def test_state_reads_kmeans_labels_of_analyze(spread_run, tmp_path):
    """``RUN/analysis/kmeans_labels.npy`` (cryoformer analyze) is used when it matches the epoch."""
    run_dir = tmp_path / "run"
    shutil.copytree(spread_run, run_dir)
    assert main(["analyze", str(run_dir), "--k", "2", "--n-traversal", "2"]) == 0
    st = RunSession(str(run_dir), k=5)
    try:
        labels = np.load(run_dir / "analysis" / "kmeans_labels.npy")
        np.testing.assert_array_equal(st.labels["kmeans"], labels)
        np.testing.assert_array_equal(st.center_rows, np.load(run_dir / "analysis" / "kmeans_center_indices.npy"))
        assert st.kmeans_source.endswith("kmeans_labels.npy")
        # analyze's UMAP (umap-learn is installed with the umap extra) becomes two scatter axes.
        np.testing.assert_array_equal(st.coords(("UMAP1", "UMAP2")), np.load(run_dir / "analysis" / "umap.npy"))
        assert st.axis_names() == ["PC1", "PC2", "PC3", "UMAP1", "UMAP2", "z0", "z1", "z2"]
        assert st.umap_source.endswith("umap.npy")
        # … and two continuous colourings
        np.testing.assert_array_equal(st.colouring("UMAP2").values, np.load(run_dir / "analysis" / "umap.npy")[:, 1])
        assert st.colourings()[0] == "kmeans" and {"UMAP1", "UMAP2", "defocus_angstrom"} <= set(st.colourings())
    finally:
        st.close()
    info = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    info["epoch"] = 99  # labels (and a UMAP) of another epoch are not used
    (run_dir / "analysis" / "analysis.json").write_text(json.dumps(info))
    st = RunSession(str(run_dir), k=3)
    try:
        assert "computed" in st.kmeans_source and st.labels["kmeans"].max() == 2
        assert st.umap is None and "UMAP1" not in st.axis_names()
    finally:
        st.close()


def test_axes_pcs_umap_and_latent_dimensions(spread_run, tmp_path):
    """Scatter axes: PCs, latent dimensions, and UMAP only where analyze wrote umap.npy for the epoch."""
    run_dir = tmp_path / "run"
    shutil.copytree(spread_run, run_dir)
    st = RunSession(str(run_dir), k=3)
    try:
        z, proj = st.latents, st.pca.projections
        assert st.axis_names() == ["PC1", "PC2", "PC3", "z0", "z1", "z2"] and st.umap is None
        assert "epoch" in st.umap_source
        np.testing.assert_array_equal(st.coords((1, 3)), proj[:, [0, 2]])  # PC numbers, as before
        np.testing.assert_array_equal(st.coords(("z2", "PC1")), np.stack([z[:, 2], proj[:, 0]], 1))
        with pytest.raises(ValueError, match="cryoformer analyze"):
            st.coords(("UMAP1", "UMAP2"))
        for bad in ("z3", "PC0", "PC4", "x1", 7):
            with pytest.raises(ValueError, match="unknown axis"):
                st.axis_values(bad)
        # A box on two latent dimensions selects on those coordinates, over every particle.
        np.testing.assert_array_equal(st.select_polygon([[0, -9], [9, -9], [9, 9], [0, 9]], ("z0", "z1")),
                                      np.nonzero(z[:, 0] > 0)[0])
        zt = st.traversal_latents(1, 3)[2]
        np.testing.assert_allclose(st.position(zt, ("PC1", "z1")), [st.pc_coords(zt)[0], zt[1]], atol=1e-5)
    finally:
        st.close()

    # A UMAP of analyze for this epoch (no analysis.json: taken as this epoch's); a known layout.
    epoch = load_run(str(run_dir)).epoch
    folder = run_dir / f"analysis.{epoch}"
    folder.mkdir()
    umap = np.stack([np.arange(z.shape[0]), -2.0 * np.arange(z.shape[0])], 1).astype(np.float32)  # [N, 2]
    np.save(folder / "umap.npy", umap)
    st = RunSession(str(run_dir), k=3)
    try:
        assert st.axis_names() == ["PC1", "PC2", "PC3", "UMAP1", "UMAP2", "z0", "z1", "z2"]
        np.testing.assert_array_equal(st.coords(("UMAP2", "z0")), np.stack([umap[:, 1], z[:, 0]], 1))
        rows = st.select_polygon([[4.5, -100], [9.5, -100], [9.5, 100], [4.5, 100]], ("UMAP1", "UMAP2"))
        np.testing.assert_array_equal(rows, [5, 6, 7, 8, 9])
        # A particle has a UMAP position (its row); a latent between particles has none.
        np.testing.assert_allclose(st.position(z[7], ("UMAP1", "z1"), row=7), [7.0, z[7, 1]], atol=1e-6)
        assert st.position(zt, ("UMAP1", "PC1")) is None
    finally:
        st.close()
    # A file of the wrong shape (another run's, a partial write) is not offered.
    np.save(folder / "umap.npy", umap[:-1])
    st = RunSession(str(run_dir), k=3)
    try:
        assert st.umap is None and "UMAP1" not in st.axis_names()
    finally:
        st.close()


def test_stratified_subsample_keeps_every_cluster():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=300_000, p=[0.7, 0.25, 0.0499, 0.0001])  # one cluster of ~30
    t0 = time.perf_counter()
    rows = stratified_subsample(labels, 20_000, seed=1)
    assert time.perf_counter() - t0 < 2.0
    assert rows.size <= 20_000 and rows.size > 19_000
    assert np.all(np.diff(rows) > 0) and rows.max() < labels.size
    drawn = np.bincount(labels[rows], minlength=4)
    full = np.bincount(labels, minlength=4)
    assert drawn[3] == full[3]                          # the rare cluster is drawn entirely
    np.testing.assert_allclose(drawn[:2] / rows.size, full[:2] / labels.size, atol=0.01)
    np.testing.assert_array_equal(rows, stratified_subsample(labels, 20_000, seed=1))
    np.testing.assert_array_equal(stratified_subsample(labels[:100], 20_000), np.arange(100))


def test_points_in_polygon_against_brute_force():
    xy = np.random.default_rng(2).uniform(-1, 1, (300_000, 2))
    inside = points_in_polygon(xy, [[-0.5, -0.5], [0.5, -0.5], [0.5, 0.25], [-0.5, 0.25]])
    expect = np.nonzero((np.abs(xy[:, 0]) < 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < 0.25))[0]
    np.testing.assert_array_equal(inside, expect)
    with pytest.raises(ValueError, match="at least 3"):
        points_in_polygon(xy, [[0, 0], [1, 1]])


def test_selection_save_and_export_round_trip(run, tmp_path, tiny_dataset):
    st = RunSession(run, k=3)
    try:
        rows = st.select_polygon([[-10, -10], [0, -10], [0, 10], [-10, 10]], pcs=(1, 2))
        xy = st.coords((1, 2))
        np.testing.assert_array_equal(rows, np.nonzero(xy[:, 0] < 0)[0])
        st.select_rows([0, 1], mode="add")
        st.select_rows([1], mode="remove")
        expect = np.setdiff1d(np.union1d(rows, [0, 1]), [1])
        np.testing.assert_array_equal(st.selection, expect)
        path = st.save_selection(tmp_path / "sel" / "chosen.npy")
        np.testing.assert_array_equal(load_selection(path, st.n_particles), st.selection)
        info = st.export_selection(tmp_path / "chosen.star", "star")
        star = read_star(tmp_path / "chosen.star")
        original = read_star(tiny_dataset.sim / "particles.star")
        want = to_original_indices(st.selection, run.particle_indices)
        assert info["n_particles"] == len(star) == st.selection.size
        # Same images (the exported file sits elsewhere, so its stack paths are absolute).
        where = image_locations(original)
        assert image_locations(star) == [where[i] for i in want]
        # Never replaced without force; the run's own star never, even with it.
        before = (tmp_path / "chosen.star").read_bytes()
        with pytest.raises(OutputError, match="already exists"):
            st.export_selection(tmp_path / "chosen.star", "star")
        assert (tmp_path / "chosen.star").read_bytes() == before
        with pytest.raises(OutputError, match="is also an input"):
            st.export_selection(tiny_dataset.sim / "particles.star", "star", force=True)
        assert st.export_selection(tmp_path / "chosen.star", "star", force=True)["n_particles"] == len(star)
        st.clear_selection()
        with pytest.raises(ValueError, match="nothing is selected"):
            st.export_selection(tmp_path / "none.star")
        with pytest.raises(ValueError, match="rows must lie"):
            st.select_rows([st.n_particles])
    finally:
        st.close()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # atomic writes left nothing


# ---------------------------------------------------------------- one session for both front ends
@pytest.fixture(scope="module")
def session(tiny_run):
    """The shared tiny run (tests/widgets/conftest.py: box 16 at 12 Å/px, zdim 3, stack rows 4…39)."""
    st = RunSession(tiny_run, k=3, device="cpu")
    yield st
    st.close()


def test_explorer_state_is_the_session():
    assert ExplorerState is RunSession
    assert cryoformer_widgets.ExplorerState is RunSession and cryoformer_widgets.RunSession is RunSession


def test_default_k_is_that_of_analyze(run):
    """Without labels of ``cryoformer analyze``, a session clusters as analyze does by default."""
    assert DEFAULT_K == AnalyzeConfig().k
    st = RunSession(run)
    try:
        km = kmeans(st.latents, AnalyzeConfig().k, seed=AnalyzeConfig().seed)
        assert st.n_clusters == km.k == DEFAULT_K
        np.testing.assert_array_equal(st.labels["kmeans"], km.labels)
        np.testing.assert_array_equal(st.center_rows, km.center_indices)
        assert f"K = {DEFAULT_K}" in st.kmeans_source
    finally:
        st.close()


def test_latent_choices(session):
    run = session.run
    z0, label = session.from_pcs([0.0])
    np.testing.assert_allclose(z0, session.pca.mean, rtol=1e-6, atol=1e-9)  # PC origin = mean latent
    z1, _ = session.from_pcs([0.5, -0.25])
    expected = session.pca.mean + 0.5 * session.pca.components[0] - 0.25 * session.pca.components[1]
    np.testing.assert_allclose(z1, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(session.pc_coords(z1), [0.5, -0.25, 0.0], atol=1e-5)
    assert "PC1=0.5" in session.from_pcs([0.5])[1]
    for c in range(3):
        zc, label = session.from_cluster(c)
        row = session.center_rows[c]
        np.testing.assert_array_equal(zc, run.latents[row])  # centres are particles' latents
        assert label == f"cluster {c} (particle {run.particle_indices[row]})"
    assert session.cluster_names()[0].startswith("cluster 0 (n=")
    assert [int(n.split("n=")[1][:-1]) for n in session.cluster_names()] == np.bincount(
        session.labels["kmeans"], minlength=3).tolist()
    # The run trained on stack rows 4…39 only: row 2 of the run is stack particle 6.
    np.testing.assert_array_equal(session.from_particle(6, original=True)[0], run.latents[2])
    assert session.from_particle(2)[1] == "particle 6"
    assert session.describe_row(2) == f"particle 2 (stack index 6, cluster {session.labels['kmeans'][2]})"
    with pytest.raises(ValueError, match="not part of this run"):
        session.from_particle(3, original=True)
    with pytest.raises(ValueError, match="out of range"):
        session.from_cluster(3)
    with pytest.raises(ValueError, match="outside"):
        session.from_particle(session.n_particles)
    lo, hi = session.pc_range(1)
    assert lo < hi
    z, label = session.from_traversal(2, 99, 5)  # steps beyond the last are clamped
    np.testing.assert_array_equal(z, session.traversal_latents(2, 5)[4])
    assert label == "PC2 step 5/5"


def test_open_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        RunSession(str(tmp_path))


def test_volumes_and_attention_go_through_the_one_decoder(session):
    run = session.run
    z, _ = session.from_cluster(1)
    hits = session.worker.cache.hits
    vol = session.volume_at(z, 32)
    assert vol.shape == (32, 32, 32) and not vol.flags.writeable  # shared with the cache
    np.testing.assert_allclose(vol, run.model.decode_volume(z, 32).numpy(), atol=1e-6)
    assert session.request_volume(z, D=32).result(30).volume is vol  # the same cache entry
    assert session.worker.cache.hits == hits + 1
    np.testing.assert_allclose(session.attention_at(z, 32), attention_stack(run.model, z, 32), atol=1e-6)
    assert session.voxel_size(32) == (pytest.approx(6.0), "angstrom")  # 12 Å at box 16
    assert session.voxel_size_angstrom == pytest.approx(12.0)


def test_session_from_latents_and_user_values(run):
    z = np.repeat(run.latents[:3], 4, axis=0)  # [12, zdim]: three groups of four equal latents
    st = RunSession.from_latents(run, z, kmeans_labels=np.repeat([0, 1, 2], 4))
    try:
        assert st.n_particles == 12 and st.kmeans_source == "given"
        np.testing.assert_array_equal(st.latents[st.center_rows], run.latents[:3])
        assert "defocus_angstrom" not in st.colourings()  # the run's metadata is for other particles
        value = st.add_values("score", np.linspace(0, 1, 12))
        assert value.kind == "continuous" and st.colourings() == ["kmeans", "score"]
        st.add_values("score", np.arange(12) % 3)  # the same name again, now categories
        assert st.colourings() == ["kmeans", "score"] and st.colouring("score").kind == "categorical"
        with pytest.raises(ValueError, match="session's K-means"):
            st.add_values("kmeans", np.zeros(12))
        with pytest.raises(ValueError, match="unknown colouring 'nope'"):
            st.colouring("nope")
    finally:
        st.close()
    # latents of named particles of the stack: their own CTF is read from the run's metadata
    st = RunSession.from_latents(run, run.latents[:5], particle_indices=run.particle_indices[:5], k=2)
    try:
        whole = RunSession(run, k=2)
        np.testing.assert_array_equal(st.colouring("defocus_angstrom").values,
                                      whole.colouring("defocus_angstrom").values[:5])
        assert "pose_change_deg" not in st.colourings() and "pose_change_deg" in whole.colourings()
        whole.close()
    finally:
        st.close()
    with pytest.raises(ValueError, match="latents must be finite"):
        RunSession.from_latents(run, np.zeros((5, run.latents.shape[1] + 1), np.float32))
    with pytest.raises(ValueError, match="kmeans_labels must be 5"):
        RunSession.from_latents(run, np.zeros((5, run.latents.shape[1]), np.float32), kmeans_labels=[0, 1])
