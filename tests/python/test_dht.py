"""hivemind_backend.DHT and the hivemind-dht CLI over real sockets on 127.0.0.1, real processes."""

import math
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import hivemind_backend
from hivemind_backend import DHT, ValueWithExpiration, get_dht_time
from hivemind_backend import dht_values

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def local_dht(initial_peers=None, **kwargs) -> DHT:
    return DHT(initial_peers, host_maddrs=LOCAL, wait_timeout=2.0, **kwargs)


def wait_until(condition, timeout=10.0, what="condition"):
    """Polls `condition` until it is truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def swarm():
    first = local_dht()
    peers = [first] + [local_dht(first.get_visible_maddrs()) for _ in range(3)]
    yield peers
    for peer in peers:
        peer.shutdown()


# ---- several DHTs in one process ----


def test_addresses_and_peer_id(swarm):
    first = swarm[0]
    (address,) = first.get_visible_maddrs()
    assert address.startswith("/ip4/127.0.0.1/tcp/")
    assert address.endswith("/p2p/" + first.peer_id)
    assert len({peer.peer_id for peer in swarm}) == len(swarm)
    for peer in swarm:
        assert peer.get_stats()["routing_table_size"] >= 1
    assert hivemind_backend.DHT is DHT


def test_store_and_get_bytes_and_plain_data(swarm):
    now = get_dht_time()
    assert abs(now - time.time()) < 1
    values = {
        "raw": b"\x00\xffbinary",
        "text": "héllo",
        "number": 42,
        "big": 2**100,
        "float": 0.1,
        "nan": float("nan"),
        "none": None,
        "flag": False,
        "nested": {"list": [1, (2, b"x"), {"k": None}], "tuple": (), "inf": -math.inf},
    }
    for i, (key, value) in enumerate(values.items()):
        assert swarm[i % 4].store(key, value, now + 60) is True
    for i, (key, value) in enumerate(values.items()):
        found = swarm[(i + 1) % 4].get(key)
        assert isinstance(found, ValueWithExpiration)
        assert found.expiration_time == pytest.approx(now + 60)
        if key == "nan":
            assert math.isnan(found.value)
        else:
            assert found.value == value and type(found.value) is type(value)
    assert swarm[2].get("nested").value["list"][1] == (2, b"x")
    assert swarm[3].get("never stored") is None
    # str and bytes keys are the same key (the UTF-8 bytes).
    assert swarm[1].get(b"text").value == "héllo"


def test_newer_expiration_wins_and_latest(swarm):
    now = get_dht_time()
    assert swarm[0].store("version", "v1", now + 100)
    assert swarm[1].store("version", "v2", now + 200)
    assert swarm[2].store("version", "v0", now + 50) is False  # older: refused by the swarm
    assert swarm[3].get("version", latest=True).value == "v2"


def test_subkeys_merge_into_a_dictionary(swarm):
    now = get_dht_time()
    assert swarm[0].store("experts", "a", now + 60, subkey="peer-a")
    assert swarm[1].store("experts", ["b"], now + 90, subkey=b"\x01peer-b")
    assert swarm[2].store("experts", 3, now + 30, subkey=7)
    found = swarm[3].get("experts", latest=True)
    assert found.expiration_time == pytest.approx(now + 90)
    assert found.value == {
        "peer-a": ValueWithExpiration("a", pytest.approx(now + 60)),
        b"\x01peer-b": ValueWithExpiration(["b"], pytest.approx(now + 90)),
        7: ValueWithExpiration(3, pytest.approx(now + 30)),
    }


def test_records_expire(swarm):
    assert swarm[0].store("short-lived", "soon gone", get_dht_time() + 2.0)
    assert swarm[1].get("short-lived").value == "soon gone"
    wait_until(lambda: swarm[2].get("short-lived", latest=True) is None, what="expiration")
    assert swarm[0].get("short-lived") is None


def test_owner_marked_keys_only_accept_their_owner(swarm):
    key = "progress" + swarm[1].owner_marker
    now = get_dht_time()
    assert swarm[1].store(key, {"step": 10}, now + 60)
    assert swarm[2].store(key, {"step": 999}, now + 120) is False
    assert swarm[3].get(key, latest=True).value == {"step": 10}


def test_client_mode(swarm):
    with local_dht(swarm[0].get_visible_maddrs(), client_mode=True) as client:
        assert client.client_mode and client.get_visible_maddrs() == []
        assert client.store("from-client", b"c", get_dht_time() + 60)
        assert swarm[3].get("from-client").value == b"c"
        assert client.get_stats()["stored_keys"] == 0


def test_many_threads_store_and_get_concurrently(swarm):
    expiration = get_dht_time() + 120

    def work(i):
        key = f"thread-key-{i}"
        assert swarm[i % 4].store(key, {"i": i}, expiration)
        return swarm[(i + 2) % 4].get(key).value

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(200)))
    assert results == [{"i": i} for i in range(200)]


def test_shutdown_while_other_threads_call(swarm):
    peer = swarm[1]
    assert peer.store("busy", 1, get_dht_time() + 60)
    stop = threading.Event()
    outcomes = queue.Queue()

    def hammer():
        while not stop.is_set():
            try:
                peer.get("busy", latest=True)
                outcomes.put("ok")
            except RuntimeError as error:
                outcomes.put(str(error))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes.qsize() > 8, what="calls before shutdown")
    peer.shutdown()
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        peer.get("busy")
    assert swarm[2].get("busy").value == 1


def test_context_manager_and_lifecycle():
    with local_dht() as dht:
        assert dht.is_alive()
        address = dht.get_visible_maddrs()
    assert not dht.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        dht.store("k", 1, get_dht_time() + 10)
    dht.shutdown()  # idempotent

    later = local_dht(start=False)
    with pytest.raises(RuntimeError, match="not started"):
        later.get("k")
    later.start()
    with pytest.raises(RuntimeError, match="already started"):
        later.start()
    assert later.get_visible_maddrs() != address
    later.shutdown()

    runner = local_dht(start=False)
    done = threading.Thread(target=runner.run)
    done.start()
    wait_until(runner.is_alive, what="run() starting the DHT")
    runner.shutdown()
    done.join(timeout=5)
    assert not done.is_alive()


# ---- bad input ----


def test_bad_store_and_get_arguments_raise_clear_errors(swarm):
    dht = swarm[0]
    now = get_dht_time()
    with pytest.raises(TypeError, match="keys must be str or bytes"):
        dht.store(123, "v", now + 10)
    with pytest.raises(TypeError, match="keys must be str or bytes"):
        dht.get(None)
    with pytest.raises(ValueError, match="not in the future"):
        dht.store("k", "v", now - 1)
    with pytest.raises(ValueError, match="not in the future"):
        dht.store("k", "v", float("nan"))
    with pytest.raises(TypeError, match="absolute time"):
        dht.store("k", "v", "tomorrow")
    with pytest.raises(ValueError, match="ahead, more than the cap"):
        dht.store("k", "v", now + 30 * 24 * 3600)
    with pytest.raises(ValueError, match="exceeds the cap"):
        dht.store("k", b"x" * (100 << 10), now + 10)
    with pytest.raises(TypeError, match="cannot store a builtins.set"):
        dht.store("k", {1, 2}, now + 10)
    with pytest.raises(TypeError, match="dict keys in DHT values must be str"):
        dht.store("k", {1: "one"}, now + 10)
    with pytest.raises(TypeError, match="subkeys must be str, bytes or int"):
        dht.store("k", "v", now + 10, subkey=1.5)
    assert dht.get("k") is None  # nothing was stored by the refused calls


def test_bad_addresses_and_options():
    with pytest.raises(ValueError, match="bad initial peer '/ip4/1.2.3.4/tcp/5'"):
        DHT(["/ip4/1.2.3.4/tcp/5"], host_maddrs=LOCAL)
    with pytest.raises(ValueError, match="bad initial peer"):
        DHT("/ip4/127.0.0.1/tcp/5/p2p/not-a-peer-id", host_maddrs=LOCAL)
    with pytest.raises(TypeError, match="initial_peers must contain multiaddr strings"):
        DHT([42], host_maddrs=LOCAL)
    with pytest.raises(ValueError, match="udp"):
        DHT(host_maddrs=["/ip4/127.0.0.1/udp/5"])
    with pytest.raises(ValueError, match="wait_timeout"):
        DHT(host_maddrs=LOCAL, wait_timeout=0)
    with pytest.raises(ValueError, match="num_replicas"):
        DHT(host_maddrs=LOCAL, num_replicas=0)


def test_identity_file_errors_name_the_file(tmp_path):
    exposed = tmp_path / "exposed.key"
    with local_dht(identity_path=exposed) as dht:
        peer_id = dht.peer_id
    exposed.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        local_dht(identity_path=exposed)
    exposed.chmod(0o600)
    with local_dht(identity_path=exposed) as again:
        assert again.peer_id == peer_id
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(ValueError, match="garbage.key"):
        local_dht(identity_path=garbage)


def unused_address() -> str:
    """A peer id nobody runs, at a port where nothing listens any more."""
    with local_dht() as ghost:
        (address,) = ghost.get_visible_maddrs()
    return address


def test_unreachable_initial_peer_fails_clearly_or_retries_in_background():
    address = unused_address()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="none of the 1 initial peers answered"):
        DHT([address], host_maddrs=LOCAL, wait_timeout=0.5)
    assert time.monotonic() - start < 5

    with DHT([address], host_maddrs=LOCAL, wait_timeout=0.5,
             ensure_bootstrap_success=False) as waiting:
        stats = waiting.get_stats()
        assert stats["routing_table_size"] == 0
        assert "none of the 1 initial peers answered" in stats["bootstrap_error"]
        # Alone, it still works as a one-node swarm.
        assert waiting.store("alone", 1, get_dht_time() + 10)
        assert waiting.get("alone").value == 1


# ---- value encoding ----


def test_value_encoding_round_trips_and_is_self_describing():
    samples = [None, True, 0, -7, 2**70, 1.5, -0.0, "", "ünïcode", b"", b"\x00hmv1:tricky",
               [], (), {}, [1, [2, [3]]], ((1,), {"a": b"b"}), {"$b": "not a tag", "x": ()}]
    for sample in samples:
        raw = dht_values.encode(sample)
        assert dht_values.decode(raw) == sample
        assert type(dht_values.decode(raw)) is type(sample)
    # bytes are stored verbatim, everything else behind the marker
    assert dht_values.encode(b"plain bytes") == b"plain bytes"
    assert dht_values.encode("x").startswith(dht_values.MAGIC)
    assert dht_values.encode(b"\x00hmv1:tricky").startswith(dht_values.MAGIC + b"{")


@pytest.mark.parametrize(
    "raw",
    [
        dht_values.MAGIC + b"{",
        dht_values.MAGIC + b"\xff\xfe",
        dht_values.MAGIC + b'{"a": 1}',
        dht_values.MAGIC + b'{"$b": "***"}',
        dht_values.MAGIC + b'{"$z": 1}',
        dht_values.MAGIC + b"NaN",
        dht_values.MAGIC + b"[" * 100000 + b"]" * 100000,
        dht_values.MAGIC + b'{"$t":' * 150 + b"[]" + b"}" * 150,
    ],
)
def test_malformed_values_from_the_network_raise_value_error(raw):
    with pytest.raises(ValueError, match="malformed DHT value"):
        dht_values.decode(raw)


def test_undecodable_entries_are_dropped_on_get(swarm):
    now = get_dht_time()
    # Written below the Python API, as a buggy or hostile peer would.
    swarm[0]._active().store(b"hostile", dht_values.MAGIC + b"{oops", now + 60, None)
    assert swarm[1].get("hostile") is None
    swarm[0]._active().store(b"mixed", dht_values.MAGIC + b"[", now + 60, b"bad")
    assert swarm[0].store("mixed", "fine", now + 60, subkey="good")
    assert swarm[2].get("mixed", latest=True).value == {
        "good": ValueWithExpiration("fine", pytest.approx(now + 60))
    }


# ---- the hivemind-dht CLI, as a real process ----


class CliProcess:
    """hivemind-dht in a child process; its output lines are collected by a thread."""

    def __init__(self, *args, module=False):
        command = ([sys.executable, "-m", "hivemind_backend.cli.run_dht"] if module
                   else [shutil.which("hivemind-dht") or "hivemind-dht"])
        self.process = subprocess.Popen(
            command + ["--host_maddrs", *LOCAL, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_line(self, predicate, timeout=20.0):
        def find():
            with self._lock:
                return next((line for line in self.lines if predicate(line)), None)

        def found_or_exited():
            return find() or self.process.poll() is not None

        wait_until(found_or_exited, timeout, what="expected CLI output")
        line = find()
        assert line is not None, f"the CLI exited early:\n{self.output()}"
        return line

    def initial_peers(self) -> list:
        line = self.wait_for_line(lambda line: line.startswith("--initial_peers "))
        return line.split()[1:]

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        start = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code, time.monotonic() - start

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def cli_processes():
    started = []

    def start(*args, module=False):
        cli = CliProcess(*args, module=module)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.kill()


def test_console_script_is_installed():
    assert shutil.which("hivemind-dht"), "run `make install-python` to install the console script"


def test_dhts_join_through_the_cli_address(cli_processes):
    cli = cli_processes("--refresh_period", "0.2")
    addresses = cli.initial_peers()
    assert len(addresses) == 1 and addresses[0].startswith("/ip4/127.0.0.1/tcp/")
    with local_dht(addresses) as writer, local_dht(addresses) as reader:
        assert writer.store("via-cli", {"hello": "swarm"}, get_dht_time() + 60)
        assert reader.get("via-cli", latest=True).value == {"hello": "swarm"}
        # The CLI's status line sees its peers and the records it holds.
        cli.wait_for_line(lambda line: "routing table: 2 peers" in line
                          and "records stored: 1 keys" in line)
    code, elapsed = cli.stop(signal.SIGTERM)
    assert code == 0, cli.output()
    assert elapsed < 3
    assert "DHT peer shut down" in cli.output()


def test_cli_identity_persists_across_runs_and_sigint_exits_cleanly(cli_processes, tmp_path):
    identity = tmp_path / "bootstrap.key"
    first = cli_processes("--identity_path", str(identity), module=True)
    peer_id = first.initial_peers()[0].rsplit("/p2p/", 1)[1]
    assert first.stop(signal.SIGINT)[0] == 0, first.output()
    assert stat.S_IMODE(os.stat(identity).st_mode) == 0o600

    second = cli_processes("--identity_path", str(identity))
    assert second.initial_peers()[0].rsplit("/p2p/", 1)[1] == peer_id
    assert f"peer id {peer_id}" in second.output()
    assert second.stop(signal.SIGTERM)[0] == 0, second.output()


def test_cli_keeps_running_when_its_initial_peer_is_down(cli_processes):
    cli = cli_processes("--initial_peers", unused_address(), "--wait_timeout", "0.5",
                        "--refresh_period", "0.2")
    cli.initial_peers()
    cli.wait_for_line(lambda line: "not joined yet, retrying" in line)
    assert cli.process.poll() is None
    assert cli.stop()[0] == 0, cli.output()


def test_cli_bad_arguments_exit_with_a_message():
    result = subprocess.run(
        [shutil.which("hivemind-dht") or "hivemind-dht", "--initial_peers", "/ip4/nonsense"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "bad initial peer '/ip4/nonsense'" in result.stderr
