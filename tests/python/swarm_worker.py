"""One independent launch (its own store, rank 0 of 1) of a swarm training job, for
test_swarm.py. Peers find each other through HIVEMIND_INITIAL_PEERS + HIVEMIND_RUN_ID, train a
small regression model with unchanged DDP code plus hivemind_backend.share_state, and stop
together: each step all-reduces a stop flag (MAX), raised by any peer that sees the stop file.

Prints one line per step: "step <n> loss <l> group <ranks> established <0|1> stop <0|1>
generation <groups formed so far>", and at the end "final <sha256 of the parameters>"."""

import hashlib
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import hivemind_backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(name: str, stop_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("hivemind", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    # Different initial weights on purpose: the first state sync makes them one.
    torch.manual_seed(hash(name) % 1000)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shared = hivemind_backend.share_state(model, optimizer)
    ddp = DistributedDataParallel(model)
    teacher = torch.Generator().manual_seed(7)
    true_w = torch.randn(16, 1, generator=teacher)
    data = torch.Generator().manual_seed(hash(name) % 10000)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    step = 0
    while True:
        x = torch.randn(32, 16, generator=data)
        y = torch.tanh(x @ true_w)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        stop = torch.tensor([1 if os.path.exists(stop_file) else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        print(f"step {step} loss {loss.item():.5f} group {backend.swarm_group_size} "
              f"established {int(shared.established)} stop {stop.item()} "
              f"generation {backend.group_generation}", flush=True)
        step += 1
        if stop.item():
            break
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    print(f"final {digest.hexdigest()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
