"""DecentralizedAverager state sharing (allow_state_sharing, get_current_state, publish_state,
load_state_from_peers) over real DHT peers and sockets on 127.0.0.1, several peers in one process.

Mid-download events (a donor dying, a shutdown, a publish) are triggered from the download's
on_progress callback, never by sleeping; a chunk size of 256 KiB keeps what the stream windows
buffer well below the size of the state, so a donor shut down a quarter through has not sent it
all yet."""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from averager_fixtures import averagers, local_dht, swarm  # noqa: F401  (fixtures)
import torch

import hivemind_backend.state_sharing as state_sharing_module
from hivemind_backend import DecentralizedAverager, _C

SMALL_CHUNK = 256 << 10
BIG = 8 << 20  # float32 elements: 32 MiB, 128 chunks of SMALL_CHUNK


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(state_sharing_module, "STATE_CHUNK_BYTES", SMALL_CHUNK)


def assert_same_tensors(got, want):
    assert len(got) == len(want)
    for i, (mine, theirs) in enumerate(zip(got, want)):
        assert mine.device.type == "cpu", i
        assert mine.dtype == theirs.dtype, i
        assert mine.shape == theirs.shape, i
        assert torch.equal(mine, theirs), i


def held(averager):
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


def zeros_like(tensors):
    return [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]


# ---- downloading ----


def test_newcomer_downloads_the_exact_tensors_and_metadata_of_a_donor(swarm, averagers):
    torch.manual_seed(0)
    tensors = [
        torch.randn(5, 3),
        torch.randn(4, dtype=torch.float64),
        torch.randn(7).to(torch.bfloat16),
        torch.randn(2, 2).to(torch.float16),
        torch.randn(3, 4).t(),  # non-contiguous: shared with its shape, in row-major order
    ]
    donor = averagers([t.clone() for t in tensors], swarm[0], prefix="exact",
                      target_group_size=2, initial_group_bits="1")
    assert donor.allow_state_sharing
    # The sharing thread's first snapshot, then ours: nothing publishes after it in this test.
    assert donor._wait_for_state_version(0, timeout=30)
    version = donor.publish_state()
    assert version == donor.shared_state_version > 0
    newcomer = averagers(zeros_like(tensors), swarm[1], prefix="exact", allow_state_sharing=False)

    result = newcomer.load_state_from_peers(timeout=30)

    assert result is not None, newcomer.last_load_report
    metadata, loaded = result
    assert metadata == {"group_key": "1"}  # hivemind's default metadata: the group bits
    assert_same_tensors(loaded, tensors)
    report = newcomer.last_load_report
    assert report["error"] is None
    assert report["donor"] == swarm[0].peer_id
    assert report["version"] == version
    assert report["attempts"][-1]["ok"]
    assert report["total_bytes"] == sum(t.numel() * t.element_size() for t in tensors) + len(
        b'\x00hmv1:{"$d":{"group_key":"1"}}')
    # load_state_from_peers returns the state; the newcomer's own tensors are untouched, and the
    # downloaded ones are its own memory.
    assert all(not t.any() for t in held(newcomer))
    loaded[0].fill_(42.0)
    assert_same_tensors(held(donor), tensors)
    # Publishing while holding the tensor lock (get_current_state takes it again) is fine.
    with donor.get_tensors():
        assert donor.publish_state() > version


class TrainerState(DecentralizedAverager):
    """hivemind's pattern: get_current_state shares more than the averaged tensors, and needs
    attributes set after super().__init__, so sharing starts with run_in_background()."""

    def __init__(self, parameters, dht, **kwargs):
        super().__init__(parameters, dht, start=False, **kwargs)
        self.epoch = 7
        self.extra = [
            torch.arange(6, dtype=torch.int64).reshape(2, 3),
            torch.tensor([True, False, True]),
            torch.tensor(3.5, dtype=torch.float64),  # 0-dimensional
            torch.empty(0, 4),
            torch.arange(4, dtype=torch.uint8),
        ]
        self.run_in_background()

    def get_current_state(self):
        with self.get_tensors() as tensors:
            metadata = {"epoch": self.epoch, "lr": 0.1, "betas": (0.9, 0.99), "name": "adam",
                        "blob": b"\x00\x01", "nothing": None}
            return metadata, list(tensors) + self.extra


