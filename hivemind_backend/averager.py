"""hivemind_backend.DecentralizedAverager: averaging of arbitrary tensors in DHT-matched groups,
outside c10d (hivemind's API; docs/averaging.md, "Python API").

The network work is C++ (matchmaking and the butterfly all-reduce on the DHT peer's node, running
without the GIL). This module adds hivemind's argument names, the tensor handling (one float32
buffer for the wire, written back in each tensor's own dtype, with the ranges of compressed
tensors marked in it), the lock that keeps steps and user writes apart, and the retry loop of
``step``.

State sharing (docs/averaging.md, "State sharing") is C++ too (csrc/averaging/state_*: a donor
serves published snapshots in checksummed chunks, a newcomer downloads them). This module decides
what a snapshot holds (``get_current_state``) and when one is taken, keeps the priority records,
and orders the donors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch

from hivemind_backend import _C
from hivemind_backend import dht_values
from hivemind_backend import state_sharing
from hivemind_backend.arguments import dtype_name, seconds
from hivemind_backend.compression import CODECS
from hivemind_backend.dht import DHT
from hivemind_backend.state_sharing import StateSharingMixin

logger = logging.getLogger(__name__)

# The dtypes that are averaged. Without compression everything travels as float32: float64 tensors
# are averaged at float32 precision, float16/bfloat16 ones lose nothing on the way.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The matchmaking layer refuses larger metadata (MatchmakingOptions::max_metadata_bytes).
MAX_GATHER_BYTES = 16 << 10
# hivemind's default part size (DEFAULT_PART_SIZE_BYTES).
DEFAULT_PART_SIZE_BYTES = 1 << 19
# Used when step(timeout=None): hivemind would retry forever, but no wait here is unbounded.
DEFAULT_STEP_TIMEOUT = 60.0
DEFAULT_ALLREDUCE_TIMEOUT = 60.0
# Pause between two attempts after a failure, so a peer that fails at once does not spin.
RETRY_PAUSE = 0.05



def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _check_tensors(averaged_tensors: Any) -> tuple:
    if isinstance(averaged_tensors, torch.Tensor) or not isinstance(averaged_tensors,
                                                                     (list, tuple)):
        raise TypeError(
            f"averaged_tensors must be a list or tuple of tensors, got "
            f"{type(averaged_tensors).__name__}"
        )
    if not averaged_tensors:
        raise ValueError("averaged_tensors is empty: give at least one tensor to average")
    for i, tensor in enumerate(averaged_tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"averaged_tensors[{i}] is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type != "cpu":
            raise ValueError(
                f"averaged_tensors[{i}] is on {tensor.device}; DecentralizedAverager averages CPU "
                f"tensors only (keep a CPU copy and copy it back after the step)"
            )
        if tensor.layout != torch.strided:
            raise ValueError(f"averaged_tensors[{i}] has layout {tensor.layout}; only dense "
                             f"(strided) tensors can be averaged")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"averaged_tensors[{i}] has dtype {tensor.dtype}; averaged tensors must be "
                f"floating point: one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    return tuple(averaged_tensors)


def _codec_id(name: Any, where: str) -> int:
    if name is None:
        return CODECS["none"]
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a codec name (str) or None, got {type(name).__name__}")
    if name not in CODECS:
        raise ValueError(f"{where} is {name!r}, not a codec; valid names: "
                         f"{', '.join(repr(n) for n in CODECS)} (or None)")
    return CODECS[name]


def _resolve_compression(compression: Any, tensors: Sequence[torch.Tensor]) -> list:
    """The codec name each tensor travels with, or None for raw float32.

    One name applies to every tensor the backend's codec policy lets it compress: tensors below
    its size threshold and 16-bit tensors under a 16-bit codec stay raw (``_C._choose_codec`` is
    that policy, so the rule lives in one place, codec_policy.h). A list is applied as given."""
    if isinstance(compression, (list, tuple)):
        if len(compression) != len(tensors):
            raise ValueError(f"compression has {len(compression)} entries but there are "
                             f"{len(tensors)} averaged tensors: give one codec name (or None) "
                             f"per tensor")
        ids = [_codec_id(name, f"compression[{i}]") for i, name in enumerate(compression)]
    else:
        requested = _codec_id(compression, "compression")
        ids = [_C._choose_codec(requested, t.numel(), dtype_name(t)) for t in tensors]
    names = {codec_id: name for name, codec_id in CODECS.items()}
    return [None if codec_id == CODECS["none"] else names[codec_id] for codec_id in ids]


def _codec_ranges(sizes: Sequence[int], codecs: Sequence[Optional[str]]) -> list:
    """(begin, size, codec id, block size) for every compressed tensor, in elements of the flat
    float32 buffer (tensors lie there one after another, in order). Block size 0 is the codec's
    default."""
    ranges = []
    offset = 0
    for size, name in zip(sizes, codecs):
        if name is not None and size > 0:
            ranges.append((offset, size, CODECS[name], 0))
        offset += size
    return ranges


def _schema_hash(tensors: Sequence[torch.Tensor], codecs: Sequence[Optional[str]]) -> bytes:
    """Fingerprint of the layout (shapes and dtypes, in order) and of the codecs. It is part of
    the DHT key and is checked by the leader, so peers with different layouts never end up in
    one group, nor peers that compress differently (the all-reduce would refuse every round of
    theirs). Without compression it is the layout's hash alone, as before compression existed."""
    schema = ";".join(f"{tuple(t.shape)}:{dtype_name(t)}" for t in tensors)
    if any(codecs):
        schema += "|codecs:" + ";".join(f"{i}={name}" for i, name in enumerate(codecs) if name)
    return hashlib.blake2b(schema.encode("ascii"), digest_size=32).digest()


