"""Unchanged DDP code under torchrun with backend="hivemind": after N steps, every rank's
parameters equal those of one process trained on the whole batch (what DDP promises with Gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("world_size, mode", [(2, "plain"), (4, "find_unused")])
def test_ddp_under_torchrun_matches_a_single_process(tmp_path, world_size, mode):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world_size}", str(WORKER), str(tmp_path), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    inputs, targets = ddp_worker.make_data()
    reference = ddp_worker.train(ddp_worker.make_model(), inputs, targets).state_dict()
    for rank in range(world_size):
        trained = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in reference.items():
            torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{name} on rank {rank}")
    # and bitwise identical across ranks
    first = torch.load(tmp_path / "rank0.pt")
    for rank in range(1, world_size):
        other = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(torch.equal(first[k], other[k]) for k in first)
