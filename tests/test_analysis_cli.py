"""End to end: simulate → train (1 tiny epoch) → analyze → eval-vol → evaluate → export, and the
commands' bad-input handling (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

import cryoformer.analysis.analyze as analyze_module
from cryoformer.cli import EXIT_INPUT_ERROR, main
from cryoformer.io import open_particles, read_star, read_volume, read_volume_stack, write_poses_pkl
from cryoformer.io.cryodrgn import read_poses_pkl
from cryoformer.io.safe_pickle import load_pickle
from cryoformer.trainer import load_run

COMMANDS = ["analyze", "eval-vol", "evaluate", "export"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset (D=32, 3 states) and a 1-epoch run at box 16 on every other particle."""
    root = tmp_path_factory.mktemp("e2e")
    sim = root / "sim"
    assert main(["simulate", "-o", str(sim), "-n", "48", "-D", "32", "--Apix", "6", "--n-states", "3",
                 "--snr", "1", "--seed", "0"]) == 0
    np.save(root / "ind.npy", np.arange(0, 48, 2))
    assert main(["train", str(sim / "particles.star"), "-o", str(root / "run"), "--epochs", "1", "-b", "12",
                 "--box", "16", "--ind", str(root / "ind.npy"), "--zdim", "2", "--seed", "0",
                 "--device", "cpu"]) == 0
    return root


def fails(argv, capsys, *words):
    capsys.readouterr()  # drop what earlier commands printed (progress bars)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_INPUT_ERROR, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_states_units(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert any(u in capsys.readouterr().out for u in ("Å", "px", "voxels"))


def test_analyze_writes_everything(run, capsys):
    assert main(["analyze", str(run / "run"), "--k", "3", "--n-traversal", "3"]) == 0
    out = run / "run" / "analysis"
    z = np.load(out / "z.npy")
    assert z.shape == (24, 2)
    labels, centers = np.load(out / "kmeans_labels.npy"), np.load(out / "kmeans_centers.npy")
    assert labels.shape == (24,) and set(labels) <= {0, 1, 2} and centers.shape == (3, 2)
    np.testing.assert_array_equal(centers, z[np.load(out / "kmeans_center_indices.npy")])  # on data
    assert np.load(out / "pca.npy").shape == (24, 2)
    for i in range(3):
        vol, apix = read_volume(out / f"vol_kmeans_{i:02d}.mrc")
        assert vol.shape == (16, 16, 16) and apix == pytest.approx(12.0)  # 6 Å × 32/16
        stack, _ = read_volume_stack(out / f"attn_kmeans_{i:02d}.mrc")
        info = json.loads((out / "analysis.json").read_text())
        assert stack.shape[0] == len(info["attention_channels"])
    for pc in (1, 2):
        assert sorted(os.listdir(out / f"pc{pc}")) == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc", "z.npy"]
    flex, _ = read_volume(out / "flex_score.mrc")
    assert 0 <= flex.min() and flex.max() == pytest.approx(1.0)
    for name in ("summary.png", "summary.html", "pca_explained_variance.png"):
        assert (out / name).stat().st_size > 1000
    assert not [f for f in os.listdir(run / "run") if f.startswith(".")]  # no staging left
    # UMAP (umap-learn is installed with the umap extra): every particle placed, recorded, shown.
    xy = np.load(out / "umap.npy")
    assert xy.shape == (24, 2) and xy.dtype == np.float32 and np.all(np.isfinite(xy))
    assert info["umap"]["file"] == "umap.npy" and info["umap"]["fit_particles"] == 24
    assert "fitted on 24 of 24 particles" in (out / "summary.html").read_text()
    assert "UMAP: umap.npy, fitted on 24 of 24 particles" in capsys.readouterr().out
    # the notebook to go on with: the template, set to this run, epoch and k, with no outputs
    nb = json.loads((out / "your_data.ipynb").read_text())
    params = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and info["files"]["notebook"] == "your_data.ipynb"
    values = {}
    exec("".join(params[0]["source"]), values)  # the cell is valid Python
    assert values["RUN"] == os.path.abspath(run / "run") and values["EPOCH"] == info["epoch"]
    assert values["K"] == 3 and values["METADATA"] is None
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 6 and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


