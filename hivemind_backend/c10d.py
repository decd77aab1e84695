"""The c10d backend ``hivemind``: registration with torch.distributed, and its options.

``torch.distributed.init_process_group("hivemind", ...)`` works once this module has run: through
the ``torch.backends`` entry point (``import torch`` loads it on torch >= 2.5) or through
``import hivemind_backend``. Every option can also be set by an environment variable, so unchanged
DDP, torchrun and Lightning code can be pointed at a swarm from the shell. docs/c10d.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
from datetime import timedelta
from typing import Any, Optional, Sequence

from hivemind_backend.compression import codec_id

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass
class Options:
    """Swarm settings of the ``hivemind`` backend; pass as ``init_process_group(pg_options=...)``.

    A field left at ``None`` falls back to its environment variable (in brackets), then to the
    default. Times are in seconds.

    :param initial_peers: multiaddrs of any live peers of the swarm (``HIVEMIND_INITIAL_PEERS``,
      comma-separated). With none, a launch starts a swarm of its own, bootstrapped through the
      c10d store; with some, the default process group averages with every launch of ``run_id``.
    :param run_id: launches with the same run id average together (``HIVEMIND_RUN_ID``,
      default ``"hivemind"``).
    :param host_maddrs: where this process listens (``HIVEMIND_HOST_MADDRS``, default
      ``/ip4/0.0.0.0/tcp/0``).
    :param announce_maddrs: what it tells others instead, behind NAT (``HIVEMIND_ANNOUNCE_MADDRS``).
    :param identity_path: a persistent peer identity (``HIVEMIND_IDENTITY_PATH``).
    :param timeout: per-operation timeout (``HIVEMIND_TIMEOUT``); default: the
      ``init_process_group(timeout=)``.
    :param min_group_size: launches the first averaging group waits for
      (``HIVEMIND_MIN_GROUP_SIZE``, default 1).
    :param target_group_size: most launches per averaging group, 0 for no cap
      (``HIVEMIND_TARGET_GROUP_SIZE``).
    :param moshpit_dims: with ``target_group_size``, the dimensions of the Moshpit grid whose cells
      the groups are (``HIVEMIND_MOSHPIT_DIMS``, default 2).
    :param moshpit_period: training steps between two rotations of the grid
      (``HIVEMIND_MOSHPIT_PERIOD``, default 10).
    :param matchmaking_time: how long a forming group waits for more launches
      (``HIVEMIND_MATCHMAKING_TIME``, default 2).
    :param request_timeout: bound on each matchmaking request (``HIVEMIND_REQUEST_TIMEOUT``, 1).
    :param bootstrap_timeout: how long joining the DHT may take (``HIVEMIND_BOOTSTRAP_TIMEOUT``, 30).
    :param encryption: CURVE on every link (``HIVEMIND_ENCRYPTION``, default true); turn off only
      inside a trusted cluster.
    :param compression: codec for float SUM/AVG all-reduces of tensors with at least 65536
      elements (``HIVEMIND_COMPRESSION``, default ``none``): ``float16``, ``scaled_float16``,
      ``uniform8``, ``quantile8`` or ``blockwise8`` (docs/compression.md). Lossy; for slow links.
    """

    initial_peers: Optional[Sequence[str]] = None
    run_id: Optional[str] = None
    host_maddrs: Optional[Sequence[str]] = None
    announce_maddrs: Optional[Sequence[str]] = None
    identity_path: Optional[str] = None
    timeout: Optional[float] = None
    min_group_size: Optional[int] = None
    target_group_size: Optional[int] = None
    moshpit_dims: Optional[int] = None
    moshpit_period: Optional[int] = None
    matchmaking_time: Optional[float] = None
    request_timeout: Optional[float] = None
    bootstrap_timeout: Optional[float] = None
    encryption: Optional[bool] = None
    compression: Optional[str] = None


_ENV = {
    "initial_peers": "HIVEMIND_INITIAL_PEERS",
    "run_id": "HIVEMIND_RUN_ID",
    "host_maddrs": "HIVEMIND_HOST_MADDRS",
    "announce_maddrs": "HIVEMIND_ANNOUNCE_MADDRS",
    "identity_path": "HIVEMIND_IDENTITY_PATH",
    "timeout": "HIVEMIND_TIMEOUT",
    "min_group_size": "HIVEMIND_MIN_GROUP_SIZE",
    "target_group_size": "HIVEMIND_TARGET_GROUP_SIZE",
    "moshpit_dims": "HIVEMIND_MOSHPIT_DIMS",
    "moshpit_period": "HIVEMIND_MOSHPIT_PERIOD",
    "matchmaking_time": "HIVEMIND_MATCHMAKING_TIME",
    "request_timeout": "HIVEMIND_REQUEST_TIMEOUT",
    "bootstrap_timeout": "HIVEMIND_BOOTSTRAP_TIMEOUT",
    "encryption": "HIVEMIND_ENCRYPTION",
    "compression": "HIVEMIND_COMPRESSION",
}


def _addresses(name: str, value: Any) -> list:
    if isinstance(value, str):
        # Several peers: commas (a peer's own endpoints may be separated by spaces).
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(item).strip() for item in value]
    else:
        raise TypeError(f"{name} must be a list of multiaddrs or a comma-separated string")
    return [item for item in items if item]


def _number(name: str, value: Any, kind: type, minimum: float, source: str) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} must be a number, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number) or number < minimum:
        raise ValueError(f"{source}: {name} must be at least {minimum}, got {value!r}")
    return number


def _flag(name: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source}: {name} must be true or false, got {value!r}")


def resolve_options(options: Optional[Options] = None) -> dict:
    """The effective settings: ``options`` fields, else environment variables, else defaults.
    Raises ValueError naming the option (and the variable) that is malformed."""
    if options is not None and not isinstance(options, Options):
        raise TypeError(
            f"pg_options for the hivemind backend must be hivemind_backend.Options, got "
            f"{type(options).__name__}"
        )
    settings = {}
    for field in dataclasses.fields(Options):
        value = getattr(options, field.name) if options is not None else None
        source = f"Options.{field.name}"
        if value is None and os.environ.get(_ENV[field.name], "").strip():
            value = os.environ[_ENV[field.name]]
            source = _ENV[field.name]
        settings[field.name] = (value, source)

    def get(name, convert, default):
        value, source = settings[name]
        return default if value is None else convert(value, source)

    return {
        "initial_peers": get("initial_peers", lambda v, s: _addresses(s, v), []),
        "run_id": get("run_id", lambda v, s: _run_id(v, s), "hivemind"),
        "host_maddrs": get("host_maddrs", lambda v, s: _addresses(s, v), ["/ip4/0.0.0.0/tcp/0"]),
        "announce_maddrs": get("announce_maddrs", lambda v, s: _addresses(s, v), []),
        "identity_path": get("identity_path", lambda v, s: str(v), ""),
        "timeout": get("timeout", lambda v, s: _number("timeout", v, float, 0.001, s), None),
        "min_group_size": get("min_group_size",
                              lambda v, s: _number("min_group_size", v, int, 1, s), 1),
        "target_group_size": get("target_group_size",
                                 lambda v, s: _number("target_group_size", v, int, 0, s), 0),
        "moshpit_dims": get("moshpit_dims", lambda v, s: _number("moshpit_dims", v, int, 1, s), 2),
        "moshpit_period": get("moshpit_period",
                              lambda v, s: _number("moshpit_period", v, int, 1, s), 10),
        "matchmaking_time": get("matchmaking_time",
                                lambda v, s: _number("matchmaking_time", v, float, 0.001, s), 2.0),
        "request_timeout": get("request_timeout",
                               lambda v, s: _number("request_timeout", v, float, 0.001, s), 1.0),
        "bootstrap_timeout": get("bootstrap_timeout",
                                 lambda v, s: _number("bootstrap_timeout", v, float, 0.001, s),
                                 30.0),
        "encryption": get("encryption", lambda v, s: _flag("encryption", v, s), True),
        "compression": get("compression", lambda v, s: codec_id(v, s), 0),
    }


def _run_id(value: Any, source: str) -> str:
    text = str(value).strip()
    if not text or len(text) > 128 or any(c.isspace() or c == "." for c in text):
        raise ValueError(
            f"{source}: run_id must be 1..128 characters without spaces or dots, got {value!r}")
    return text


def create_backend(dist_options: Any, pg_options: Optional[Options]):
    """The creator torch.distributed calls (extended API): one backend per process group."""
    import torch.distributed  # noqa: F401  (the native class derives from its Backend)
    from hivemind_backend import _C

    settings = resolve_options(pg_options)
    config = _C._BackendConfig()
    for name in ("initial_peers", "run_id", "host_maddrs", "announce_maddrs", "identity_path",
                 "min_group_size", "target_group_size", "moshpit_dims", "moshpit_period",
                 "matchmaking_time", "request_timeout",
                 "bootstrap_timeout", "encryption", "compression"):
        setattr(config, name, settings[name])
    # Only the default group (no explicit rank list) averages across launches; subgroups are
    # sets of this launch's ranks.
    config.join_swarm = not list(dist_options.global_ranks_in_group)
    timeout = dist_options.timeout
    if settings["timeout"] is not None:
        timeout = timedelta(seconds=settings["timeout"])
    elif not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    _install_exit_hook()
    return _C._ProcessGroupHivemind(
        dist_options.store, dist_options.group_rank, dist_options.group_size, timeout, config
    )


_exit_hook_installed = False


def _install_exit_hook() -> None:
    # Network threads must stop before the interpreter tears down; process groups that the script
    # never destroyed would otherwise keep them running into exit.
    global _exit_hook_installed
    if not _exit_hook_installed:
        from hivemind_backend import _C

        atexit.register(_C._shutdown_swarm_peer)
        _exit_hook_installed = True


def register() -> None:
    """Registers ``hivemind`` with torch.distributed (idempotent)."""
    from hivemind_backend_autoload import register_backend

    register_backend()
