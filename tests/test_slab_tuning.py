"""The CPU slab size timed on a run's own steps: the candidates, the pick, the same results."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryoformer.trainer import train
from cryoformer.trainer.slab_tuning import SlabTuner, candidate_planes

from test_trainer_helpers import make_dataset, read_log, tiny_model_config, train_config


def test_candidates_are_whole_distinct_planes_within_the_grid():
    assert candidate_planes(8192, 64) == [1, 2, 4, 8]  # 2^17 / 16 voxels at D = 64: 2 planes
    assert candidate_planes(8192, 128) == [1, 2, 4]  # a plane is 16 384 voxels: ½ and 1 are one plane
    assert candidate_planes(16384, 32) == [8, 16, 32]  # 4× would pass the grid's 32 planes
    assert candidate_planes(1 << 17, 16) == [16]


def test_tuner_times_each_candidate_and_keeps_the_fastest_median():
    tuner = SlabTuner(8192, 64, rounds=3, warmup=1)
    assert tuner.candidates == [4096, 8192, 16384, 32768]
    cost = {4096: 1.2, 8192: 1.0, 16384: 0.9, 32768: 1.1}  # seconds per step at each slab
    seen = []
    while not tuner.done:
        slab = tuner.next_slab()
        seen.append(slab)
        # one outlier per candidate (another process on the core) must not decide
        tuner.record(cost[slab] * (5.0 if seen.count(slab) == 2 and slab == 16384 else 1.0))
    assert seen[0] == 8192 and len(seen) == 1 + 4 * 3  # the warm-up step runs at the default
    assert seen[1:5] == tuner.candidates  # interleaved rounds
    assert tuner.choice == 16384 and tuner.next_slab() is None
    assert "using 4 z-plane(s)" in tuner.summary()


def test_a_single_candidate_is_chosen_without_timing():
    tuner = SlabTuner(1 << 17, 16)
    assert tuner.done and tuner.choice == 16 * 256 and tuner.next_slab() is None


@pytest.fixture(scope="module")
def box32(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("slab32"), n=48, box=32, seed=3)


def test_tuned_training_logs_its_choice_and_trains_the_same(box32, tmp_path, single_thread):
    model_cfg = tiny_model_config(box=32)
    runs = {}
    for name, tuning in (("tuned", True), ("fixed", False)):
        cfg = train_config(box32, tmp_path / name, epochs=2, slab_tuning=tuning, support_mask=False)
        train(cfg, model_cfg, progress=False)
        runs[name] = read_log(tmp_path / name)
    text = open(os.path.join(tmp_path / "tuned", "run.log")).read()
    assert "slab size timed on this machine" in text and "using" in text
    assert "slab size" not in open(os.path.join(tmp_path / "fixed", "run.log")).read()
    # 12 steps, the first 10 spent timing 3 slab sizes: the same losses up to summation order
    a = runs["tuned"].query("kind == 'step'").loss.to_numpy()
    b = runs["fixed"].query("kind == 'step'").loss.to_numpy()
    assert len(a) == len(b) >= 5
    np.testing.assert_allclose(a, b, rtol=1e-4)
