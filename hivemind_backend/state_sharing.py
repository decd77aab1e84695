"""State sharing for hivemind_backend.DecentralizedAverager: hivemind's ``allow_state_sharing``,
``get_current_state`` and ``load_state_from_peers`` (docs/averaging.md, "State sharing").

The transfer itself is C++ (csrc/averaging/state_*: a donor serves published snapshots in
checksummed chunks, a newcomer downloads them; bound in csrc/torch/state_sharing_bindings.cpp).
This module decides what a snapshot holds (``get_current_state``) and when one is taken, keeps the
priority records, and orders the donors. ``StateSharingMixin`` needs the averager's ``_dht``,
``prefix``, ``client_mode``, ``auxiliary``, ``_shutdown``, ``lock_averaged_tensors`` and
``_tensors``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from hivemind_backend import _C
from hivemind_backend import dht_values
from hivemind_backend.arguments import dtype_name, seconds
from hivemind_backend.dht import get_dht_time

logger = logging.getLogger(__name__)

# State sharing. A snapshot travels in checksummed chunks of this size (StateDonorOptions).
STATE_CHUNK_BYTES = 4 << 20
# Downloads one donor serves at once; more are refused at once and go to another donor.
STATE_MAX_CONCURRENT_DOWNLOADS = 4
# Used when load_state_from_peers(timeout=None): the whole download, every donor included.
DEFAULT_LOAD_STATE_TIMEOUT = 300.0
# A donor silent this long (no manifest, no next chunk) is abandoned for the next one.
STATE_MESSAGE_TIMEOUT = 30.0
# First pause before retrying a snapshot or an advert that failed; it doubles up to half of
# declare_state_period.
STATE_RETRY_PAUSE = 0.1
# The DHT dictionary where donors keep their state_sharing_priority, one owner-signed subkey each
# (the state adverts themselves live in "<prefix>.state", written by the C++ StateDonor).
STATE_PRIORITY_SUFFIX = ".state_priority"
_OWNER_MARKER = re.compile(r"\[owner:([1-9A-HJ-NP-Za-km-z]+)\]")


def _priority(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"state_sharing_priority must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"state_sharing_priority must be finite, got {value}")
    return float(value)


def _unpack_state(state: Any) -> Tuple[Any, Sequence[torch.Tensor]]:
    """(metadata, tensors) from what get_current_state returned. hivemind's optimizer returns a
    third element (per-tensor compression infos); it is accepted and ignored."""
    if not isinstance(state, (tuple, list)) or len(state) not in (2, 3):
        raise TypeError(f"get_current_state() must return (metadata, tensors), got "
                        f"{type(state).__name__}"
                        + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
    metadata, tensors = state[0], state[1]
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"get_current_state() must return a list or tuple of tensors, got "
                        f"{type(tensors).__name__}")
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"get_current_state() tensor {i} is a {type(tensor).__name__}, not a "
                            f"tensor")
        if tensor.layout != torch.strided or tensor.is_quantized:
            kind = "quantized" if tensor.is_quantized else f"layout {tensor.layout}"
            raise ValueError(f"get_current_state() tensor {i} is {kind}; only dense tensors can "
                             f"be shared")
    return metadata, tensors


def _tensor_from_state(index: int, dtype_name: str, shape: Sequence[int], buffer) -> torch.Tensor:
    """A CPU tensor viewing the downloaded bytes. Everything here comes from another peer (the
    native transfer verifies the bytes against the donor's checksums, but carries dtype and shape
    without reading them), so it is checked before any tensor is built."""
    dtype = getattr(torch, dtype_name, None) if dtype_name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {index} has dtype {dtype_name!r}, which is not a torch dtype")
    if any(dim < 0 for dim in shape):
        raise ValueError(f"tensor {index} has a negative dimension in its shape {list(shape)}")
    numel = math.prod(shape)
    if len(buffer) != numel * dtype.itemsize:
        raise ValueError(f"tensor {index} ({dtype_name}, shape {list(shape)}) should take "
                         f"{numel * dtype.itemsize} bytes, the donor sent {len(buffer)}")
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    try:
        # The bytes become the tensor's storage, with no copy; the buffer lives as long as the
        # tensor does.
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(tuple(shape))
    except (RuntimeError, TypeError) as error:  # e.g. quantized dtypes cannot view bytes
        raise ValueError(f"tensor {index} cannot be built as {dtype_name}: {error}") from None


def _owner_of(subkey: Any) -> Optional[str]:
    """The peer id in an owner-marker subkey ("[owner:<peer id>]"), which only that peer can
    write; None for anything else."""
    if isinstance(subkey, bytes):
        subkey = subkey.decode("ascii", errors="replace")
    if not isinstance(subkey, str):
        return None
    match = _OWNER_MARKER.fullmatch(subkey)
    return match.group(1) if match else None


def _share_state_periodically(averager_ref: "weakref.ref", wakeup: threading.Event,
                              stopped: threading.Event) -> None:
    """The state-sharing thread of one averager: snapshots and adverts (see
    ``DecentralizedAverager._share_state_once``). It holds the averager only weakly between
    rounds, so an averager nobody references is still garbage-collected (and shut down)."""
    while not stopped.is_set():
        averager = averager_ref()
        if averager is None:
            return
        delay = averager._share_state_once()
        del averager
        if delay is None:
            return
        wakeup.wait(delay)


def validate_arguments(allow_state_sharing: Any, state_sharing_priority: Any,
                       declare_state_period: Any) -> float:
    """Checks the constructor's state-sharing arguments before anything touches the network;
    returns declare_state_period in seconds."""
    if allow_state_sharing is not None and not isinstance(allow_state_sharing, bool):
        raise TypeError(f"allow_state_sharing must be a bool or None, got "
                        f"{type(allow_state_sharing).__name__}")
    _priority(state_sharing_priority)
    if isinstance(declare_state_period, bool) or not isinstance(declare_state_period, (int, float)):
        raise TypeError(f"declare_state_period must be a number of seconds, got "
                        f"{type(declare_state_period).__name__}")
    if not math.isfinite(declare_state_period) or declare_state_period < 1:
        raise ValueError(f"declare_state_period must be at least 1 s (the DHT entries live "
                         f"that long), got {declare_state_period}")
    return float(declare_state_period)


class StateSharingMixin:
    """The state-sharing half of DecentralizedAverager (see the module docstring)."""

    def _init_state_sharing(self, allow_state_sharing: Optional[bool],
                            state_sharing_priority: float, declare_state_period: float) -> None:
        self.declare_state_period = declare_state_period
        # _sharing_lock guards the fields below (and _sharer, _loaders): short holds only.
        self._allow_state_sharing = False
        self._state_sharing_priority = 0.0
        self._state_dirty = False  # the state changed since the last snapshot
        self._withdraw_due = False  # the priority record must say "not sharing" now
        self._sharing_failures = 0
        self._sharing_thread: Optional[threading.Thread] = None
        self._sharing_wakeup = threading.Event()
        # One publish + advert at a time, so versions and DHT records are written in order.
        self._publish_lock = threading.Lock()
        self._snapshots_taken = 0  # guarded by lock_averaged_tensors
        self._snapshots_published = 0  # guarded by _publish_lock
        # Notified after every publish; _published_version is the last version advertised.
        self._state_published = threading.Condition()
        self._published_version = 0
        #: What the last snapshot and advert did: version, bytes, seconds, error.
        self.last_share_report: Optional[Dict[str, Any]] = None
        #: What the last load_state_from_peers did: donor, attempts, error (see that method).
        self.last_load_report: Optional[Dict[str, Any]] = None
        self.state_sharing_priority = state_sharing_priority
        if allow_state_sharing is None:
            allow_state_sharing = not self.client_mode and not self.auxiliary
            try:
                self._set_state_sharing(allow_state_sharing)
            except ValueError as error:  # another averager of this DHT shares this prefix
                logger.info("state sharing is off for this averager: %s", error)
        else:
            self.allow_state_sharing = allow_state_sharing


    @property
    def allow_state_sharing(self) -> bool:
        """Whether newcomers can download this peer's state. Setting it to False stops serving at
        once (downloads in progress go on with another donor) and tells newcomers, through the
        DHT, not to try this peer."""
        return self._allow_state_sharing

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"allow_state_sharing must be a bool, got {type(value).__name__}")
        if value and self.client_mode:
            raise ValueError("cannot allow state sharing: a client-mode averager cannot share its "
                             "state (nobody can connect to it)")
        self._set_state_sharing(value)

    def _set_state_sharing(self, value: bool) -> None:
        with self._sharing_lock:
            if value == self._allow_state_sharing:
                return
            if value:
                if self._shutdown.is_set():
                    raise RuntimeError("the averager is shut down")
                # Raises ValueError when another averager of this DHT shares under this prefix.
                self._sharer = _C._StateSharer(
                    runner=self._dht._active(), prefix=self.prefix, chunk_bytes=STATE_CHUNK_BYTES,
                    max_concurrent_downloads=STATE_MAX_CONCURRENT_DOWNLOADS)
                self._state_dirty = True
                self._withdraw_due = False
                sharer = None
            else:
                sharer, self._sharer = self._sharer, None
                self._withdraw_due = True
            self._allow_state_sharing = value
        if sharer is not None:
            sharer.stop()
        self._sharing_wakeup.set()

    @property
    def state_sharing_priority(self) -> float:
        """Newcomers prefer donors with a higher priority (hivemind's optimizer uses its epoch)."""
        return self._state_sharing_priority

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        value = _priority(value)
        if value and self.client_mode:
            raise ValueError("state_sharing_priority is unused: a client-mode averager cannot "
                             "share its state")
        with self._sharing_lock:
            changed = value != self._state_sharing_priority
            self._state_sharing_priority = value
            sharing = self._sharer is not None
        if changed and sharing:
            self._sharing_wakeup.set()  # the sharing thread re-advertises with the new value

    @property
    def shared_state_version(self) -> int:
        """Version of the snapshot this peer serves (milliseconds since the epoch when it was
        published); 0 when it serves none."""
        sharer = self._sharer
        return sharer.version if sharer is not None else 0

    def get_current_state(self) -> Tuple[Any, Sequence[torch.Tensor]]:
        """What newcomers download from this peer: ``(metadata, tensors)``. Override it to share
        more (hivemind's optimizer adds its optimizer state and epoch).

        ``metadata`` is plain data (what :meth:`step`'s ``gather`` accepts, without the size cap;
        never pickled); ``tensors`` are dense tensors of any dtype and device. The default is
        hivemind's: ``({"group_key": self.get_group_bits()}, the averaged tensors)``. It runs with
        the tensor lock held (``get_tensors()`` inside it is fine: the lock is reentrant) and the
        tensors' bytes are copied before the lock is released, so the snapshot is consistent and
        the tensors may change right after."""
        with self.get_tensors() as tensors:
            return {"group_key": self.get_group_bits()}, tensors

    def publish_state(self) -> int:
        """Snapshots :meth:`get_current_state` now, serves it to newcomers from now on, and
        refreshes this peer's DHT entries; returns the new version. Snapshots are also taken by
        themselves after every successful step (and when sharing starts); call this after
        changing the state some other way (a local optimizer step, a checkpoint load). Raises
        RuntimeError when sharing is off, and what ``get_current_state`` raises, or TypeError /
        ValueError when what it returned cannot be shared."""
        if self._shutdown.is_set():
            raise RuntimeError("the averager is shut down")
        with self._sharing_lock:
            sharer = self._sharer
            if sharer is not None:
                self._state_dirty = False  # the snapshot below covers every change so far
        if sharer is None:
            raise RuntimeError("state sharing is off for this averager (allow_state_sharing is "
                               "False)")
        return self._share(sharer, publish=True)

    def _note_state_changed(self) -> None:
        with self._sharing_lock:
            if self._sharer is None:
                return
            self._state_dirty = True
        self._sharing_wakeup.set()

    def _snapshot_current_state(self):
        """get_current_state() copied into a native snapshot. Called with the tensor lock held."""
        with self.lock_averaged_tensors:
            metadata, tensors = _unpack_state(self.get_current_state())
            snapshot = _C._StateSnapshot(dht_values.encode(metadata))
            with torch.no_grad():
                for i, tensor in enumerate(tensors):
                    source = tensor.detach()
                    if source.device.type != "cpu":
                        source = source.cpu()
                    source = source.contiguous()
                    size = source.numel() * source.element_size()
                    buffer = snapshot.add_tensor(str(i), dtype_name(source), list(source.shape),
                                                 size)
                    if size:
                        torch.frombuffer(buffer, dtype=torch.uint8).copy_(
                            source.reshape(-1).view(torch.uint8))
        return snapshot

    def _share(self, sharer, publish: bool) -> int:
        """One snapshot (when ``publish``, or when none was published yet) and one refresh of
        both DHT entries. Raises on failure.

        The snapshot is taken under the tensor lock alone and published (checksums) after it is
        released, under the publish lock alone: holding both at once could deadlock with a user
        thread that calls publish_state() inside get_tensors(). Snapshots are numbered under the
        tensor lock, so one that lost the race to a newer one is dropped, never published over
        it."""
        started = time.monotonic()
        snapshot = None
        if publish or sharer.version == 0:
            with self.lock_averaged_tensors:
                snapshot = self._snapshot_current_state()
                self._snapshots_taken += 1
                number = self._snapshots_taken
        with self._publish_lock:
            total_bytes = None
            if snapshot is not None and number > self._snapshots_published:
                total_bytes = snapshot.total_bytes
                sharer.publish(snapshot)  # checksums, without the GIL and the tensor lock
                self._snapshots_published = number
            version = sharer.version
            sharer.advertise(self.declare_state_period)
            self._store_priority_record(self._state_sharing_priority)
            self.last_share_report = {
                "error": None,
                "version": version,
                "published": total_bytes is not None,
                "total_bytes": total_bytes,
                "seconds": time.monotonic() - started,
            }
        with self._state_published:
            self._published_version = max(self._published_version, version)
            self._state_published.notify_all()
        return version

    def _store_priority_record(self, priority: Optional[float]) -> None:
        """This peer's entry in "<prefix>.state_priority": its priority, or None for "not
        sharing" (which newcomers skip). The subkey is the owner marker, so only this peer can
        write it."""
        stored = self._dht.store(self.prefix + STATE_PRIORITY_SUFFIX, priority,
                                 get_dht_time() + self.declare_state_period,
                                 subkey=self._dht.owner_marker.encode("ascii"))
        if not stored:
            # Newcomers then rank this donor as priority 0 (or still try it after it stopped).
            logger.debug("the DHT refused this peer's state_sharing_priority record")

    def _share_state_once(self) -> Optional[float]:
        """One round of the sharing thread; returns how long to wait before the next (a
        setter, a step or shutdown wakes it earlier), or None to end the thread."""
        self._sharing_wakeup.clear()  # before reading the flags: a later change wakes us again
        if self._shutdown.is_set() or not self._dht.is_alive():
            return None
        with self._sharing_lock:
            sharer = self._sharer
            publish, self._state_dirty = self._state_dirty, False
            withdraw, self._withdraw_due = self._withdraw_due, False
        try:
            if sharer is None:
                if withdraw:
                    self._store_priority_record(None)
                return self.declare_state_period
            self._share(sharer, publish)
        except Exception as error:  # noqa: BLE001 (user code in get_current_state, DHT errors)
            if self._shutdown.is_set() or not self._dht.is_alive():
                return None
            if sharer is not None and sharer is not self._sharer:
                return 0.0  # sharing was turned off meanwhile: not a failure
            with self._sharing_lock:
                self._state_dirty |= publish
                self._withdraw_due |= withdraw
            self._sharing_failures += 1
            log = logger.warning if self._sharing_failures == 1 else logger.debug
            log("state sharing: %s: %s (retrying)", type(error).__name__, error)
            self.last_share_report = {"error": f"{type(error).__name__}: {error}"}
            return min(self.declare_state_period / 2,
                       STATE_RETRY_PAUSE * 2 ** min(self._sharing_failures - 1, 20))
        self._sharing_failures = 0
        return self.declare_state_period / 2

    def _wait_for_state_version(self, above: int, timeout: float) -> bool:
        """Waits until a snapshot newer than ``above`` is published and advertised."""
        with self._state_published:
            return self._state_published.wait_for(lambda: self._published_version > above,
                                                  timeout=timeout)

    def load_state_from_peers(
        self,
        wait: bool = True,
        timeout: Optional[float] = None,
        *,
        on_progress: Optional[Callable[[str, int, int], None]] = None,
    ) -> Union[Optional[Tuple[Any, List[torch.Tensor]]], Future]:
        """Downloads the state of another peer of this prefix (what its
        :meth:`get_current_state` returned) from the best donor: highest
        ``state_sharing_priority`` first, then the least loaded, then at random. A donor that
        fails midway is replaced by the next one. This peer's own tensors are left as they are.

        :param timeout: bound on the whole call, the DHT lookup and every donor included
          (default 300 s).
        :param on_progress: called as ``on_progress(donor_peer_id, verified_bytes,
          total_bytes)`` after each verified chunk, on the downloading thread.
        :param wait: False returns a ``concurrent.futures.Future`` of the same result.
        :returns: ``(metadata, tensors)``: the donor's metadata (plain data) and its tensors as
          CPU tensors of its dtypes and shapes; or None when no state could be downloaded (no
          donor, every donor failed, timeout, shutdown), with the reason logged and kept in
          ``last_load_report["error"]``.
        """
        timeout = (DEFAULT_LOAD_STATE_TIMEOUT if timeout is None
                   else seconds("timeout", timeout))
        if on_progress is not None and not callable(on_progress):
            raise TypeError(f"on_progress must be callable, got {type(on_progress).__name__}")
        if self._shutdown.is_set():
            raise RuntimeError("the averager is shut down")
        if wait:
            return self._load_state(timeout, on_progress)
        with self._executor_lock:
            if self._load_executor is None:
                self._load_executor = ThreadPoolExecutor(max_workers=1,
                                                         thread_name_prefix="averager-load")
            return self._load_executor.submit(self._load_state, timeout, on_progress)

    def _ordered_donors(self) -> list:
        """The peers to download from, best first; this peer and peers that stopped sharing are
        left out."""
        found = _C._find_state_donors(self._dht._active(), self.prefix)
        priorities: Dict[str, Optional[float]] = {}
        record = self._dht.get(self.prefix + STATE_PRIORITY_SUFFIX, latest=True)
        if record is not None and isinstance(record.value, dict):
            for subkey, entry in record.value.items():
                owner = _owner_of(subkey)
                value = entry.value
                if owner is None:
                    continue
                if value is None:
                    priorities[owner] = None
                elif (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value)):
                    priorities[owner] = float(value)
        own = self._dht.peer_id
        ranked = []
        for index, donor in enumerate(found):
            if donor.peer_id == own:
                continue
            # No record (expired, or refused by the DHT): an ordinary donor.
            priority = priorities.get(donor.peer_id, 0.0)
            if priority is None:
                continue  # it turned sharing off; its state advert has not expired yet
            ranked.append((-priority, donor.active_downloads, random.random(), index))
        ranked.sort()
        return [found[index] for *_, index in ranked]

    def _load_state(self, timeout: float,
                    on_progress) -> Optional[Tuple[Any, List[torch.Tensor]]]:
        started = time.monotonic()
        deadline = started + timeout
        report: Dict[str, Any] = {"error": None, "donor": None, "version": None,
                                  "candidates": [], "attempts": [], "restarts": 0,
                                  "bytes_received": 0, "total_bytes": None}

        def fail(reason: str) -> None:
            if self._shutdown.is_set():
                reason = "the averager was shut down"
            elif not self._dht.is_alive():
                reason = "the DHT is shut down"
            report["error"] = reason
            report["seconds"] = time.monotonic() - started
            logger.warning("could not load the state from peers: %s", reason)
            self.last_load_report = report
            return None

        try:
            donors = self._ordered_donors()
        except (RuntimeError, TimeoutError, ValueError) as error:
            return fail(f"cannot look up state donors: {error}")
        report["candidates"] = [donor.peer_id for donor in donors]
        if not donors:
            return fail(f"no other peer shares its state under prefix {self.prefix!r} (nothing "
                        f"advertised in the DHT key '{self.prefix}.state')")
        try:
            loader = _C._StateLoader(prefix=self.prefix,
                                     encryption=bool(self._dht._options["encryption"]))
        except RuntimeError as error:
            return fail(str(error))
        with self._sharing_lock:
            self._loaders.add(loader)
        try:
            if self._shutdown.is_set():
                loader.cancel()
            while donors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return fail(f"the timeout ({timeout} s) passed")
                try:
                    state = loader.download(donors, timeout=remaining,
                                            message_timeout=min(STATE_MESSAGE_TIMEOUT, remaining),
                                            max_restarts=len(donors), on_progress=on_progress)
                except (RuntimeError, TimeoutError, ValueError) as error:
                    return fail(str(error))
                report["attempts"] += state["attempts"]
                report["restarts"] += state["restarts"]
                report["bytes_received"] += state["bytes_received"]
                try:
                    metadata = dht_values.decode(state["metadata"])
                    tensors = [_tensor_from_state(i, dtype, shape, buffer)
                               for i, (_name, dtype, shape, buffer) in enumerate(state["tensors"])]
                except ValueError as error:
                    # Verified bytes, but not a state: a peer of another implementation, or a
                    # hostile one. The others may still serve a good one.
                    logger.warning("peer %s served a state that cannot be read (%s); trying the "
                                   "other donors", state["donor"], error)
                    report["attempts"][-1]["status"] = f"unreadable state: {error}"
                    report["attempts"][-1]["ok"] = False
                    donors = [donor for donor in donors if donor.peer_id != state["donor"]]
                    continue
                report.update(donor=state["donor"], version=state["version"],
                              total_bytes=state["total_bytes"],
                              seconds=time.monotonic() - started)
                logger.info("downloaded the state (%d bytes) from peer %s",
                            state["total_bytes"], state["donor"])
                self.last_load_report = report
                return metadata, tensors
            return fail("every donor served a state that cannot be read")
        finally:
            with self._sharing_lock:
                self._loaders.discard(loader)
            loader.close()

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Starts state sharing (hivemind's name; see ``start``). Idempotent. Averaging needs no
        start: it is ready from the constructor on."""
        del await_ready, timeout  # nothing to wait for: the first snapshot is taken in background
        if self._shutdown.is_set():
            raise RuntimeError("the averager is shut down")
        with self._sharing_lock:
            if self._sharing_thread is not None:
                return
            self._sharing_thread = threading.Thread(
                target=_share_state_periodically,
                args=(weakref.ref(self), self._sharing_wakeup, self._shutdown),
                name=f"averager-share-{self.prefix}", daemon=True)
            self._sharing_thread.start()
