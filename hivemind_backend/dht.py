"""hivemind_backend.DHT: a handle on a DHT peer running in this process (docs/dht.md).

The peer itself is C++ (dht::DhtRunner in the extension): its network threads run without the GIL,
so there is no background process and no daemon, unlike hivemind's DHT. This module adds the
Python-facing API (hivemind's names), argument checking and the value encoding (dht_values.py).
"""

from __future__ import annotations

import logging
import os
import math
import threading
import time
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Union

from hivemind_backend import _C
from hivemind_backend import dht_values

logger = logging.getLogger(__name__)

DHTKey = Union[str, bytes]
Subkey = Union[str, bytes, int]


def get_dht_time() -> float:
    """The DHT's clock: seconds since the Unix epoch, as ``time.time()`` (expirations are absolute
    times on it, so peers need roughly synchronised wall clocks, as in hivemind)."""
    return time.time()


class ValueWithExpiration(NamedTuple):
    """A value found in the DHT and the absolute time (``get_dht_time()``) it expires at."""

    value: Any
    expiration_time: float


def _addresses(name: str, value: Union[None, str, Iterable[str]]) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a multiaddr string or a list of them, got "
                        f"{type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain multiaddr strings, got {type(item).__name__} "
                            f"({item!r})")
    return items


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    return float(value)