def _bits_to_coordinates(bits: str, grid_side: int) -> list:
    width = grid_side.bit_length() - 1  # log2(grid_side)
    if len(bits) % width:
        raise ValueError(
            f"group bits {bits!r} must be a multiple of log2(target_group_size) = {width} bits "
            f"long: each {width} bits are one Moshpit grid coordinate"
        )
    return [int(bits[i:i + width], 2) for i in range(0, len(bits), width)]


class DecentralizedAverager(StateSharingMixin):
    """Averages ``averaged_tensors`` with the other peers of ``dht`` that use the same ``prefix``
    and tensor layout: each :meth:`step` finds a group through the DHT and replaces every tensor,
    in place, by the weighted mean over the group.

    :param averaged_tensors: CPU tensors of dtype float32, float64, float16 or bfloat16, averaged
      in place (the averager keeps references, not copies; access them with :meth:`get_tensors`).
    :param dht: a running :class:`hivemind_backend.DHT`. Averagers on one DHT share its peer.
    :param prefix: the group-key prefix shared by the peers that average together (no ``.``).
    :param target_group_size: a group is sealed the moment it has this many peers. ``None``: no
      cap, the group is whoever joined within ``min_matchmaking_time``.
    :param min_group_size: smaller groups never form (default 2).
    :param min_matchmaking_time: how long a leader waits for peers before it seals a group below
      ``target_group_size`` (default 0.5 s; hivemind: 5 s).
    :param request_timeout: bound on each matchmaking request, and how long a follower waits past
      its leader's promised seal time (default 0.5 s; hivemind: 3 s).
    :param allreduce_timeout: bound on the all-reduce once a group formed (default 60 s).
    :param sender_timeout: a reducer drops a groupmate that sends nothing for this long (10 s).
    :param reducer_timeout: a share that makes no progress for this long is taken over by a
      backup reducer (20 s; keep it above ``sender_timeout``).
    :param part_size_bytes: all-reduce part size in bytes of float32 (512 KiB, as hivemind).
    :param bandwidth: this peer's relative link capacity; the shares to reduce are balanced so
        that the round ends first given every member's bandwidth (docs/averaging.md). None (the
        default): undeclared, taken as the mean of the bandwidths the group's others declared.
    :param client_mode: contribute and receive but reduce nothing (for peers nobody can dial).
      ``None``: the DHT's ``client_mode``.
    :param auxiliary: reduce for others but contribute nothing and receive no result; the tensors
      stay as they are (still needed: they set the layout).
    :param initial_group_bits: Moshpit grid position, a string of ``0``/``1`` (hivemind's
      format). Needs ``target_group_size`` = M, a power of two; every log2(M) bits are one grid
      coordinate. After each group the bits shift (as hivemind's), so with N = M^(d+1) peers and
      d·log2(M) bits, d + 1 rounds give the exact global mean.
    :param compression: how the tensors travel. ``None`` or ``"none"``: float32, lossless. A
      codec name (``"float16"``, ``"scaled_float16"``, ``"uniform8"``, ``"quantile8"``,
      ``"blockwise8"``; docs/compression.md): every tensor of at least 65536 elements goes with it,
      except that the 16-bit codecs leave float16/bfloat16 tensors raw. A list or tuple: one name
      (or None) per tensor, applied as given. Peers average together only when they compress
      alike.
    :param allow_state_sharing: let newcomers download this peer's state
      (:meth:`get_current_state`) with :meth:`load_state_from_peers`. ``None``: True unless the
      averager is in client mode or auxiliary, or another averager of the same DHT already shares
      under this prefix. Can be changed later (``averager.allow_state_sharing = False``).
    :param state_sharing_priority: newcomers download from the donor with the highest priority
      (hivemind's optimizer sets its epoch here); equals are tried least loaded first, then at
      random. Can be changed later.
    :param declare_state_period: the DHT entries that make this peer a donor live this long and
      are refreshed twice per period (default 30 s, as hivemind).
    :param start: True: state sharing (snapshots and adverts, on a background thread) starts at
      once. False: it starts with :meth:`run_in_background`, for subclasses whose
      ``get_current_state`` needs attributes set after ``super().__init__``. Averaging itself is
      ready at once either way.
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        target_group_size: Optional[int] = None,
        min_group_size: int = 2,
        min_matchmaking_time: float = 0.5,
        request_timeout: float = 0.5,
        allreduce_timeout: Optional[float] = None,
        sender_timeout: float = 10.0,
        reducer_timeout: float = 20.0,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
        bandwidth: Optional[float] = None,
        client_mode: Optional[bool] = None,
        auxiliary: bool = False,
        initial_group_bits: str = "",
        compression: Union[None, str, Sequence[Optional[str]]] = None,
        allow_state_sharing: Optional[bool] = None,
        state_sharing_priority: float = 0.0,
        declare_state_period: float = 30.0,
        start: bool = True,
    ):
        # First, so that shutdown() (run by __del__ when the constructor raises) finds them.
        self._shutdown = threading.Event()
        self._sharing_lock = threading.Lock()
        self._sharer = None
        self._loaders: set = set()
        self._tensors = _check_tensors(averaged_tensors)
        if not isinstance(dht, DHT):
            raise TypeError(f"dht must be a hivemind_backend.DHT, got {type(dht).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not prefix or "." in prefix:
            raise ValueError(f"prefix must be non-empty and contain no '.', got {prefix!r}")
        min_group_size = _int("min_group_size", min_group_size, 1)
        if target_group_size is not None:
            target_group_size = _int("target_group_size", target_group_size, min_group_size)
        if allreduce_timeout is None:
            allreduce_timeout = DEFAULT_ALLREDUCE_TIMEOUT
        self._allreduce_timeout = seconds("allreduce_timeout", allreduce_timeout)
        if client_mode is None:
            client_mode = dht.client_mode
        if auxiliary and client_mode:
            raise ValueError("auxiliary and client_mode are incompatible: an auxiliary peer "
                             "reduces for others, so they must be able to connect to it")
        if bandwidth is None:
            bandwidth = _C._UNDECLARED_BANDWIDTH
        elif isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise TypeError(f"bandwidth must be a number, got {type(bandwidth).__name__}")
        elif not math.isfinite(bandwidth) or bandwidth < 0:
            raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}")
        part_size_bytes = _int("part_size_bytes", part_size_bytes, 4)
        if not isinstance(initial_group_bits, str):
            raise TypeError(f"initial_group_bits must be a str of 0/1, got "
                            f"{type(initial_group_bits).__name__}")
        if initial_group_bits and target_group_size is None:
            raise ValueError("initial_group_bits needs target_group_size (the Moshpit grid side)")
        self._grid_side = target_group_size or 1
        coordinates = self._coordinates_from_bits(initial_group_bits)
        codecs = _resolve_compression(compression, self._tensors)
        declare_state_period = state_sharing.validate_arguments(
            allow_state_sharing, state_sharing_priority, declare_state_period)

        self.prefix = prefix
        self.target_group_size = target_group_size
        self.min_group_size = min_group_size
        self.client_mode = bool(client_mode)
        self.auxiliary = bool(auxiliary)
        self.mode = "auxiliary" if auxiliary else ("client" if client_mode else "normal")
        self.schema_hash = _schema_hash(self._tensors, codecs)
        self._sizes = [t.numel() for t in self._tensors]
        #: (tensor index, codec name) of every tensor that travels compressed.
        self.compression = [(i, name) for i, name in enumerate(codecs) if name is not None]
        # The wire buffer: float32 values in a bytearray that the extension reads and writes
        # through the buffer protocol; _flat is a tensor view of the same memory.
        self._buffer = bytearray(4 * sum(self._sizes))
        self._flat = (torch.frombuffer(self._buffer, dtype=torch.float32) if self._buffer
                      else torch.empty(0, dtype=torch.float32))

        self._dht = dht
        self._native = _C._Averager(
            runner=dht._active(),
            prefix=prefix,
            schema_hash=self.schema_hash,
            grid_side=self._grid_side,
            coordinates=coordinates,
            target_group_size=target_group_size or 0,
            min_group_size=min_group_size,
            window=seconds("min_matchmaking_time", min_matchmaking_time, allow_zero=True),
            request_timeout=seconds("request_timeout", request_timeout),
            sender_timeout=seconds("sender_timeout", sender_timeout),
            reducer_timeout=seconds("reducer_timeout", reducer_timeout),
            part_elements=part_size_bytes // 4,
            bandwidth=float(bandwidth),
            mode=self.mode,
            codecs=_codec_ranges(self._sizes, codecs),
        )
        # Held by get_tensors() and by a step while it reads and writes the tensors.
        self.lock_averaged_tensors = threading.RLock()
        # One step at a time per averager (hivemind's averager serialises them too).
        self._step_lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._load_executor: Optional[ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        #: What the last step did: group, contributors, failures, error (see :meth:`step`).
        self.last_report: Optional[Dict[str, Any]] = None

        # See "State sharing" in docs/averaging.md.
        self._init_state_sharing(allow_state_sharing, state_sharing_priority, declare_state_period)
        if start:
            self.run_in_background()

    # ---- Moshpit grid position ----

    def _coordinates_from_bits(self, bits: str) -> list:
        if bits.strip("01"):
            raise ValueError(f"group bits must be a string of '0' and '1', got {bits!r}")
        if not bits:
            return []
        if self._grid_side < 2 or self._grid_side & (self._grid_side - 1):
            raise ValueError(
                f"group bits need target_group_size to be a power of two >= 2, got "
                f"{self._grid_side}"
            )
        return _bits_to_coordinates(bits, self._grid_side)

    def get_group_bits(self) -> str:
        """The current Moshpit grid position as hivemind's bit string."""
        if self._grid_side < 2:
            return ""
        width = self._grid_side.bit_length() - 1
        return "".join(format(c, f"0{width}b") for c in self._native.coordinates)

    def set_group_bits(self, group_bits: str) -> None:
        """Moves this peer to another grid position (e.g. one loaded from a checkpoint)."""
        if not isinstance(group_bits, str):
            raise TypeError(f"group_bits must be a str, got {type(group_bits).__name__}")
        if group_bits and self.target_group_size is None:
            raise ValueError("group bits need target_group_size (the Moshpit grid side)")
        self._native.set_coordinates(self._coordinates_from_bits(group_bits))

    @property
    def group_key(self) -> str:
        """The DHT key this peer declares under in its next step."""
        return self._native.group_key

    @property
    def peer_id(self) -> str:
        return self._dht.peer_id

    # ---- tensors ----

    @contextmanager
    def get_tensors(self) -> Iterator[Sequence[torch.Tensor]]:
        """``with averager.get_tensors() as tensors:`` gives the averaged tensors. Read or write
        them only inside the block: it holds the lock that a step takes for its all-reduce, so a
        step never reads a half-written tensor and never overwrites a write made meanwhile (the
        block waits, at most ``allreduce_timeout``, while an all-reduce runs)."""
        with self.lock_averaged_tensors:
            yield self._tensors

    def _load_buffer(self) -> None:
        offset = 0
        with torch.no_grad():
            for tensor, size in zip(self._tensors, self._sizes):
                self._flat[offset:offset + size].copy_(tensor.reshape(-1))  # converts to float32
                offset += size

    def _store_buffer(self) -> None:
        offset = 0
        with torch.no_grad():
            for tensor, size in zip(self._tensors, self._sizes):
                # copy_ converts to the tensor's dtype and handles non-contiguous tensors.
                tensor.copy_(self._flat[offset:offset + size].view(tensor.shape))
                offset += size

    # ---- averaging ----

    def step(
        self,
        gather: Any = None,
        weight: Optional[float] = None,
        timeout: Optional[float] = None,
        allow_retries: bool = True,
        wait: bool = True,
    ) -> Union[Optional[Dict[str, Any]], Future]:
        """Finds a group and averages the tensors with it, in place.

        :param gather: plain data (what the DHT can store: None, bool, int, float, str, bytes,
          list, tuple, dict with str keys; at most 16 KiB encoded) handed to every groupmate.
        :param weight: this peer's weight in the mean (default 1; ignored when auxiliary).
        :param timeout: how long to look for a group, retries included (default 60 s). The
          all-reduce that follows has its own bound, ``allreduce_timeout``.
        :param allow_retries: after a failed matchmaking or all-reduce, try again while time is
          left (as hivemind); False: give up after the first failure.
        :param wait: False returns a ``concurrent.futures.Future`` of the same result.
        :returns: ``{peer_id: gather value}`` for every member of the group (this peer included),
          or None when no averaging happened (no group in time, all-reduce failed); the reason is
          logged and kept in ``last_report["error"]``. Bad arguments raise at once.
        """
        if weight is None:
            weight = 0.0 if self.auxiliary else 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number, got {type(weight).__name__}")
        weight = float(weight)
        if not self.auxiliary and not (math.isfinite(weight) and 0 < weight <= 1e9):
            raise ValueError(f"weight must be finite and in (0, 1e9], got {weight}")
        timeout = DEFAULT_STEP_TIMEOUT if timeout is None else seconds("timeout", timeout)
        metadata = dht_values.encode(gather)
        if len(metadata) > MAX_GATHER_BYTES:
            raise ValueError(f"gather is {len(metadata)} bytes once encoded; the cap is "
                             f"{MAX_GATHER_BYTES}")
        if self._shutdown.is_set():
            raise RuntimeError("the averager is shut down")
        if not self.auxiliary:
            # Checked before joining a group, so that bad local values fail this call alone
            # instead of making groupmates wait for (then drop) a peer that cannot send.
            with self.lock_averaged_tensors:
                for i, tensor in enumerate(self._tensors):
                    if not bool(torch.isfinite(tensor).all()):
                        raise ValueError(f"averaged_tensors[{i}] holds non-finite values "
                                         f"(NaN or inf); they cannot be averaged")
        if wait:
            return self._step(metadata, weight, timeout, bool(allow_retries))
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="averager-step")
            return self._executor.submit(self._step, metadata, weight, timeout,
                                         bool(allow_retries))

    def _step(self, metadata: bytes, weight: float, timeout: float,
              allow_retries: bool) -> Optional[Dict[str, Any]]:
        with self._step_lock:
            deadline = time.monotonic() + timeout
            attempts = 0
            errors = []
            while not self._shutdown.is_set() and self._dht.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (attempts and not allow_retries):
                    break
                attempts += 1
                try:
                    return self._attempt(metadata, weight, remaining)
                except ValueError:
                    raise  # the caller's input (e.g. non-finite tensor values): not retried
                except (RuntimeError, TimeoutError) as error:
                    errors.append(error)
                    logger.debug("averaging attempt %d failed: %s", attempts, error)
                    # Lets a failure that returned at once not turn into a busy loop.
                    self._shutdown.wait(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
            if self._shutdown.is_set():
                reason = "the averager was shut down"
            elif not self._dht.is_alive():
                reason = "the DHT is shut down"
            elif errors:
                reason = str(errors[-1])
            else:
                reason = "no time left to look for a group"
            logger.warning("averaging step failed after %d attempt(s): %s", attempts, reason)
            self.last_report = {"error": reason, "attempts": attempts}
            return None

    def _attempt(self, metadata: bytes, weight: float, timeout: float) -> Dict[str, Any]:
        formed = self._native.form_group(metadata, timeout)
        peer_ids = formed.peer_ids
        started = time.monotonic()
        with self.lock_averaged_tensors:
            self._load_buffer()
            report = self._native.all_reduce(formed, self._buffer, weight,
                                             self._allreduce_timeout)
            if not self.auxiliary:
                self._store_buffer()
        if not self.auxiliary:
            self._note_state_changed()
        gathered = {}
        for peer_id, raw in zip(peer_ids, formed.metadata):
            try:
                gathered[peer_id] = dht_values.decode(raw)
            except ValueError as error:
                logger.warning("dropping the undecodable gather value of peer %s: %s",
                               peer_id, error)
        parts = report["parts"]
        everywhere = set(range(len(peer_ids)))
        somewhere = set()
        for _begin, _size, _share, _reduced_by, contributors in parts:
            everywhere &= set(contributors)
            somewhere |= set(contributors)
        if not parts:
            everywhere = set()
        shares = dict.fromkeys(peer_ids, 0)  # elements of the vector each member was to reduce
        for _begin, size, share, _reduced_by, _contributors in parts:
            shares[peer_ids[share]] += size
        self.last_report = {
            "error": None,
            "group_id": formed.group_id.hex(),
            "group_key": formed.group_key,
            "peer_ids": peer_ids,
            "modes": formed.modes,
            "my_index": formed.my_index,
            "led": formed.led,
            # Peers whose tensors are in every part of the mean, and those only in some (they
            # failed or were excluded midway: the parts they miss are averaged without them).
            "contributors": [peer_ids[i] for i in sorted(everywhere)],
            "partial_contributors": [peer_ids[i] for i in sorted(somewhere - everywhere)],
            "shares": shares,
            "failed_peers": [peer_ids[i] for i in report["failed_members"]],
            "failures": report["failures"],
            "takeovers": report["takeovers"],
            "compression": list(self.compression),
            "matchmaking_seconds": formed.seconds,
            "allreduce_seconds": time.monotonic() - started,
        }
        return gathered

    # ---- lifecycle ----

    def shutdown(self) -> None:
        """Stops taking part in averaging; idempotent. The DHT itself keeps running. A step in
        progress on another thread returns None: at once if it is looking for a group, when its
        all-reduce ends if it is averaging. This peer stops serving its state (downloads from it
        stop at their next chunk and go on with another donor), and a load_state_from_peers in
        progress returns None at once."""
        self._shutdown.set()
        with self._sharing_lock:
            sharer, self._sharer = self._sharer, None
            loaders = list(self._loaders)
        wakeup = getattr(self, "_sharing_wakeup", None)
        if wakeup is not None:
            wakeup.set()
        if sharer is not None:
            sharer.stop()
        for loader in loaders:
            loader.cancel()
        native = getattr(self, "_native", None)
        if native is not None:
            native.shutdown()
        executor_lock = getattr(self, "_executor_lock", None)
        if executor_lock is None:
            return
        with executor_lock:
            executors = [self._executor, self._load_executor]
            self._executor = self._load_executor = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=False)

    def is_alive(self) -> bool:
        return not self._shutdown.is_set()

    def __enter__(self) -> "DecentralizedAverager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 (interpreter teardown)
            pass

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "shut down"
        return f"<hivemind_backend.DecentralizedAverager {self.prefix!r} {self.mode} {state}>"
