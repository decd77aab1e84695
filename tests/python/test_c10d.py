"""The c10d backend "hivemind" in real multi-process groups: every collective against a reference
computed locally, results identical on every rank, bad input, and a rank killed mid-run.
PyTorch's own distributed suite runs in test_torch_suite.py; DDP in test_ddp.py."""

import os
import signal
import warnings

import pytest
import torch

from c10d_harness import run_ranks


def _collectives(rank, world_size):
    import torch.distributed as dist

    out = {}
    # all-reduce: every op and the dtypes DDP, Lightning and PyTorch's tests use.
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3) + rank + 1
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                  torch.int64, torch.uint8):
        for op in ("SUM", "AVG", "MAX", "MIN", "PRODUCT"):
            if op == "AVG" and not dtype.is_floating_point:
                continue
            t = base.to(dtype).clone()
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
            out[f"all_reduce {op} {dtype}"] = t
    flags = torch.tensor([rank % 2, 1, 0], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.BOR)
    out["all_reduce BOR"] = flags
    coalesced = [torch.ones(3) * (rank + 1), torch.ones(2) * (rank + 1)]
    with warnings.catch_warnings():  # deprecated in torch, still used by older code
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_reduce_coalesced(coalesced)
    out["all_reduce_coalesced"] = coalesced
    # async op completed through its future, as DDP and comm hooks use it
    fut = dist.all_reduce(torch.ones(4) * rank, async_op=True).get_future()
    out["future"] = fut.then(lambda f: f.value()[0] * 2).wait()

    for root in range(world_size):
        t = torch.tensor([rank, 10 * rank, 7], dtype=torch.int32)
        dist.broadcast(t, src=root)
        out[f"broadcast {root}"] = t
    gathered = [torch.zeros(2, 2) for _ in range(world_size)]
    dist.all_gather(gathered, torch.full((2, 2), float(rank)))
    out["all_gather"] = gathered
    flat = torch.zeros(world_size * 3, dtype=torch.int64)
    dist.all_gather_into_tensor(flat, torch.tensor([rank, rank + 1, rank + 2]))
    out["all_gather_into_tensor"] = flat
    target = [torch.zeros(2) for _ in range(world_size)] if rank == 1 else None
    dist.gather(torch.tensor([rank, -rank], dtype=torch.float32), target, dst=1)
    out["gather"] = target
    piece = torch.zeros(2)
    dist.scatter(piece, [torch.tensor([i, i * 2.0]) for i in range(world_size)] if rank == 0
                 else None, src=0)
    out["scatter"] = piece
    t = torch.tensor([rank + 1.0, 2.0])
    dist.reduce(t, dst=world_size - 1, op=dist.ReduceOp.PRODUCT)
    out["reduce"] = t if rank == world_size - 1 else None
    chunks = [torch.full((2,), float(rank * 10 + j)) for j in range(world_size)]
    mine = torch.zeros(2)
    dist.reduce_scatter(mine, chunks)
    out["reduce_scatter"] = mine
    mine = torch.zeros(2, dtype=torch.int64)
    dist.reduce_scatter_tensor(mine, torch.arange(2 * world_size) + rank)
    out["reduce_scatter_tensor"] = mine
    # all-to-all with uneven splits: rank r sends j+1 rows to rank j
    send = torch.full((sum(range(1, world_size + 1)),), float(rank))
    receive = torch.zeros((rank + 1) * world_size)
    dist.all_to_all_single(receive, send, output_split_sizes=[rank + 1] * world_size,
                           input_split_sizes=list(range(1, world_size + 1)))
    out["all_to_all_single"] = receive
    # point to point around a ring, two messages with the same tag (matched in order)
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    requests = [dist.isend(torch.tensor([rank, k]), right, tag=5) for k in range(2)]
    received = [torch.zeros(2, dtype=torch.int64) for _ in range(2)]
    for buffer in received:
        dist.recv(buffer, left, tag=5)
    for request in requests:
        request.wait()
    out["ring"] = received
    dist.barrier()
    # a subgroup of ranks 0 and 2
    sub = dist.new_group([0, world_size - 1])
    if rank in (0, world_size - 1):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=sub)
        out["subgroup"] = t
    objects = [None] * world_size
    dist.all_gather_object(objects, {"rank": rank})
    out["all_gather_object"] = objects
    return out