def test_overridden_get_current_state_is_what_newcomers_get(swarm, averagers):
    parameters = [torch.linspace(0, 1, 11)]
    donor = TrainerState([p.clone() for p in parameters], swarm[0], prefix="custom")
    # No publish_state(): the sharing thread takes the first snapshot once started.
    assert donor._wait_for_state_version(0, timeout=30), donor.last_share_report
    newcomer = averagers(zeros_like(parameters), swarm[1], prefix="custom",
                         allow_state_sharing=False)
    try:
        metadata, loaded = newcomer.load_state_from_peers(timeout=30)
    finally:
        donor.shutdown()
    assert metadata == {"epoch": 7, "lr": 0.1, "betas": (0.9, 0.99), "name": "adam",
                        "blob": b"\x00\x01", "nothing": None}
    assert_same_tensors(loaded, parameters + donor.extra)


def test_a_step_publishes_the_averaged_state(swarm, averagers):
    pair = [averagers([torch.full((6,), float(i))], swarm[i], prefix="stepped",
                      target_group_size=2) for i in range(2)]
    for averager in pair:
        assert averager._wait_for_state_version(0, timeout=30)
    before = [averager.shared_state_version for averager in pair]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(a.step) for a in pair]]
    assert all(r is not None for r in results)
    for averager, version in zip(pair, before):
        assert averager._wait_for_state_version(version, timeout=30), averager.last_share_report

    newcomer = averagers([torch.zeros(6)], swarm[2], prefix="stepped", allow_state_sharing=False)
    _metadata, loaded = newcomer.load_state_from_peers(timeout=30)
    assert torch.equal(loaded[0], torch.full((6,), 0.5))
    assert newcomer.last_load_report["donor"] in {swarm[0].peer_id, swarm[1].peer_id}


# ---- choosing the donor ----


def test_priority_decides_and_peers_that_do_not_share_are_never_chosen(swarm, averagers):
    high = averagers([torch.full((3,), 1.0)], swarm[0], prefix="pick", state_sharing_priority=2)
    low = averagers([torch.full((3,), 2.0)], swarm[1], prefix="pick")
    silent = averagers([torch.full((3,), 3.0)], swarm[2], prefix="pick",
                       allow_state_sharing=False)
    assert not silent.allow_state_sharing and silent.shared_state_version == 0
    high.publish_state()
    low.publish_state()
    newcomer = averagers([torch.zeros(3)], swarm[3], prefix="pick", allow_state_sharing=False)

    for _ in range(3):
        _metadata, loaded = newcomer.load_state_from_peers(timeout=30)
        assert torch.equal(loaded[0], torch.full((3,), 1.0))
        report = newcomer.last_load_report
        assert report["donor"] == swarm[0].peer_id
        assert report["candidates"] == [swarm[0].peer_id, swarm[1].peer_id]

    # Turning sharing off stops serving at once; the "not sharing" record follows in the
    # background, and until then a newcomer that tries this peer is refused and moves on.
    high.allow_state_sharing = False
    assert high.shared_state_version == 0
    _metadata, loaded = newcomer.load_state_from_peers(timeout=30)
    assert torch.equal(loaded[0], torch.full((3,), 2.0))
    assert newcomer.last_load_report["donor"] == swarm[1].peer_id
    assert all(a["peer_id"] != swarm[2].peer_id for a in newcomer.last_load_report["attempts"])

    # Turned on later, with a higher priority: the new donor wins.
    silent.allow_state_sharing = True
    silent.state_sharing_priority = 5.0
    silent.publish_state()
    _metadata, loaded = newcomer.load_state_from_peers(timeout=30)
    assert torch.equal(loaded[0], torch.full((3,), 3.0))
    assert newcomer.last_load_report["donor"] == swarm[2].peer_id


class UnreadableDonor(DecentralizedAverager):
    """Serves verified bytes that are not a state (metadata that does not decode), as a buggy or
    hostile peer could."""

    def _snapshot_current_state(self):
        snapshot = _C._StateSnapshot(b"\x00hmv1:{not json")
        snapshot.add_tensor("0", "float32", [0], 0)
        return snapshot


def test_an_unreadable_state_is_skipped_for_the_next_donor(swarm, averagers):
    bad = UnreadableDonor([torch.ones(2)], swarm[0], prefix="hostile", state_sharing_priority=9)
    try:
        bad.publish_state()
        good = averagers([torch.full((2,), 4.0)], swarm[1], prefix="hostile")
        good.publish_state()
        newcomer = averagers([torch.zeros(2)], swarm[2], prefix="hostile",
                             allow_state_sharing=False)
        _metadata, loaded = newcomer.load_state_from_peers(timeout=30)
    finally:
        bad.shutdown()
    assert torch.equal(loaded[0], torch.full((2,), 4.0))
    attempts = newcomer.last_load_report["attempts"]
    assert attempts[0]["peer_id"] == swarm[0].peer_id and not attempts[0]["ok"]
    assert "unreadable state" in attempts[0]["status"]
    assert newcomer.last_load_report["donor"] == swarm[1].peer_id


