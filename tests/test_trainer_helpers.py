"""Shared pieces of the trainer tests (no tests here): a tiny dataset and a tiny model."""

from __future__ import annotations

import os

import numpy as np
import torch

from cryoformer.cli import main
from cryoformer.model.hash_grid import HashGridConfig
from cryoformer.trainer import TrainConfig, default_model_config

N_PARTICLES = 48
BOX = 16


def make_dataset(outdir, n=N_PARTICLES, box=BOX, seed=5, shift_range=1.0):
    """A small noisy hinged-molecule dataset (2 states) written by the real simulator."""
    rc = main(["simulate", "-o", str(outdir), "-n", str(n), "-D", str(box), "--Apix", "8",
               "--n-states", "2", "--snr", "1", "--shift-range", str(shift_range),
               "--seed", str(seed)])
    assert rc == 0
    return outdir


def tiny_model_config(box=BOX, **overrides):
    """A CryoFormer with every part present but tiny widths and depths."""
    kw = dict(blocks_per_axis=2, token_dim=8, n_spatial_tokens=2, n_deformation_tokens=2,
              n_decoder_blocks=1, encoder_hidden=32, encoder_layers=2, feature_mlp_hidden=16,
              density_head_hidden=16, hash_backend="torch",
              hash_grid=HashGridConfig(n_levels=2, log2_hashmap_size=10, base_resolution=4),
              zdim=2)
    kw.update(overrides)
    zdim = kw.pop("zdim")
    refine = kw.pop("use_orientation_encoder", False)
    return default_model_config(box, preset="n512", zdim=zdim, refine_poses=refine, **kw)


def train_config(data_dir, outdir, **kw):
    base = dict(particles=os.path.join(data_dir, "particles.mrcs"),
                poses=os.path.join(data_dir, "poses.pkl"), ctf=os.path.join(data_dir, "ctf.pkl"),
                outdir=str(outdir), epochs=2, batch_size=8, lr=3e-3, device="cpu", seed=11,
                log_every_steps=2, heldout_fraction=0.0)  # held-out images: test_trainer_validation
    base.update(kw)
    return TrainConfig.from_flat(**base)


def checkpoint_params(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, {k: v.clone() for k, v in state["model"].items()}


def max_param_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def read_log(run_dir):
    import pandas as pd

    return pd.read_csv(os.path.join(run_dir, "log.csv"))


def leftovers(directory):
    return [f for root, _, files in os.walk(directory) for f in files if f.endswith(".tmp")]


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tiny_cli_run(root):
    """Through the CLI: 24 simulated particles (box 16, 6 Å/px, 3 states) and a 1-epoch run
    (zdim 2) on them; returns the run directory ``root/run``."""
    assert main(["simulate", "-o", str(root / "sim"), "-n", "24", "-D", "16", "--Apix", "6",
                 "--n-states", "3", "--snr", "1", "--seed", "0"]) == 0
    assert main(["train", str(root / "sim" / "particles.star"), "-o", str(root / "run"), "--epochs", "1",
                 "-b", "12", "--zdim", "2", "--seed", "0", "--device", "cpu"]) == 0
    return root / "run"