def test_every_collective_matches_the_reference_on_every_rank():
    world_size = 3
    results = run_ranks(_collectives, world_size)
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    inputs = [base + r + 1 for r in range(world_size)]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                  torch.int64, torch.uint8):
        typed = [x.to(dtype) for x in inputs]
        expected = {
            "SUM": sum(x.double() for x in typed),
            "AVG": sum(x.double() for x in typed) / world_size,
            "MAX": torch.stack(typed).max(0).values.double(),
            "MIN": torch.stack(typed).min(0).values.double(),
            "PRODUCT": torch.stack(typed).prod(0, dtype=dtype).double(),
        }
        for op, value in expected.items():
            key = f"all_reduce {op} {dtype}"
            if key not in results[0]:
                continue
            got = results[0][key]
            assert got.dtype == dtype, key
            tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
            torch.testing.assert_close(got.double(), value.to(dtype).double(), rtol=tolerance,
                                       atol=tolerance, msg=key)
    for rank in range(world_size):
        r = results[rank]
        for key, value in results[0].items():
            if key in ("gather", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                       "all_to_all_single", "ring", "subgroup"):
                continue
            # identical everywhere, bit for bit
            assert _flatten(r[key]) == _flatten(value), f"{key} differs on rank {rank}"
        assert r["all_reduce BOR"].tolist() == [1, 1, 0]
        assert [t.tolist() for t in r["all_reduce_coalesced"]] == [[6.0] * 3, [6.0] * 2]
        assert r["future"].tolist() == [6.0] * 4
        for root in range(world_size):
            assert r[f"broadcast {root}"].tolist() == [root, 10 * root, 7]
        assert [t[0, 0].item() for t in r["all_gather"]] == [0.0, 1.0, 2.0]
        assert r["all_gather_into_tensor"].tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4]
        assert r["scatter"].tolist() == [rank, rank * 2.0]
        assert r["reduce_scatter"].tolist() == [sum(s * 10 + rank for s in range(3))] * 2
        expected_rs = [sum(2 * rank + i + s for s in range(3)) for i in range(2)]
        assert r["reduce_scatter_tensor"].tolist() == expected_rs
        expected_a2a = []
        for sender in range(world_size):
            expected_a2a += [float(sender)] * (rank + 1)
        assert r["all_to_all_single"].tolist() == expected_a2a
        left = (rank - 1) % world_size
        assert [t.tolist() for t in r["ring"]] == [[left, 0], [left, 1]]
        assert r["all_gather_object"] == [{"rank": i} for i in range(world_size)]
    assert [t.tolist() for t in results[1]["gather"]] == [[r, -r] for r in range(world_size)]
    assert results[2]["reduce"].tolist() == [6.0, 8.0]
    assert results[0]["subgroup"].tolist() == results[2]["subgroup"].tolist() == [2.0]


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.tolist())
    if isinstance(value, (list, tuple)):
        return [_flatten(v) for v in value]
    return value


def _mismatched_shapes(rank, world_size):
    import torch.distributed as dist

    errors = {}
    try:
        dist.broadcast(torch.zeros(3 + rank), src=0)
    except Exception as error:  # noqa: BLE001
        errors["broadcast"] = f"{type(error).__name__}: {error}"
    try:
        dist.all_reduce(torch.zeros(3), op=dist.ReduceOp.PREMUL_SUM) if hasattr(
            dist.ReduceOp, "PREMUL_SUM") else None
    except Exception as error:  # noqa: BLE001
        errors["premul"] = f"{type(error).__name__}: {error}"
    # the group still works afterwards
    t = torch.ones(2)
    dist.all_reduce(t)
    errors["after"] = t.tolist()
    return errors