# ---- failures ----


def test_no_donor_returns_none_quickly_with_a_reason(swarm, averagers):
    lonely = averagers([torch.ones(3)], swarm[0], prefix="alone")
    lonely.publish_state()  # its own state does not count: nobody else shares under "alone"
    start = time.monotonic()
    assert lonely.load_state_from_peers(timeout=5) is None
    assert time.monotonic() - start < 5
    assert "no other peer shares its state under prefix 'alone'" in \
        lonely.last_load_report["error"]

    pending = lonely.load_state_from_peers(wait=False, timeout=5)
    assert isinstance(pending, Future)
    assert pending.result(timeout=30) is None


def test_a_donor_shut_down_midway_is_replaced_by_the_next_one(swarm, averagers, small_chunks):
    torch.manual_seed(1)
    big = torch.randn(BIG)
    first = averagers([big.clone()], swarm[0], prefix="failover", state_sharing_priority=1)
    second = averagers([big.clone()], swarm[1], prefix="failover")
    first.publish_state()
    second.publish_state()
    newcomer = averagers([torch.zeros(BIG)], swarm[2], prefix="failover",
                         allow_state_sharing=False)
    first_id, second_id = swarm[0].peer_id, swarm[1].peer_id
    killed = []

    def kill_first_donor(donor, verified, total):
        if not killed and donor == first_id and verified >= total // 4:
            killed.append(verified)
            first.shutdown()
            swarm[0].shutdown()  # its node too: the stream fails as for a dead process

    result = newcomer.load_state_from_peers(timeout=60, on_progress=kill_first_donor)

    assert killed, "the first donor was never used"
    assert result is not None, newcomer.last_load_report
    assert torch.equal(result[1][0], big)
    report = newcomer.last_load_report
    assert report["donor"] == second_id
    attempts = report["attempts"]
    assert attempts[0]["peer_id"] == first_id and not attempts[0]["ok"]
    assert 0 < attempts[0]["bytes_verified"] < big.numel() * 4
    assert attempts[-1]["peer_id"] == second_id and attempts[-1]["ok"]


def test_shutdown_during_a_download_returns_none_promptly(swarm, averagers, small_chunks):
    donor = averagers([torch.randn(BIG)], swarm[0], prefix="abort")
    donor.publish_state()
    newcomer = averagers([torch.zeros(BIG)], swarm[1], prefix="abort", allow_state_sharing=False)
    started, resume = threading.Event(), threading.Event()

    def pause_at_first_chunk(_donor, _verified, _total):
        if not started.is_set():
            started.set()
            resume.wait(timeout=30)

    pending = newcomer.load_state_from_peers(wait=False, timeout=120,
                                             on_progress=pause_at_first_chunk)
    assert started.wait(timeout=30)
    begin = time.monotonic()
    newcomer.shutdown()
    resume.set()
    assert pending.result(timeout=30) is None
    assert time.monotonic() - begin < 5
    assert newcomer.last_load_report["error"] == "the averager was shut down"
    with pytest.raises(RuntimeError, match="shut down"):
        newcomer.load_state_from_peers()


def test_a_download_keeps_its_snapshot_while_the_donor_publishes_and_steps(swarm, averagers,
                                                                           small_chunks):
    first_state = torch.full((BIG,), 1.0)
    donor = averagers([first_state.clone()], swarm[0], prefix="consistent", target_group_size=2)
    partner = averagers([torch.full((BIG,), 3.0)], swarm[1], prefix="consistent",
                        target_group_size=2, allow_state_sharing=False)
    donor.publish_state()
    newcomer = averagers([torch.zeros(BIG)], swarm[2], prefix="consistent",
                         allow_state_sharing=False)
    started, resume = threading.Event(), threading.Event()

    def pause_at_first_chunk(_donor, _verified, _total):
        if not started.is_set():
            started.set()
            resume.wait(timeout=60)

    pending = newcomer.load_state_from_peers(wait=False, timeout=120,
                                             on_progress=pause_at_first_chunk)
    try:
        assert started.wait(timeout=30)
        # While a download of the old snapshot is in progress (and stalled), the donor averages
        # and publishes: neither waits for the download.
        with ThreadPoolExecutor(max_workers=2) as pool:
            steps = [pool.submit(a.step, timeout=30) for a in (donor, partner)]
            assert all(f.result(timeout=60) is not None for f in steps)
        donor.publish_state()
    finally:
        resume.set()
    _metadata, loaded = pending.result(timeout=60)
    assert torch.equal(loaded[0], first_state)  # the snapshot it started with, whole
    assert newcomer.last_load_report["donor"] == swarm[0].peer_id
    _metadata, loaded = newcomer.load_state_from_peers(timeout=60)
    assert torch.equal(loaded[0], torch.full((BIG,), 2.0))