class DHT:
    """A peer of the swarm's DHT. Thread-safe; blocking calls release the GIL.

    :param initial_peers: multiaddrs of running peers, each ending in ``/p2p/<peer id>`` (what
      ``hivemind-dht`` prints); ``None`` starts a new swarm.
    :param start: start now (default); otherwise call :meth:`start` (or :meth:`run_in_background`).
    :param host_maddrs: where to listen; port 0 picks a free port. ``/ip4/0.0.0.0/tcp/0`` listens
      on every interface and announces every local IPv4 address.
    :param announce_maddrs: what to tell others instead (NAT, port forwarding), without ``/p2p/``.
    :param identity_path: key file; created with mode 0600 when missing, so the peer id survives
      restarts. ``None``: a fresh identity each time.
    :param client_mode: accept no inbound connections and hold no records for others.
    :param encryption: CURVE-encrypted, authenticated links (off only inside a trusted cluster;
      all peers must agree).
    :param wait_timeout: deadline of each DHT call, seconds (hivemind's name and default).
    :param bootstrap_timeout: how long starting waits for the bootstrap (default 10 x wait_timeout).
    :param ensure_bootstrap_success: raise when no initial peer answers (default, as hivemind);
      ``False``: keep running, report it in :meth:`get_stats` and retry in the background.
    :param maintenance_period: how often background upkeep runs (bootstrap retries, bucket and
      cache refresh, purging expired records).
    :param bootstrap_retry_period: first delay between bootstrap retries (doubles up to 300 s).
    :param refresh_timeout: a routing-table bucket untouched this long is refreshed by a lookup.

    The Kademlia knobs ``num_replicas``, ``bucket_size``, ``depth_modulo``, ``num_workers``
    (lookup parallelism), ``cache_locally``, ``cache_nearest``, ``cache_refresh_before_expiry``,
    ``blacklist_time`` and ``backoff_rate`` mean what they mean in hivemind, with its defaults.
    """

    def __init__(
        self,
        initial_peers: Union[None, str, Sequence[str]] = None,
        *,
        start: bool = True,
        host_maddrs: Union[str, Sequence[str]] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Union[None, str, Sequence[str]] = None,
        identity_path: Optional[str] = None,
        client_mode: bool = False,
        encryption: bool = True,
        wait_timeout: float = 3.0,
        bootstrap_timeout: Optional[float] = None,
        ensure_bootstrap_success: bool = True,
        maintenance_period: float = 1.0,
        bootstrap_retry_period: float = 5.0,
        num_replicas: int = 5,
        bucket_size: int = 20,
        depth_modulo: int = 5,
        num_workers: int = 4,
        cache_locally: bool = True,
        cache_nearest: int = 1,
        cache_refresh_before_expiry: float = 5.0,
        blacklist_time: float = 5.0,
        backoff_rate: float = 2.0,
        refresh_timeout: float = 600.0,
    ):
        if identity_path is not None:
            identity_path = os.fsdecode(identity_path)  # str, bytes or os.PathLike
        wait_timeout = _positive("wait_timeout", wait_timeout)
        if bootstrap_timeout is None:
            bootstrap_timeout = 10 * wait_timeout
        for name, value in (("num_replicas", num_replicas), ("bucket_size", bucket_size),
                            ("depth_modulo", depth_modulo), ("num_workers", num_workers),
                            ("cache_nearest", cache_nearest)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < (0 if name == "cache_nearest" else 1):
                raise ValueError(f"{name} must be at least {0 if name == 'cache_nearest' else 1}, "
                                 f"got {value}")
        self._options = dict(
            initial_peers=_addresses("initial_peers", initial_peers),
            host_maddrs=_addresses("host_maddrs", host_maddrs),
            announce_maddrs=_addresses("announce_maddrs", announce_maddrs),
            identity_path=identity_path or "",
            client_mode=bool(client_mode),
            encryption=bool(encryption),
            wait_timeout=wait_timeout,
            bootstrap_timeout=_positive("bootstrap_timeout", bootstrap_timeout),
            ensure_bootstrap_success=bool(ensure_bootstrap_success),
            maintenance_period=_positive("maintenance_period", maintenance_period),
            bootstrap_retry_period=_positive("bootstrap_retry_period", bootstrap_retry_period),
            num_replicas=num_replicas,
            bucket_size=bucket_size,
            depth_modulo=depth_modulo,
            num_workers=num_workers,
            cache_locally=bool(cache_locally),
            cache_nearest=cache_nearest,
            cache_refresh_before_expiry=float(cache_refresh_before_expiry),
            blacklist_time=float(blacklist_time),
            backoff_rate=float(backoff_rate),
            refresh_timeout=_positive("refresh_timeout", refresh_timeout),
        )
        self._lock = threading.Lock()
        self._runner = None
        self._stopped = threading.Event()
        self._was_started = False
        if start:
            self.start()

    # ---- lifecycle ----

    def start(self) -> "DHT":
        """Starts the peer and bootstraps; returns once it is ready. A DHT starts only once."""
        with self._lock:
            if self._was_started:
                raise RuntimeError("this DHT was already started (create a new DHT to restart)")
            # Blocks (without the GIL) until the bootstrap ends; a failure leaves the DHT
            # unstarted, so start() may be called again.
            self._runner = _C._dht_start(**self._options)
            self._was_started = True
        return self

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """hivemind's name for :meth:`start` (the peer runs on C++ threads either way)."""
        del await_ready, timeout  # start() always returns a ready peer
        self.start()

    def run(self) -> None:
        """Starts the peer if needed and blocks until :meth:`shutdown` is called (from another
        thread or a signal handler), like hivemind's ``DHT.run``."""
        if not self._was_started:
            self.start()
        while not self._stopped.wait(timeout=1.0):
            pass

    def shutdown(self) -> None:
        """Stops the peer and closes its connections; idempotent. Calls in progress in other
        threads end with RuntimeError."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.shutdown()
        self._stopped.set()

    def is_alive(self) -> bool:
        runner = self._runner
        return runner is not None and runner.is_running

    def __enter__(self) -> "DHT":
        if not self._was_started:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # The C++ runner shuts down when freed anyway; this only makes it prompt.
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 (interpreter teardown)
            pass

    def _active(self):
        runner = self._runner
        if runner is None:
            if self._stopped.is_set():
                raise RuntimeError("the DHT is shut down")
            raise RuntimeError("the DHT is not started: call start() or pass start=True")
        return runner

    # ---- identity and status ----

    @property
    def peer_id(self) -> str:
        """This peer's id, base58 (also the last part of its addresses)."""
        return self._active().peer_id

    @property
    def client_mode(self) -> bool:
        return self._options["client_mode"]

    def get_visible_maddrs(self, latest: bool = False) -> list:
        """The multiaddrs (str) others pass as ``initial_peers``; empty in client mode."""
        del latest  # addresses are fixed once the node listens
        return list(self._active().visible_addresses)

    @property
    def owner_marker(self) -> str:
        """``"[owner:<peer id>]"``: a key or subkey containing it can only be written by this peer
        (its records are signed; others' writes are refused by every peer)."""
        return self._active().owner_marker

    def get_stats(self) -> Dict[str, Any]:
        """routing_table_size, stored_keys (records held for the swarm), cached_keys,
        blacklisted, bootstrapped, bootstrap_error ("" unless a bootstrap is failing)."""
        return self._active().stats()

    # ---- records ----

    def store(
        self,
        key: DHTKey,
        value: Any,
        expiration_time: float,
        subkey: Optional[Subkey] = None,
    ) -> bool:
        """Stores ``value`` under ``key`` (or under ``subkey`` of the dictionary at ``key``) until
        ``expiration_time`` (absolute, ``get_dht_time()`` + ttl, at most 24 h ahead).

        Returns True when at least one replica accepted it, False when the swarm refused it (a
        value with a later expiration is already there, no peer reachable, not the record's
        owner). Raises TypeError/ValueError for a bad key, value, subkey or expiration time.
        """
        raw_key = dht_values.encode_key(key)
        raw_value = dht_values.encode(value)
        raw_subkey = None if subkey is None else dht_values.encode_subkey(subkey)
        if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
            raise TypeError(
                f"expiration_time must be an absolute time in seconds (get_dht_time() + ttl), "
                f"got {type(expiration_time).__name__}"
            )
        now = get_dht_time()
        if not math.isfinite(expiration_time) or expiration_time <= now:
            raise ValueError(
                f"expiration_time {expiration_time} is not in the future (now {now:.3f}); it is "
                f"an absolute time: pass get_dht_time() + ttl"
            )
        accepted, code, message, _replicas = self._active().store(
            raw_key, raw_value, float(expiration_time), raw_subkey
        )
        if not accepted:
            logger.debug("DHT store of %r refused: %s: %s", key, code, message)
        return bool(accepted)

    def get(self, key: DHTKey, latest: bool = False) -> Optional[ValueWithExpiration]:
        """The value at ``key``, or None when no live value is found.

        A regular value comes back as ``ValueWithExpiration(value, expiration_time)``. A dictionary
        (written with subkeys) comes back as ``ValueWithExpiration({subkey:
        ValueWithExpiration(value, expiration_time), ...}, latest expiration_time)``, as in
        hivemind. ``latest=True`` asks every nearest peer and merges their answers instead of
        stopping at the first live value. Entries that do not decode (written by a buggy or
        hostile peer) are dropped with a warning.
        """
        raw_key = dht_values.encode_key(key)
        found = self._active().get(raw_key, bool(latest))
        if found is None:
            return None
        regular, dictionary = found
        if dictionary:
            entries = {}
            for raw_subkey, (raw_value, expiration) in dictionary.items():
                try:
                    entries[dht_values.decode_subkey(raw_subkey)] = ValueWithExpiration(
                        dht_values.decode(raw_value), expiration
                    )
                except ValueError as error:
                    logger.warning("dropping an undecodable entry of DHT key %r: %s", key, error)
            if not entries:
                return None
            return ValueWithExpiration(entries, max(e.expiration_time for e in entries.values()))
        if regular is None:
            return None
        raw_value, expiration = regular
        try:
            return ValueWithExpiration(dht_values.decode(raw_value), expiration)
        except ValueError as error:
            logger.warning("dropping the undecodable value of DHT key %r: %s", key, error)
            return None

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else ("stopped" if self._stopped.is_set() else "new")
        peer = f" {self._runner.peer_id}" if self._runner is not None else ""
        return f"<hivemind_backend.DHT{peer} {state}>"