def test_mismatched_shapes_and_unsupported_ops_fail_clearly_and_the_group_goes_on():
    results = run_ranks(_mismatched_shapes, 2)
    assert "broadcast" not in results[0]  # the root sends; it cannot know
    assert "DistBackendError" in results[1]["broadcast"]
    assert "bytes where" in results[1]["broadcast"] and "same shape and dtype" in results[1][
        "broadcast"]
    for rank in range(2):
        assert results[rank]["after"] == [2.0, 2.0]


def _rank_dies(rank, world_size):
    import torch.distributed as dist

    values = []
    for step in range(12):
        if step == 4 and rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        t = torch.full((1000,), float(rank + 1))
        dist.all_reduce(t)
        values.append(t[0].item())
        assert bool((t == t[0]).all())
    dist.barrier()  # completes among the live ranks
    error = None
    try:
        dist.broadcast(torch.zeros(2), src=world_size - 1)
    except Exception as caught:  # noqa: BLE001
        error = f"{type(caught).__name__}: {caught}"
    return {"values": values, "broadcast_from_dead": error}


def test_all_reduce_goes_on_without_a_killed_rank_and_rank_ops_name_it():
    world_size = 4
    results = run_ranks(_rank_dies, world_size, expect_dead=1)
    assert sorted(results) == [0, 1, 2]
    for rank in range(3):
        values = results[rank]["values"]
        assert values[:4] == [10.0] * 4  # 1 + 2 + 3 + 4
        # SUM = world_size x mean of the contributors: DDP's pre-divided gradients stay a mean.
        torch.testing.assert_close(torch.tensor(values[5:]), torch.full((7,), 4 * 2.0))
        assert values == results[0]["values"]
        error = results[rank]["broadcast_from_dead"]
        assert error is not None and "DistBackendError" in error and "rank 3" in error


def _bad_env(rank, world_size):
    return "unreachable"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"HIVEMIND_MIN_GROUP_SIZE": "many"}, "HIVEMIND_MIN_GROUP_SIZE"),
        ({"HIVEMIND_TIMEOUT": "-3"}, "HIVEMIND_TIMEOUT"),
        ({"HIVEMIND_ENCRYPTION": "maybe"}, "HIVEMIND_ENCRYPTION"),
        ({"HIVEMIND_MOSHPIT_PERIOD": "0"}, "HIVEMIND_MOSHPIT_PERIOD"),
        ({"HIVEMIND_RUN_ID": "has.dot"}, "HIVEMIND_RUN_ID"),
        ({"HIVEMIND_COMPRESSION": "zip"}, "HIVEMIND_COMPRESSION"),
        ({"HIVEMIND_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/1/p2p/notapeerid"}, "notapeerid"),
    ],
)
def test_bad_settings_fail_init_with_the_variable_named(env, message):
    with pytest.raises(AssertionError) as failure:
        run_ranks(_bad_env, 1, env=env, timeout=60)
    assert message in str(failure.value)


def test_options_take_precedence_over_the_environment(monkeypatch):
    from hivemind_backend.c10d import Options, resolve_options

    monkeypatch.setenv("HIVEMIND_RUN_ID", "from-env")
    monkeypatch.setenv("HIVEMIND_MATCHMAKING_TIME", "0.25")
    monkeypatch.setenv("HIVEMIND_INITIAL_PEERS", "/ip4/1.2.3.4/tcp/5/p2p/A, /ip4/1.2.3.4/tcp/6/p2p/B")
    settings = resolve_options(Options(run_id="explicit"))
    assert settings["run_id"] == "explicit"
    assert settings["matchmaking_time"] == 0.25
    assert settings["initial_peers"] == ["/ip4/1.2.3.4/tcp/5/p2p/A", "/ip4/1.2.3.4/tcp/6/p2p/B"]
    with pytest.raises(TypeError, match="hivemind_backend.Options"):
        resolve_options({"run_id": "x"})


