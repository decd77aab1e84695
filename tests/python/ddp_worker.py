"""A DDP training job for test_ddp.py, launched by torchrun with backend="hivemind": trains a small
MLP on its shard of a fixed batch and saves its parameters, so the test can compare them with a
single process trained on the whole batch."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STEPS = 5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    # A layer the forward pass never uses: find_unused_parameters must cope with it.
    model.unused = torch.nn.Linear(4, 4)
    return model


def make_data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 8, generator=generator)
    targets = torch.randn(32, 4, generator=generator)
    return inputs, targets


def train(model, inputs, targets, steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    return model


def main(out_dir: str, find_unused: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("hivemind")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs, targets = make_data()
    shard = slice(rank, None, world_size)
    model = DistributedDataParallel(make_model(), find_unused_parameters=find_unused)
    train(model, inputs[shard], targets[shard])
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "find_unused")