def test_analyze_epoch_positional_and_skip_umap(run, capsys):
    """`analyze RUN E` is `analyze RUN --epoch E` (same folder, same epoch); --skip-umap writes no
    umap.npy and says so in the record; the epoch given twice, differently, is refused."""
    rundir = str(run / "run")
    epoch = load_run(rundir).epoch  # the epoch analyze uses by default
    assert main(["analyze", rundir, str(epoch), "--k", "2", "--n-traversal", "2", "--skip-umap"]) == 0
    out = run / "run" / f"analysis.{epoch}"
    info = json.loads((out / "analysis.json").read_text())
    assert info["epoch"] == epoch and info["umap"] == {"skipped": "--skip-umap"}
    assert not (out / "umap.npy").exists() and (out / "kmeans_labels.npy").is_file()
    assert "UMAP:" not in capsys.readouterr().out
    # Both spellings, agreeing: the same folder (already there, so --force).
    assert main(["analyze", rundir, str(epoch), "--epoch", str(epoch), "--k", "2", "--n-traversal", "2",
                 "--skip-umap", "--force"]) == 0
    err = fails(["analyze", rundir, "0", "--epoch", str(epoch), "--force"], capsys, "EPOCH", "0", f"--epoch {epoch}")
    assert "twice" in err
    fails(["export", rundir, "0", "--epoch", str(epoch), "--clusters", "0", "--format", "pkl", "-o",
           str(run / "never.pkl")], capsys, "twice")
    assert not (run / "never.pkl").exists()
    fails(["analyze", rundir, "--umap-fit-max", "2", "-o", str(run / "never")], capsys, "--umap-fit-max", "2")
    assert not (run / "never").exists()