# ---- bad input ----


class BadState(DecentralizedAverager):
    def __init__(self, *args, state, **kwargs):
        self.state = state
        super().__init__(*args, start=False, **kwargs)

    def get_current_state(self):
        return self.state


def test_bad_arguments_and_unshareable_states_raise_clear_errors(swarm, averagers):
    tensors = [torch.zeros(3)]
    with pytest.raises(TypeError, match="allow_state_sharing must be a bool"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", allow_state_sharing="yes")
    with pytest.raises(TypeError, match="state_sharing_priority must be a number"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", state_sharing_priority="high")
    with pytest.raises(ValueError, match="must be finite"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad",
                              state_sharing_priority=float("nan"))
    with pytest.raises(ValueError, match="declare_state_period must be at least 1 s"):
        DecentralizedAverager(tensors, swarm[0], prefix="bad", declare_state_period=0.5)

    cases = [
        (({1, 2}, [torch.zeros(1)]), TypeError, "cannot store a builtins.set"),
        ((None, torch.zeros(3)), TypeError, "list or tuple of tensors"),
        ((None, [torch.zeros(1), "w"]), TypeError, "tensor 1 is a str"),
        ((None, [torch.eye(2).to_sparse()]), ValueError, "only dense tensors"),
        ([None], TypeError, r"must return \(metadata, tensors\)"),
    ]
    for state, error, message in cases:
        averager = BadState(tensors, swarm[1], prefix="unshareable", state=state)
        try:
            with pytest.raises(error, match=message):
                averager.publish_state()
        finally:
            averager.shutdown()

    averager = averagers(tensors, swarm[0], prefix="ok")
    with pytest.raises(ValueError, match="timeout"):
        averager.load_state_from_peers(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        averager.load_state_from_peers(timeout="soon")
    with pytest.raises(TypeError, match="on_progress must be callable"):
        averager.load_state_from_peers(on_progress=3)
    with pytest.raises(TypeError, match="must be a bool"):
        averager.allow_state_sharing = 1
    averager.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        averager.publish_state()
    with pytest.raises(RuntimeError, match="shut down"):
        averager.load_state_from_peers()


def test_who_may_share(swarm, averagers):
    with local_dht(swarm[0].get_visible_maddrs(), client_mode=True) as client_dht:
        client = averagers([torch.ones(2)], client_dht, prefix="who")
        assert not client.allow_state_sharing  # hivemind's default for client mode
        with pytest.raises(ValueError, match="client-mode averager cannot share"):
            client.allow_state_sharing = True
        with pytest.raises(ValueError, match="client-mode averager cannot share"):
            client.state_sharing_priority = 1.0
        with pytest.raises(RuntimeError, match="state sharing is off"):
            client.publish_state()
        # A client can still download.
        donor = averagers([torch.full((2,), 6.0)], swarm[1], prefix="who")
        donor.publish_state()
        _metadata, loaded = client.load_state_from_peers(timeout=30)
        assert torch.equal(loaded[0], torch.full((2,), 6.0))

    helper = averagers([torch.ones(2)], swarm[2], prefix="who", auxiliary=True)
    assert not helper.allow_state_sharing  # auxiliary peers hold no state of the swarm

    # One donor per DHT peer and prefix: a second averager does not share by default, and
    # asking it to raises.
    first = averagers([torch.ones(2)], swarm[3], prefix="twice")
    second = averagers([torch.ones(2)], swarm[3], prefix="twice")
    assert first.allow_state_sharing and not second.allow_state_sharing
    with pytest.raises(ValueError, match="already shares its state under prefix 'twice'"):
        second.allow_state_sharing = True
    with pytest.raises(ValueError, match="already shares"):
        DecentralizedAverager([torch.ones(2)], swarm[3], prefix="twice", allow_state_sharing=True)
    # Another prefix on the same DHT shares on its own.
    assert averagers([torch.ones(2)], swarm[3], prefix="other").allow_state_sharing
    first.shutdown()
    second.allow_state_sharing = True  # the slot is free again
    assert second.allow_state_sharing
