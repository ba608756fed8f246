"""DistributedDataParallel: two gloo processes (torchrun, 127.0.0.1) match one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cryoformer.trainer import train

from test_trainer_helpers import (checkpoint_params, make_dataset, max_param_diff, tiny_model_config,
                                  train_config)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from cryoformer.trainer import train
    from test_trainer_helpers import tiny_model_config, train_config
    data_dir, out = sys.argv[1], sys.argv[2]
    result = train(train_config(data_dir, out), tiny_model_config(), progress=False)
    # one file per rank: two processes printing to one pipe can interleave their words
    import os
    with open(out + ".rank" + os.environ["RANK"], "w") as fh:
        fh.write(f"{result.stopped} {result.step}")
""")


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    torch.set_num_threads(1)
    single = train(train_config(data_dir, tmp_path / "one"), tiny_model_config(), progress=False)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
           str(data_dir), str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # the ranks' own messages come first, the launcher's summary last: show both ends
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    for rank in (0, 1):  # both ranks took the same 12 steps
        assert (tmp_path / f"two.rank{rank}").read_text() == "finished 12"
    state1, p1 = checkpoint_params(tmp_path / "one" / "checkpoints" / "last.pt")
    state2, p2 = checkpoint_params(tmp_path / "two" / "checkpoints" / "last.pt")
    assert state1["step"] == state2["step"] == single.step == 12
    # same global batches, gradients averaged over ranks = the mean over the global batch
    assert max_param_diff(p1, p2) < 1e-4
    moved = max_param_diff(p1, torch.load(tmp_path / "one" / "checkpoints" / "epoch_001.pt",
                                          weights_only=True)["model"])
    assert moved > 1e-3  # the comparison is not vacuous: training changed the weights
    z1 = np.load(tmp_path / "one" / "latents" / "epoch_002.npy")
    z2 = np.load(tmp_path / "two" / "latents" / "epoch_002.npy")
    np.testing.assert_allclose(z1, z2, atol=1e-3)
    # only rank 0 wrote files: one config, one log with each step row once
    import pandas as pd

    log = pd.read_csv(tmp_path / "two" / "log.csv")
    assert log[log.kind == "step"].step.is_unique
