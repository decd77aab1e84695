"""One `dist.all_reduce` at a time, as DDP issues them, with `backend="hivemind"` and Gloo.

Each rank is a process; every op follows a barrier, so the time is one op's, not a pipeline's.
Prints, per backend, the median time per op and the CPU time per op (user and system, from
getrusage in each rank, averaged over the ranks): where the time goes when both are CPU-bound,
as on a small machine where all ranks share the cores. Encryption and compression are off for
hivemind, so both move the same bytes.

    python3 benchmarks/benchmark_c10d_op.py [--ranks 2] [--mib 64] [--ops 20]
"""

import argparse
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, args, backend, port, results):
    if backend == "hivemind":
        import hivemind_backend  # noqa: F401  (registers the backend)

        os.environ["HIVEMIND_ENCRYPTION"] = "0"
        os.environ["HIVEMIND_COMPRESSION"] = "none"
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks
    )
    tensor = torch.full((args.mib << 18,), float(rank))
    for _ in range(2):  # warm-up: the group, the buffers
        dist.all_reduce(tensor)
    times, user, system = [], 0.0, 0.0
    for _ in range(args.ops):
        dist.barrier()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user += after.ru_utime - before.ru_utime
        system += after.ru_stime - before.ru_stime
    results.put((statistics.median(times), user / args.ops, system / args.ops))
    dist.destroy_process_group()


def measure(args, backend):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    ranks = [
        ctx.Process(target=rank_main, args=(r, args, backend, port, results))
        for r in range(args.ranks)
    ]
    for p in ranks:
        p.start()
    rows = [results.get(timeout=600) for _ in ranks]
    for p in ranks:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"a {backend} rank failed (exit code {p.exitcode})")
    return tuple(statistics.mean(row[i] for row in rows) * 1e3 for i in range(3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mib", type=int, default=64, help="tensor size in MiB (float32)")
    parser.add_argument("--ops", type=int, default=20)
    args = parser.parse_args()
    if args.ranks < 2 or args.mib < 1 or args.ops < 1:
        parser.error("need --ranks >= 2, --mib >= 1 and --ops >= 1")
    print(f"{args.ranks} ranks, {args.mib} MiB float32, {args.ops} ops after a barrier each")
    print(f"{'backend':>10} {'median ms':>10} {'user ms':>8} {'sys ms':>8}")
    measured = {}
    for backend in ("hivemind", "gloo"):
        measured[backend] = measure(args, backend)
        median, user, system = measured[backend]
        print(f"{backend:>10} {median:>10.1f} {user:>8.1f} {system:>8.1f}")
    print(f"hivemind / gloo speed: {measured['gloo'][0] / measured['hivemind'][0]:.2f}x")


if __name__ == "__main__":
    main()
