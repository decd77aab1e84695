"""Runs a function on every rank of a real multi-process torch.distributed group with
backend="hivemind" (spawned processes, a FileStore), collects what each rank returns, and never
hangs: ranks still running at the deadline are killed and the run fails."""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

# A rank returns this to say it is about to die on purpose (fault-tolerance tests).
KILLED = "killed"


def _entry(target, rank, world_size, store_path, results, env, args):
    os.environ.update(env or {})
    try:
        import torch
        import torch.distributed as dist

        import hivemind_backend  # noqa: F401

        torch.set_num_threads(1)
        dist.init_process_group("hivemind", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        value = target(rank, world_size, *args)
        # Bytes, not tensors: the queue would pass tensors as shared memory of a process that is
        # about to exit.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (report everything, including SystemExit)
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(target: Callable, world_size: int, *args: Any, timeout: float = 120,
              env: Optional[dict] = None, expect_dead: int = 0) -> Dict[int, Any]:
    """{rank: return value}. Fails if a rank raises, or if more than `expect_dead` ranks return
    nothing before the deadline."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store_path = tempfile.mktemp(prefix="hivemind-store-")
    processes = [
        context.Process(target=_entry, args=(target, r, world_size, store_path, results, env, args),
                        daemon=True)
        for r in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: Dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) + len(errors) < world_size:
            alive = [p for p in processes if p.is_alive()]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, kind, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                # Every process gone and nothing left to read: the missing ranks died.
                if not alive and results.empty():
                    break
                continue
            if kind == "ok":
                import torch

                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for process in processes:
            process.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            if process.is_alive():
                process.kill()
                process.join()
        if os.path.exists(store_path):
            os.unlink(store_path)
    if errors:
        raise AssertionError("\n".join(errors))
    missing = sorted(set(range(world_size)) - set(collected))
    if len(missing) > expect_dead:
        raise AssertionError(f"ranks {missing} returned nothing within {timeout} s")
    return collected
