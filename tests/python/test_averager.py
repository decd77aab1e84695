"""hivemind_backend.DecentralizedAverager over real DHT peers and sockets on 127.0.0.1, several
peers in one process (each with its own DHT; steps run on threads, the network work runs in C++
without the GIL)."""

from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from averager_fixtures import averagers, local_dht, swarm  # noqa: F401  (fixtures)
import torch

import hivemind_backend
from hivemind_backend import DecentralizedAverager



def step_all(group, **kwargs_per_peer):
    """Runs step() on every averager at once, one thread each; kwargs_per_peer maps an argument
    name to a list with one value per averager."""
    with ThreadPoolExecutor(max_workers=len(group)) as pool:
        futures = [
            pool.submit(averager.step, **{k: v[i] for k, v in kwargs_per_peer.items()})
            for i, averager in enumerate(group)
        ]
        return [future.result(timeout=60) for future in futures]


def snapshot(averager):
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


def assert_identical(group):
    """Every averager holds bitwise the same tensors."""
    reference = snapshot(group[0])
    for averager in group[1:]:
        for mine, theirs in zip(snapshot(averager), reference):
            assert mine.dtype == theirs.dtype
            assert torch.equal(mine, theirs)
    return reference


# ---- averaging ----


def test_one_step_gives_everyone_the_weighted_mean_and_the_gather(swarm, averagers):
    torch.manual_seed(0)
    inputs = [[torch.randn(5, 3), torch.randn(17)] for _ in swarm]
    weights = [1.0, 2.0, 3.0, 4.0]
    group = [
        averagers([t.clone() for t in tensors], dht, prefix="mean", target_group_size=4)
        for tensors, dht in zip(inputs, swarm)
    ]
    held = [snapshot(a) for a in group]  # to check that the update is in place
    with group[0].get_tensors() as tensors:
        originals = list(tensors)
    gathers = [{"rank": i, "name": f"peer-{i}", "blob": bytes([i])} for i in range(4)]

    results = step_all(group, gather=gathers, weight=weights)

    expected = [
        sum(w * tensors[k] for w, tensors in zip(weights, inputs)) / sum(weights)
        for k in range(2)
    ]
    final = assert_identical(group)
    for got, want in zip(final, expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(held[0][0], final[0])
    with group[0].get_tensors() as tensors:
        assert all(a is b for a, b in zip(tensors, originals))

    by_peer = {dht.peer_id: gathers[i] for i, dht in enumerate(swarm)}
    for averager, result in zip(group, results):
        assert result == by_peer
        report = averager.last_report
        assert report["error"] is None
        assert sorted(report["contributors"]) == sorted(by_peer)
        assert report["failed_peers"] == [] and report["partial_contributors"] == []
    assert len({a.last_report["group_id"] for a in group}) == 1
    assert sum(a.last_report["led"] for a in group) == 1


def test_mixed_dtypes_are_averaged_in_float32_and_written_back_in_place(swarm, averagers):
    def tensors_of(i):
        base = torch.arange(12, dtype=torch.float32) * (i + 1) / 7
        return [
            base.to(torch.float64).reshape(3, 4),
            base.to(torch.float16)[:6].clone(),
            base.to(torch.bfloat16).reshape(4, 3),
            base.reshape(4, 3).t(),  # non-contiguous: written back through its strides
        ]

    inputs = [tensors_of(i) for i in range(3)]
    group = [
        averagers([t.clone() for t in inputs[i]], swarm[i], prefix="dtypes", target_group_size=3)
        for i in range(3)
    ]
    assert len({a.schema_hash for a in group}) == 1
    assert all(r is not None for r in step_all(group))

    final = assert_identical(group)
    for k, got in enumerate(final):
        assert got.dtype == inputs[0][k].dtype and got.shape == inputs[0][k].shape
        # The mean of the float32-converted inputs, rounded to the tensor's own dtype.
        want = (sum(inputs[i][k].to(torch.float32) for i in range(3)) / 3).to(got.dtype)
        tolerance = 1e-6 if got.dtype in (torch.float32, torch.float64) else 1e-2
        assert torch.allclose(got, want, rtol=tolerance, atol=tolerance)
    assert final[3].stride() == inputs[0][3].stride()


def test_moshpit_two_rounds_of_pairs_reach_the_exact_global_mean(swarm, averagers):
    values = [1.0, 2.0, 3.0, 10.0]
    bits = ["0", "0", "1", "1"]
    group = [
        averagers([torch.full((4,), value), torch.full((2, 2), -value)], dht, prefix="grid",
                  target_group_size=2, initial_group_bits=bit)
        for value, dht, bit in zip(values, swarm, bits)
    ]
    assert [a.get_group_bits() for a in group] == bits
    global_mean = sum(values) / 4

    results = step_all(group)
    met_first = [frozenset(r) for r in results]
    assert all(len(r) == 2 for r in met_first)
    # Round 1 averages within each bit bucket only: {1, 2} and {3, 10}.
    assert snapshot(group[0])[0][0].item() == pytest.approx(1.5)
    assert snapshot(group[3])[0][0].item() == pytest.approx(6.5)
    # Former partners move to different buckets, so the next groups mix the pairs.
    assert group[0].get_group_bits() != group[1].get_group_bits()
    assert group[2].get_group_bits() != group[3].get_group_bits()

    results = step_all(group)
    assert all(len(r) == 2 for r in results)
    assert not set(met_first) & {frozenset(r) for r in results}
    for averager in group:
        first, second = snapshot(averager)
        assert torch.allclose(first, torch.full((4,), global_mean), atol=1e-6)
        assert torch.allclose(second, torch.full((2, 2), -global_mean), atol=1e-6)


def test_a_peer_shut_down_before_the_step_leaves_the_others_averaging(swarm, averagers):
    group = [
        averagers([torch.full((8,), float(i))], dht, prefix="survive", target_group_size=4,
                  min_matchmaking_time=0.3)
        for i, dht in enumerate(swarm)
    ]
    assert all(len(r) == 4 for r in step_all(group))  # everyone now holds 1.5

    with group[3].get_tensors() as tensors:
        tensors[0].fill_(100.0)
    group[3].shutdown()
    swarm[3].shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        group[3].step()

    survivors = group[:3]
    for i, averager in enumerate(survivors):
        with averager.get_tensors() as tensors:
            tensors[0].fill_(float(i))
    # Below target_group_size, the leader seals what it has at the end of its window.
    results = step_all(survivors)
    alive = {dht.peer_id for dht in swarm[:3]}
    for result in results:
        assert set(result) == alive
    assert torch.equal(assert_identical(survivors)[0], torch.full((8,), 1.0))


def test_no_group_returns_none_and_says_why(swarm, averagers):
    alone = averagers([torch.ones(3)], swarm[0], prefix="lonely", min_group_size=2)
    # Same prefix, another layout: the two never meet.
    other = averagers([torch.ones(4)], swarm[1], prefix="lonely", min_group_size=2)
    assert alone.group_key != other.group_key

    results = step_all([alone, other], timeout=[0.6, 0.6])
    assert results == [None, None]
    for averager in (alone, other):
        assert "found no group" in averager.last_report["error"]
        assert averager.last_report["attempts"] >= 1
    with alone.get_tensors() as tensors:
        assert torch.equal(tensors[0], torch.ones(3))

    assert alone.step(timeout=0.3, allow_retries=False) is None
    assert alone.last_report["attempts"] == 1


def test_wait_false_returns_futures_and_averagers_can_share_a_dht(swarm, averagers):
    # Two averagers per DHT (different prefixes) run at the same time on shared services.
    a = [averagers([torch.full((3,), float(i))], swarm[i], prefix="left", target_group_size=2)
         for i in range(2)]
    b = [averagers([torch.full((2,), 10.0 * i)], swarm[i], prefix="right", target_group_size=2)
         for i in range(2)]
    futures = [averager.step(gather=i, wait=False) for i, averager in enumerate(a + b)]
    assert all(isinstance(f, Future) for f in futures)
    results = [f.result(timeout=60) for f in futures]
    assert results[0] == results[1] == {swarm[0].peer_id: 0, swarm[1].peer_id: 1}
    assert results[2] == results[3] == {swarm[0].peer_id: 2, swarm[1].peer_id: 3}
    assert torch.equal(assert_identical(a)[0], torch.full((3,), 0.5))
    assert torch.equal(assert_identical(b)[0], torch.full((2,), 5.0))


def test_client_mode_peer_contributes_and_receives(swarm, averagers):
    with local_dht(swarm[0].get_visible_maddrs(), client_mode=True) as client_dht:
        client = averagers([torch.full((5,), 9.0)], client_dht, prefix="clients",
                           target_group_size=3)
        assert client.mode == "client"
        normal = [
            averagers([torch.full((5,), float(i))], swarm[i], prefix="clients",
                      target_group_size=3)
            for i in range(2)
        ]
        # The client starts first: nobody can ask a client to join, so it must find the normal
        # peers that declare after it.
        futures = [client.step(wait=False)]
        futures += [averager.step(wait=False) for averager in normal]
        results = [future.result(timeout=60) for future in futures]
        assert all(len(r) == 3 for r in results)
        assert torch.equal(assert_identical(normal + [client])[0], torch.full((5,), 10.0 / 3))
        assert sorted(client.last_report["modes"]) == ["client", "normal", "normal"]


def test_auxiliary_peer_reduces_but_keeps_its_tensors(swarm, averagers):
    helper = averagers([torch.full((6,), 50.0)], swarm[2], prefix="aux", target_group_size=3,
                       auxiliary=True)
    group = [averagers([torch.full((6,), float(i))], swarm[i], prefix="aux", target_group_size=3)
             for i in range(2)]
    results = step_all(group + [helper], gather=["a", "b", "helper"])
    assert all(r == results[0] for r in results) and len(results[0]) == 3
    assert torch.equal(assert_identical(group)[0], torch.full((6,), 0.5))
    assert torch.equal(snapshot(helper)[0], torch.full((6,), 50.0))
    assert sorted(helper.last_report["modes"]) == ["auxiliary", "normal", "normal"]


def test_shares_follow_declared_bandwidths_and_undeclared_ones_count_as_their_mean(swarm,
                                                                                 averagers):
    # Undeclared (None) counts as the mean of 100, 50, 50: between the fast and the slow peers.
    bandwidths = [None, 100, 50, 50]
    group = [averagers([torch.full((4000,), float(i))], swarm[i], prefix="balanced",
                       target_group_size=4, bandwidth=b)
             for i, b in enumerate(bandwidths)]
    step_all(group)
    assert torch.equal(assert_identical(group)[0], torch.full((4000,), 1.5))
    shares = group[0].last_report["shares"]
    assert sum(shares.values()) == 4000
    undeclared, fast, slow = (shares[group[i].peer_id] for i in (0, 1, 2))
    assert fast > undeclared > slow > 0
    assert shares[group[3].peer_id] == slow


# ---- compression ----

LARGE = 1 << 17  # above the codec policy's threshold of 65536 elements


def weighted_mean(inputs, weights, k):
    return sum(w * tensors[k] for w, tensors in zip(weights, inputs)) / sum(weights)


def test_float16_compresses_large_tensors_and_keeps_small_ones_exact(swarm, averagers):
    torch.manual_seed(1)
    inputs = [[torch.randn(LARGE), torch.randn(100)] for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    group = [
        averagers([t.clone() for t in inputs[i]], swarm[i], prefix="fp16", target_group_size=3,
                  compression="float16")
        for i in range(3)
    ]
    assert group[0].compression == [(0, "float16")]
    assert all(r is not None for r in step_all(group, weight=weights))

    large, small = assert_identical(group)
    exact_large = weighted_mean(inputs, weights, 0)
    # Parts and results are each rounded to fp16 once: relative error 2^-11 per rounding, on
    # values that are mostly below 4 in magnitude.
    error = (large - exact_large).abs().max().item()
    assert error < 8e-3
    assert error > 0, "the large tensor came back exact: nothing was compressed"
    assert not torch.equal(large, exact_large)
    # The small tensor travels raw: the float32 mean, as without compression.
    assert torch.allclose(small, weighted_mean(inputs, weights, 1), rtol=0, atol=1e-6)
    assert group[0].last_report["compression"] == [(0, "float16")]


def test_float16_leaves_16_bit_tensors_raw_and_the_schema_says_so(swarm, averagers):
    tensors = [torch.zeros(LARGE, dtype=torch.bfloat16), torch.zeros(LARGE, dtype=torch.float16),
               torch.zeros(LARGE), torch.zeros(10)]
    averager = averagers(tensors, swarm[0], prefix="rule", compression="float16")
    assert averager.compression == [(2, "float16")]
    plain = averagers(tensors, swarm[1], prefix="rule")
    assert plain.compression == []
    assert averager.schema_hash != plain.schema_hash
    # "none" is lossless, as None: the same schema as an averager without compression.
    assert averagers(tensors, swarm[2], prefix="rule", compression="none").schema_hash == \
        plain.schema_hash
    # A list equivalent to the name gives the same ranges, so the same schema.
    assert averagers(tensors, swarm[3], prefix="rule",
                     compression=[None, "none", "float16", None]).schema_hash == \
        averager.schema_hash


def test_blockwise8_per_tensor_list_applies_as_given(swarm, averagers):
    torch.manual_seed(2)
    # The list overrides the size threshold: the 5000-element tensor is compressed too.
    inputs = [[torch.randn(LARGE), torch.randn(5000), torch.randn(64)] for _ in range(2)]
    compression = ["blockwise8", "blockwise8", None]
    group = [
        averagers([t.clone() for t in inputs[i]], swarm[i], prefix="bw8", target_group_size=2,
                  compression=compression)
        for i in range(2)
    ]
    assert group[0].compression == [(0, "blockwise8"), (1, "blockwise8")]
    assert all(r is not None for r in step_all(group))

    final = assert_identical(group)
    for k in (0, 1):
        exact = weighted_mean(inputs, [1.0, 1.0], k)
        error = (final[k] - exact).abs().max().item()
        # Each block's error is below ~1% of its absmax (about 4-5 for N(0,1) samples), rounded
        # twice (parts, results).
        assert 0 < error < 0.1, f"tensor {k}: max error {error}"
    assert torch.allclose(final[2], weighted_mean(inputs, [1.0, 1.0], 2), rtol=0, atol=1e-6)
    assert group[1].last_report["compression"] == [(0, "blockwise8"), (1, "blockwise8")]


def test_bad_compression_raises_before_any_network(swarm):
    tensors = [torch.zeros(LARGE), torch.zeros(3)]
    with pytest.raises(ValueError, match="valid names: 'none', 'scaled_float16', 'float16'"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", compression="fp17")
    with pytest.raises(ValueError, match=r"compression\[1\] is 'int8'"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", compression=["float16", "int8"])
    with pytest.raises(ValueError, match="3 entries but there are 2 averaged tensors"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad",
                              compression=["float16", None, None])
    with pytest.raises(ValueError, match="1 entries but there are 2"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", compression=("uniform8",))
    with pytest.raises(TypeError, match="codec name"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", compression=2)
    with pytest.raises(TypeError, match=r"compression\[0\] must be a codec name"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", compression=[2, None])


def test_native_codec_ranges_are_checked(swarm):
    def make(codecs):
        return hivemind_backend._C._Averager(
            runner=swarm[0]._active(), prefix="ranges", schema_hash=b"x" * 32, grid_side=1,
            coordinates=[], target_group_size=0, min_group_size=2, window=0.1,
            request_timeout=0.5, sender_timeout=1.0, reducer_timeout=2.0, part_elements=64,
            bandwidth=1.0, mode="normal", codecs=codecs)

    make([(0, 10, 2, 0), (10, 5, 5, 256)]).shutdown()
    with pytest.raises(ValueError, match="overlaps the previous one"):
        make([(0, 10, 2, 0), (5, 10, 4, 0)])
    with pytest.raises(ValueError, match="overlaps the previous one"):
        make([(10, 5, 2, 0), (0, 5, 2, 0)])
    with pytest.raises(ValueError, match="unknown codec id 9"):
        make([(0, 10, 9, 0)])
    with pytest.raises(ValueError, match="takes no block size"):
        make([(0, 10, 2, 128)])
    with pytest.raises(ValueError, match="must be >= 0"):
        make([(-1, 10, 2, 0)])
    # Ranges past the end of the vector are refused by the all-reduce itself, before it sends
    # anything (tests/cpp/averaging_allreduce_test.cpp, MembersThatCompressDifferently...).


def test_peers_that_compress_differently_never_group(swarm, averagers):
    tensors = [torch.ones(LARGE)]
    fp16 = averagers([t.clone() for t in tensors], swarm[0], prefix="mixed", compression="float16")
    raw = averagers([t.clone() for t in tensors], swarm[1], prefix="mixed")
    # The compression is in the schema hash, which is in the group key: they look for groups under
    # different keys, and a leader would refuse the other schema anyway.
    assert fp16.group_key != raw.group_key

    assert step_all([fp16, raw], timeout=[0.6, 0.6]) == [None, None]
    for averager in (fp16, raw):
        assert "found no group" in averager.last_report["error"]
    with fp16.get_tensors() as held:
        assert torch.equal(held[0], tensors[0])


def test_shutdown_ends_its_own_search_at_once_while_others_share_the_dht(swarm, averagers):
    import time

    lonely = averagers([torch.ones(2)], swarm[1], prefix="lonely")
    neighbour = averagers([torch.ones(3)], swarm[1], prefix="neighbour")  # keeps the matchmaker
    pending = lonely.step(timeout=30, wait=False)  # nobody else uses this prefix
    lonely.shutdown()
    start = time.monotonic()
    assert pending.result(timeout=30) is None
    assert time.monotonic() - start < 5, "the search should end at once, not at its timeout"
    assert "shut down" in lonely.last_report["error"]
    assert neighbour.is_alive()


def test_step_on_a_stopped_dht_fails_at_once(swarm, averagers):
    averager = averagers([torch.ones(2)], swarm[1], prefix="stopped")
    swarm[1].shutdown()
    assert averager.step(timeout=30) is None
    assert "DHT is shut down" in averager.last_report["error"]
    assert averager.last_report["attempts"] <= 1


# ---- bad input ----


def test_bad_tensors_and_arguments_raise_clear_errors(swarm, averagers):
    dht = swarm[0]
    with pytest.raises(ValueError, match="CPU tensors only"):
        DecentralizedAverager([torch.empty(3, device="meta")], dht, prefix="bad")
    with pytest.raises(TypeError, match="must be floating point"):
        DecentralizedAverager([torch.zeros(3, dtype=torch.int64)], dht, prefix="bad")
    with pytest.raises(TypeError, match="must be floating point"):
        DecentralizedAverager([torch.zeros(3, dtype=torch.complex64)], dht, prefix="bad")
    with pytest.raises(ValueError, match="dense"):
        DecentralizedAverager([torch.eye(3).to_sparse()], dht, prefix="bad")
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        DecentralizedAverager(torch.zeros(3), dht, prefix="bad")
    with pytest.raises(TypeError, match=r"averaged_tensors\[1\] is a list"):
        DecentralizedAverager([torch.zeros(3), [1.0]], dht, prefix="bad")
    with pytest.raises(ValueError, match="empty"):
        DecentralizedAverager([], dht, prefix="bad")
    with pytest.raises(TypeError, match="hivemind_backend.DHT"):
        DecentralizedAverager([torch.zeros(3)], "127.0.0.1", prefix="bad")
    with pytest.raises(ValueError, match="contain no '.'"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="a.b")
    with pytest.raises(TypeError, match="prefix must be a str"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix=3)
    with pytest.raises(ValueError, match="target_group_size must be at least 2"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", target_group_size=1)
    with pytest.raises(ValueError, match="power of two"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", target_group_size=3,
                              initial_group_bits="01")
    with pytest.raises(ValueError, match="string of '0' and '1'"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", target_group_size=2,
                              initial_group_bits="0x")
    with pytest.raises(ValueError, match="incompatible"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", client_mode=True,
                              auxiliary=True)
    with pytest.raises(ValueError, match="request_timeout"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", request_timeout=0)
    for bandwidth in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bandwidth must be a finite number >= 0"):
            DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", bandwidth=bandwidth)
    with pytest.raises(TypeError, match="bandwidth must be a number"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="bad", bandwidth="fast")

    averager = averagers([torch.zeros(3)], dht, prefix="ok")
    with pytest.raises(ValueError, match="weight"):
        averager.step(weight=0)
    with pytest.raises(TypeError, match="weight must be a number"):
        averager.step(weight="heavy")
    with pytest.raises(TypeError, match="cannot store a builtins.set"):
        averager.step(gather={1, 2})
    with pytest.raises(ValueError, match="the cap is"):
        averager.step(gather=b"x" * (20 << 10))
    with pytest.raises(ValueError, match="timeout"):
        averager.step(timeout=-1)
    with averager.get_tensors() as tensors:
        tensors[0][1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        averager.step(timeout=0.3)
    averager.shutdown()
    averager.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        averager.step()


def test_exported_at_top_level():
    assert hivemind_backend.DecentralizedAverager is DecentralizedAverager
    assert "DecentralizedAverager" in hivemind_backend.__all__