def _one_umap_note(caplog, out, phrase: str) -> str:
    """The analysis in ``out`` was written without a UMAP, with one warning containing ``phrase``."""
    notes = [r for r in caplog.records if "UMAP" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING, notes
    assert phrase in notes[0].getMessage()
    info = json.loads((out / "analysis.json").read_text())
    assert phrase in info["umap"]["skipped"]
    assert not (out / "umap.npy").exists() and (out / "summary.png").is_file()
    return notes[0].getMessage()


def test_analyze_without_umap_learn_notes_it_once(run, caplog, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    caplog.set_level(logging.INFO)
    assert main(["analyze", str(run / "run"), "--k", "2", "--n-traversal", "2", "-o", str(tmp_path / "a")]) == 0
    _one_umap_note(caplog, tmp_path / "a", "umap-learn is not installed")
    # --skip-umap: asked for, so no note.
    caplog.clear()
    assert main(["analyze", str(run / "run"), "--k", "2", "--n-traversal", "2", "--skip-umap",
                 "-o", str(tmp_path / "b")]) == 0
    assert not [r for r in caplog.records if "UMAP" in r.getMessage()]


def test_analyze_with_a_broken_umap_learn_notes_it_once(run, caplog, tmp_path, monkeypatch):
    """umap-learn installed but failing to import (numba built for another NumPy): one note that
    quotes the import's own error, the rest of the analysis written."""
    def broken(*args, **kwargs):  # as umap_embedding wraps a failed import
        raise ImportError("UMAP needs umap-learn: pip install 'cryoformer[umap]'") from \
            ImportError("Numba needs NumPy 2.2 or less")

    monkeypatch.setattr(analyze_module, "umap_embedding", broken)
    caplog.set_level(logging.INFO)
    assert main(["analyze", str(run / "run"), "--k", "2", "--n-traversal", "2", "-o", str(tmp_path / "a")]) == 0
    note = _one_umap_note(caplog, tmp_path / "a", "cannot be imported (ImportError: Numba needs NumPy 2.2 or less)")
    assert "pip install" not in note.split("(", 1)[1]  # the cause, not the install hint


def test_eval_vol_scales_voxel_size(run, capsys, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((2, 2), np.float32))
    assert main(["eval-vol", str(run / "run"), "--zfile", str(tmp_path / "z.npy"), "-D", "8",
                 "-o", str(tmp_path / "vols")]) == 0
    assert sorted(os.listdir(tmp_path / "vols")) == ["vol_000.mrc", "vol_001.mrc"]
    vol, apix = read_volume(tmp_path / "vols" / "vol_001.mrc")
    assert vol.shape == (8, 8, 8) and apix == pytest.approx(24.0)
    fails(["eval-vol", str(run / "run"), "--z", "0.1 0.2 0.3", "-o", str(tmp_path / "bad")], capsys,
          "--z", "zdim = 2")
    assert not (tmp_path / "bad").exists()


def test_evaluate_metrics_and_pose_errors(run, capsys, tmp_path):
    sim = run / "sim"
    # Refined poses equal to the truth: the pose errors must be zero (known answer).
    ind = np.load(run / "ind.npy")
    write_poses_pkl(read_poses_pkl(sim / "gt" / "poses.pkl", box_size=32).subset(ind),
                    run / "run" / "poses" / "epoch_001.pkl")
    try:
        out = tmp_path / "m" / "metrics.json"
        assert main(["evaluate", str(run / "run"), "--gt-maps", str(sim / "gt" / "state_*.mrc"),
                     "--gt-labels", str(sim / "gt" / "state.npy"), "--gt-motion", str(sim / "gt" / "motion.mrc"),
                     "--gt-poses", str(sim / "gt" / "poses.pkl"), "-o", str(out)]) == 0
    finally:
        os.remove(run / "run" / "poses" / "epoch_001.pkl")
    text = capsys.readouterr().out
    assert "FSC=0.5" in text and "ROC-AUC" in text
    m = json.loads(out.read_text())
    assert m["evaluation_box_voxels"] == 16 and m["voxel_size_angstrom"] == pytest.approx(12.0)
    states = m["fsc"]["states"]
    assert [s["state"] for s in states] == [0, 1, 2]
    labels = np.load(sim / "gt" / "state.npy")[ind]
    assert [s["n_particles"] for s in states] == [int(np.sum(labels == k)) for k in range(3)]
    for s in states:
        assert s["resolution_fsc0.5_angstrom"] >= 24.0 - 1e-6  # never better than Nyquist
        assert 0 <= s["au_fsc"] <= 0.5
    assert m["pose_error"]["rotation_median_rad"] < 1e-3 and m["pose_error"]["shift_median_px"] < 1e-3
    # The consensus baseline: the particle-weighted mean of the true maps, scored per state.
    # Known answer: it equals a by-hand FSC of that mean against each true map.
    from cryoformer.analysis.evaluation import fourier_crop_volume
    from cryoformer.metrics.fsc import FscResult

    base = m["fsc_consensus_baseline"]["states"]
    assert [b["state"] for b in base] == [0, 1, 2] and "consensus" in text
    maps = np.stack([fourier_crop_volume(read_volume(sim / "gt" / f"state_{k:03d}.mrc")[0], 16)
                     for k in range(3)])
    counts = np.bincount(labels, minlength=3)
    mean_map = np.tensordot(counts / counts.sum(), maps, axes=1).astype(np.float32)
    for k, b in enumerate(base):
        want = FscResult.compute(mean_map, maps[k], 12.0).au_fsc
        assert b["au_fsc"] == pytest.approx(want, rel=1e-4)
    het = m["heterogeneity"]
    assert het["consensus_baseline"] == 0.0 and het["true_maps"] == 1.0
    assert -1 <= het["difference_map_correlation"] <= 1 and "difference-map correlation" in text
    mv = m["fsc_moving_region"]
    assert 0 <= mv["recovered"]["mean_au_fsc"] <= 0.5 and 0 <= mv["consensus_baseline"]["mean_au_fsc"] <= 0.5
    auc = m["flexible_region"]["auc"]
    assert set(auc) == {"flex_density", "flex_queries", "flex_weights", "distance_from_centre", "voxel_variance"}
    assert all(a is None or 0 <= a <= 1 for a in auc.values())
    assert m["flexible_region"]["reference_auc_ground_truth_variance"] > 0.8  # the metric can see motion
    assert (tmp_path / "m" / "fsc_per_state.png").is_file()


def test_export_round_trips(run, capsys, tmp_path):
    rundir = str(run / "run")
    labels = np.load(run / "run" / "analysis" / "kmeans_labels.npy")
    ind = np.load(run / "ind.npy")
    expected = np.sort(ind[np.isin(labels, [0, 2])])  # original-stack indices
    assert main(["export", rundir, "--clusters", "0,2", "--format", "pkl", "-o", str(tmp_path / "s.pkl")]) == 0
    np.testing.assert_array_equal(load_pickle(tmp_path / "s.pkl"), expected)
    assert main(["export", rundir, "--clusters", "0,2", "--format", "cs-index", "-o", str(tmp_path / "s.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), expected)
    assert main(["export", rundir, "--clusters", "0,2", "--format", "star", "-o", str(tmp_path / "s.star")]) == 0
    orig, sub = read_star(run / "sim" / "particles.star"), read_star(tmp_path / "s.star")
    assert list(sub.particles.columns) == list(orig.particles.columns)
    # Written in another folder: every column as it was but the stack paths, made absolute so
    # the file reaches the same images from where it is.
    rest = [c for c in orig.particles.columns if c != "rlnImageName"]
    assert sub.particles[rest].equals(orig.particles.iloc[expected][rest].reset_index(drop=True))
    np.testing.assert_array_equal(open_particles(tmp_path / "s.star").images(np.arange(expected.size)),
                                  open_particles(run / "sim" / "particles.star").images(expected))
    np.save(tmp_path / "sel.npy", np.array([3, 1]))
    assert main(["export", rundir, "--selection", str(tmp_path / "sel.npy"), "--format", "pkl",
                 "-o", str(tmp_path / "sel.pkl")]) == 0
    assert load_pickle(tmp_path / "sel.pkl").tolist() == [ind[1], ind[3]]


def test_bad_inputs_one_line_nothing_written(run, capsys, tmp_path):
    rundir, sim = str(run / "run"), run / "sim"
    fails(["analyze", str(tmp_path)], capsys, "not a cryoformer training run")
    fails(["analyze", rundir, "--epoch", "9"], capsys, "epoch 9 not found")
    # --force: an earlier test analysed this run; the point here is the cluster count
    fails(["analyze", rundir, "--k", "100", "--force"], capsys, "--k", "24")
    fails(["export", rundir, "--clusters", "7", "--format", "pkl", "-o", str(tmp_path / "x.pkl")], capsys,
          "--clusters", "out of range")
    np.save(tmp_path / "short.npy", np.zeros(10, np.int64))
    fails(["evaluate", rundir, "--gt-maps", str(sim / "gt" / "state_*.mrc"), "--gt-labels",
           str(tmp_path / "short.npy"), "-o", str(tmp_path / "e" / "m.json")], capsys, "10 labels", "48")
    np.save(tmp_path / "big.npy", np.full(48, 5, np.int64))
    fails(["evaluate", rundir, "--gt-maps", str(sim / "gt" / "state_*.mrc"), "--gt-labels",
           str(tmp_path / "big.npy"), "-o", str(tmp_path / "e" / "m.json")], capsys, "0…2")
    assert sorted(os.listdir(tmp_path)) == ["big.npy", "short.npy"]
