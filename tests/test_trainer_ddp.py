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


NODE_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from cryoformer.trainer import train
    from test_trainer_helpers import tiny_model_config, train_config
    data_dir, out, epochs, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
    result = train(train_config(data_dir, out, epochs=epochs), tiny_model_config(), resume=resume,
                   progress=False)
    with open(f"{out}.e{epochs}.rank{os.environ['RANK']}", "w") as fh:
        fh.write(f"{result.stopped} {result.step} {os.environ['WORLD_SIZE']} {os.environ['GROUP_RANK']}")
""")


def _launch_two_nodes(script, args, port: int, env: dict) -> list:
    """Two torchrun agents, one per "node", meeting through a c10d rendezvous on localhost."""
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=cryoformer-test",
               f"--rdzv_conf=is_host={'true' if node == 0 else 'false'}", "--max_restarts=0",
               str(script), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        outputs.append((proc.returncode, out))
    for code, out in outputs:
        assert code == 0, out[:2500] + "\n...\n" + out[-1500:]
    return outputs


@pytest.mark.slow
def test_two_nodes_over_localhost_train_and_resume(tmp_path):
    """``torchrun --nnodes 2`` (one process per node, c10d rendezvous over 127.0.0.1) trains one
    epoch, then both nodes resume the run to a second epoch, ending where one process ends."""
    data_dir = make_dataset(tmp_path / "data")
    torch.set_num_threads(1)
    single = train(train_config(data_dir, tmp_path / "one", epochs=2), tiny_model_config(), progress=False)
    script = tmp_path / "node_train.py"
    script.write_text(NODE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    out = tmp_path / "two_nodes"
    _launch_two_nodes(script, [str(data_dir), str(out), "1", "fresh"], free_port(), env)
    half = single.step // 2
    for rank in (0, 1):  # world of 2, one rank on each node, the first epoch's steps
        assert (tmp_path / f"two_nodes.e1.rank{rank}").read_text() == f"finished {half} 2 {rank}"
    _launch_two_nodes(script, [str(data_dir), str(out), "2", "resume"], free_port(), env)
    for rank in (0, 1):
        assert (tmp_path / f"two_nodes.e2.rank{rank}").read_text() == f"finished {single.step} 2 {rank}"
    _, p1 = checkpoint_params(tmp_path / "one" / "checkpoints" / "last.pt")
    state2, p2 = checkpoint_params(out / "checkpoints" / "last.pt")
    assert state2["step"] == single.step
    assert max_param_diff(p1, p2) < 1e-4  # resumed on two nodes = one uninterrupted process
    log = (out / "run.log").read_text()
    assert log.count("x 2 process(es)") == 2, log[:1500]  # both pieces of the run say so


RSS_SCRIPT = textwrap.dedent("""
    import os, resource, sys, torch
    torch.set_num_threads(1)
    from cryoformer.trainer import train
    from test_trainer_helpers import tiny_model_config, train_config

    def rss_kib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

    data_dir, out, box = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = train_config(data_dir, out, epochs=1, max_minutes=0.15)
    model_config = tiny_model_config(box=box)
    before = rss_kib()
    result = train(cfg, model_config, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open(f"{out}.rss{os.environ['RANK']}", "w") as fh:
        fh.write(f"{before} {peak} {result.step}")
""")


def _tile_dataset(small, out, n_big: int) -> int:
    """``n_big`` particles: the small stack repeated (memory-mapped writes), poses and CTF to match;
    returns the stack's size in bytes."""
    import mrcfile

    from cryoformer.io.cryodrgn import read_ctf_pkl, read_poses_pkl, write_ctf_pkl, write_poses_pkl

    os.makedirs(out, exist_ok=True)
    with mrcfile.open(os.path.join(small, "particles.mrcs"), permissive=False) as mrc:
        src = np.asarray(mrc.data, dtype=np.float32)
        voxel = mrc.voxel_size.copy()
    n, box = len(src), src.shape[-1]
    stack = os.path.join(out, "particles.mrcs")
    with mrcfile.new_mmap(stack, shape=(n_big, box, box), mrc_mode=2) as mrc:
        mrc.voxel_size = voxel
        for start in range(0, n_big, n):
            stop = min(start + n, n_big)
            mrc.data[start:stop] = src[:stop - start]
        mrc.set_image_stack()
    reps = np.arange(n_big) % n
    write_poses_pkl(read_poses_pkl(os.path.join(small, "poses.pkl"), box_size=box).subset(reps),
                    os.path.join(out, "poses.pkl"))
    write_ctf_pkl(read_ctf_pkl(os.path.join(small, "ctf.pkl")).subset(reps), os.path.join(out, "ctf.pkl"))
    return os.path.getsize(stack)


def _ranks_growth(script, data_dir, out, box: int, env: dict) -> list:
    """Train 2 ranks on ``data_dir`` → each rank's peak resident memory above its memory before
    ``train`` (bytes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(data_dir), str(out), str(box)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[:2500] + "\n...\n" + proc.stderr[-1500:]
    grown = []
    for rank in (0, 1):
        before_kib, peak_kib, steps = map(int, open(f"{out}.rss{rank}").read().split())
        assert steps > 0
        grown.append((peak_kib - before_kib) * 1024)
    return grown


@pytest.mark.slow
def test_two_ranks_keep_memory_bounded_on_a_large_stack(tmp_path):
    """Two ranks training from one 256 MiB stack grow no more than two ranks training from a
    64-particle stack, up to a third of the big stack, though the start-up scan reads all of it
    and rank 0's latent pass reads it again (each read releases the pages it copied out of the
    memory map). Training itself (the model, the optimizer, the allocator) takes a few hundred
    MiB whatever the stack, which the small run measures."""
    box = 32
    small = make_dataset(tmp_path / "small", n=64, box=box)
    n_big = 256 * 2 ** 20 // (box * box * 4)
    stack_bytes = _tile_dataset(small, tmp_path / "big", n_big)
    script = tmp_path / "rss_train.py"
    script.write_text(RSS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    base = _ranks_growth(script, small, tmp_path / "run_small", box, env)
    big = _ranks_growth(script, tmp_path / "big", tmp_path / "run_big", box, env)
    for rank in (0, 1):
        extra = big[rank] - base[rank]
        assert extra < stack_bytes / 3, f"rank {rank} grew by {extra / 2**20:.0f} MiB more on the " \
                                        f"{stack_bytes / 2**20:.0f} MiB stack than on the small one"
    # the pass read every particle
    assert np.load(tmp_path / "run_big" / "latents" / "epoch_001.npy").shape[0] == n_big