def test_backend_is_registered_by_import_torch_alone():
    import subprocess
    import sys

    code = ("import torch.distributed as d, sys; "
            "sys.exit(0 if 'hivemind' in d.Backend.backend_list and "
            "'hivemind_backend' not in sys.modules else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _overflow(rank, world_size):
    import torch.distributed as dist

    t = torch.ones(5)
    if rank == 1:
        t[2] = float("inf")
    dist.all_reduce(t)
    # A bucket large enough for torch's threads to split its checked copy, bad at the far end.
    big = torch.ones(100_000)
    if rank == 2:
        big[-1] = float("nan")
    dist.all_reduce(big)
    # Tensors that take the general path: float64, and a non-contiguous view.
    wide = torch.ones(6, dtype=torch.float64)
    if rank == 0:
        wide[5] = float("-inf")
    dist.all_reduce(wide)
    transposed = torch.ones(4, 3).t()
    if rank == 1:
        transposed[2, 3] = float("nan")
    dist.all_reduce(transposed)
    after = torch.ones(3)
    dist.all_reduce(after)
    return {"overflow": t, "big": big, "wide": wide, "transposed": transposed, "after": after}


def test_an_overflow_on_one_rank_reaches_every_rank_as_nan():
    # AMP's GradScaler finds overflows by looking for non-finite gradients after the all-reduce.
    results = run_ranks(_overflow, 3)
    for rank in range(3):
        for name in ("overflow", "big", "wide", "transposed"):
            assert torch.isnan(results[rank][name]).all(), (rank, name)
        assert results[rank]["after"].tolist() == [3.0] * 3


def _large_buckets(rank, world_size):
    import torch.distributed as dist

    # 12 MiB: the flat buffer is filled, and the result written into the tensor, with
    # non-temporal stores (from 8 MiB on); the tensor is the round's mirror.
    generator = torch.Generator().manual_seed(10 + rank)
    summed = torch.randn(3 << 20, generator=generator)
    averaged = summed.clone()
    inputs = summed.clone()
    pointer = summed.data_ptr()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(averaged, op=dist.ReduceOp.AVG)
    overflow = torch.ones(3 << 20)
    if rank == 1:
        overflow[(3 << 20) - 1] = float("inf")
    dist.all_reduce(overflow)
    return {"inputs": inputs, "sum": summed, "avg": averaged,
            "in_place": summed.data_ptr() == pointer,
            "overflow_nan": bool(torch.isnan(overflow).all())}


def test_large_buckets_are_reduced_in_place_exactly_and_overflows_still_reach_everyone():
    results = run_ranks(_large_buckets, 3)
    exact = sum(results[r]["inputs"].double() for r in range(3))
    for rank in range(3):
        assert results[rank]["in_place"]
        assert results[rank]["overflow_nan"], rank
        assert torch.equal(results[rank]["sum"], results[0]["sum"]), rank
        assert torch.equal(results[rank]["avg"], results[0]["avg"]), rank
    assert torch.allclose(results[0]["sum"].double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.allclose(results[0]["avg"].double(), exact / 3, rtol=1e-5, atol=1e-6)


def _compressed(rank, world_size):
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(rank)
    large = torch.randn(70000, generator=generator)  # above the 65536-element threshold
    small = torch.randn(100, generator=generator)
    inputs = {"large": large.clone(), "small": small.clone()}
    dist.all_reduce(large, op=dist.ReduceOp.AVG)
    dist.all_reduce(small, op=dist.ReduceOp.AVG)
    return {"inputs": inputs, "large": large, "small": small}


def test_compression_applies_to_large_tensors_and_keeps_ranks_identical():
    results = run_ranks(_compressed, 3, env={"HIVEMIND_COMPRESSION": "float16"})
    exact_large = sum(results[r]["inputs"]["large"].double() for r in range(3)) / 3
    exact_small = sum(results[r]["inputs"]["small"].double() for r in range(3)) / 3
    for rank in range(3):
        assert torch.equal(results[rank]["large"], results[0]["large"])
        assert torch.equal(results[rank]["small"], results[0]["small"])
    error = (results[0]["large"].double() - exact_large).abs()
    # fp16 keeps 11 significant bits: relative error about 2^-11 per rounding, twice here.
    assert error.max().item() < 4e-3 * exact_large.abs().max().item()
    assert error.max().item() > 0, "the large tensor should have travelled as fp16"
    assert torch.allclose(results[0]["small"].double(), exact_small, rtol=1e-6, atol=1e-7)
