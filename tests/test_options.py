"""Options declared once (cryoformer.options) and the trainer's option groups built on them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cryoformer import options
from cryoformer.errors import InputError
from cryoformer.metadata import Poses
from cryoformer.model import ModelConfig
from cryoformer.options import FROM_RUN, MUST_MATCH, option, option_group
from cryoformer.trainer import ModelOptions, TrainConfig
from cryoformer.trainer.state import RunState
from cryoformer.trainer.validation import ValidationHistory


@dataclass(frozen=True)
class _Inner:
    size_px: int = option("--size", default=4, unit="px", resume=MUST_MATCH, help="size (default {default})")
    rate: float = option("--rate", default=0.5, help="rate (default {default:g})")
    fancy: bool = option("--fancy", default=False, switch="store_true", resume=MUST_MATCH, help="be fancy")
    style: str = option("--style", default="new", choices=("new", "old"), resume=MUST_MATCH,
                        legacy="old", legacy_if="fancy", help="style")
    keep: float = option("--keep", default=0.1, resume=FROM_RUN, legacy=0.0, help="kept")


@dataclass(frozen=True)
class _Outer:
    name: str = option("name", help="a name")
    quiet: bool = option("--loud", default=True, switch="store_false", help="talk")
    hidden: int = option(default=3)
    inner: _Inner = option_group(_Inner, "inner things")


def _parse(argv):
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, _Outer)
    return parser, parser.parse_args(argv)


def test_arguments_are_generated_from_the_declarations():
    parser, args = _parse(["x", "--size", "6", "--loud", "--style", "old"])
    assert options.given_values(args, _Outer) == {"name": "x", "quiet": False, "size_px": 6, "style": "old"}
    built = options.from_flat(_Outer, options.given_values(args, _Outer))
    assert built == _Outer("x", False, 3, _Inner(size_px=6, style="old"))
    text = parser.format_help()
    assert "inner things:" in text and "size (default 4)" in text and "rate (default 0.5)" in text
    assert "--hidden" not in text  # no flags: not on the command line
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--style", "odd"])


def test_flat_and_nested_forms_round_trip():
    value = _Outer("x", inner=_Inner(rate=0.25))
    flat = options.to_flat(value)
    assert list(flat) == ["name", "quiet", "hidden", "size_px", "rate", "fancy", "style", "keep"]
    assert options.from_flat(_Outer, flat) == value
    nested = {"name": "x", "inner": {"rate": 0.25}, "retired_option": 1}
    assert options.from_flat(_Outer, options.nested_to_flat(_Outer, nested)) == value
    with pytest.raises(TypeError, match="no option bogus"):
        options.from_flat(_Outer, {"name": "x", "bogus": 1})


def test_resume_policies_and_legacy_values():
    mine = options.to_flat(_Outer("x", inner=_Inner(fancy=True)))
    saved = {k: v for k, v in mine.items() if k not in ("style", "keep")}
    # a saved config without "style" behaved as "old", but only where "fancy" was on
    assert options.with_legacy_values(_Outer, saved)["style"] == "old"
    assert "style" not in options.with_legacy_values(_Outer, {**saved, "fancy": False})
    assert options.resume_mismatches(_Outer, mine, saved) == ["style"]
    assert options.resume_mismatches(_Outer, mine, {**saved, "rate": 9.0, "style": "new"}) == []  # may change
    assert options.kept_from_run(_Outer, saved) == {"keep": 0.0}
    assert options.kept_from_run(_Outer, {**saved, "keep": 0.3}) == {"keep": 0.3}


def test_option_names_must_be_unique_across_groups():
    @dataclass(frozen=True)
    class Twice:
        size_px: int = option("--size2", default=1)
        inner: _Inner = option_group(_Inner)

    with pytest.raises(TypeError, match="size_px"):
        options.leaves(Twice)


def _config(tmp_path, **kw):
    return TrainConfig.from_flat(particles=str(tmp_path / "p.mrcs"), outdir=str(tmp_path / "run"), **kw)


def test_train_config_reads_flat_and_nested_saved_forms(tmp_path):
    cfg = _config(tmp_path, lr=1e-3, pose_search=True, heldout_fraction=0.1)
    flat = cfg.to_dict()
    assert flat["lr"] == 1e-3 and flat["particles"] == str(tmp_path / "p.mrcs")
    assert TrainConfig.from_dict(flat) == cfg
    nested = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    assert TrainConfig.from_dict(nested) == cfg
    assert cfg.replace(epochs=3).optimisation.epochs == 3 and cfg.replace(epochs=3).optimisation.lr == 1e-3


def test_train_config_keeps_the_run_split_and_mask_on_resume(tmp_path):
    cfg = _config(tmp_path, heldout_fraction=0.3, support_threshold=0.2)
    saved = _config(tmp_path, support_mask=False).to_dict()
    resumed = cfg.resumed_from(saved)
    assert resumed.heldout.heldout_fraction == 0.05 and resumed.support.support_mask is False
    assert resumed.support.support_threshold == 0.05
    # a run saved before held-out images and the support mask existed used neither
    old = {k: v for k, v in saved.items() if k not in ("heldout_fraction", "support_mask")}
    assert cfg.resumed_from(old).heldout.heldout_fraction == 0.0
    assert cfg.resumed_from(old).support.support_mask is False
    assert cfg.resume_mismatches(saved) == []
    assert cfg.replace(lr=1.0, epochs=99).resume_mismatches(saved) == ["lr"]


@pytest.mark.parametrize("kw, flag", [
    (dict(epochs=-1), "--epochs"), (dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch-size"),
    (dict(lr=0.0), "--lr"), (dict(pose_weight=-1.0), "--pose-weight"), (dict(box_size=9), "--box"),
    (dict(device="tpu"), "--device"),
    (dict(support_margin_px=-1), "--support-margin"), (dict(log_every_steps=0), "log_every_steps"),
])
def test_train_config_validation_names_the_flag(tmp_path, kw, flag):
    with pytest.raises(InputError, match=flag):
        _config(tmp_path, **kw)


def test_model_options_are_the_model_config_defaults():
    assert ModelOptions().model_config(16, refine_poses=False) == ModelConfig(box_size=16)
    built = ModelOptions(zdim=4, feature_grid=8, get_query="block", variational=True).model_config(16, True)
    assert (built.zdim, built.feature_grid_resolution, built.get_query, built.variational,
            built.use_orientation_encoder) == (4, 8, "block", True, True)
    with pytest.raises(InputError, match="--preset"):
        ModelOptions(zdim=0).model_config(16, False)


def test_run_state_round_trips_through_checkpoint_keys():
    poses = Poses(np.eye(3, dtype=np.float32)[None].repeat(3, 0), np.zeros((3, 2), np.float32), 16)
    moved = Poses(poses.rotations, np.ones((3, 2), np.float32), 16)
    state = RunState(poses=moved, phase="train", epoch=2, batch_in_epoch=1, step=7, epoch_complete=False,
                     last_epoch_written=1, validation=ValidationHistory([{"epoch": 1, "step": 4, "elapsed_s": 1.0,
                                                                          "heldout_mse": 0.5,
                                                                          "epoch_complete": True}], 20),
                     support=torch.ones(16, 16, 16, dtype=torch.bool))
    saved = state.to_checkpoint(12.5, with_poses=True)
    # the keys every checkpoint written so far has used
    assert set(saved) == {"phase", "epoch", "step", "batch_in_epoch", "epoch_complete", "last_epoch_written",
                          "elapsed_s", "validation", "support", "current_rotations", "current_shifts_px"}
    back = RunState.from_checkpoint(saved, poses, 16, 20)
    assert (back.phase, back.epoch, back.batch_in_epoch, back.step, back.epoch_complete,
            back.last_epoch_written, back.elapsed_before_s) == ("train", 2, 1, 7, False, 1, 12.5)
    np.testing.assert_array_equal(back.poses.shifts_px, moved.shifts_px)
    assert back.validation.rows == state.validation.rows and torch.equal(back.support, state.support)
    plain = state.to_checkpoint(1.0, with_poses=False)
    assert "current_rotations" not in plain
    assert RunState.from_checkpoint(plain, poses, 16, 0).poses is poses  # input poses stand in
