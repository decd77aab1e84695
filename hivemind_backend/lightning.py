"""PyTorch Lightning strategy for the "hivemind" c10d backend.

    from hivemind_backend.lightning import HivemindStrategy
    trainer = Trainer(strategy=HivemindStrategy(initial_peers=[...], run_id="my_run"), ...)
    # or, with the swarm options in HIVEMIND_* variables: Trainer(strategy="hivemind")

``HivemindStrategy`` is Lightning's ``DDPStrategy`` with ``process_group_backend="hivemind"``: real
ranks, DistributedDataParallel, ``sync_dist`` logging, checkpointing on rank 0, DistributedSampler.
The swarm options are handed to the backend as the ``HIVEMIND_*`` environment variables that
``hivemind_backend.c10d`` reads when the process group is created (docs/c10d.md, "Settings"). They
are set in ``setup_environment`` / ``setup_distributed``, which Lightning runs in every training
process (the processes that Lightning launches itself, the spawned ones, and those that torchrun
starts) right before ``torch.distributed.init_process_group``. See docs/lightning.md.

This module needs ``lightning``; ``import hivemind_backend`` does not import it, so the backend
works without Lightning installed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Iterable, Optional, Union

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from hivemind_backend.c10d import Options, resolve_options

__all__ = ["HivemindStrategy", "swarm_environment"]

# Strategy argument -> (Options field, environment variable). The argument names follow the
# Options fields, except averaging_timeout (the name lightning_hivemind used) for Options.timeout:
# DDPStrategy already has a `timeout` argument, the process group's timeout.
ENV_VARS = {
    "initial_peers": ("initial_peers", "HIVEMIND_INITIAL_PEERS"),
    "run_id": ("run_id", "HIVEMIND_RUN_ID"),
    "matchmaking_time": ("matchmaking_time", "HIVEMIND_MATCHMAKING_TIME"),
    "averaging_timeout": ("timeout", "HIVEMIND_TIMEOUT"),
    "identity_path": ("identity_path", "HIVEMIND_IDENTITY_PATH"),
    "host_maddrs": ("host_maddrs", "HIVEMIND_HOST_MADDRS"),
    "announce_maddrs": ("announce_maddrs", "HIVEMIND_ANNOUNCE_MADDRS"),
    "min_group_size": ("min_group_size", "HIVEMIND_MIN_GROUP_SIZE"),
    "target_group_size": ("target_group_size", "HIVEMIND_TARGET_GROUP_SIZE"),
    "request_timeout": ("request_timeout", "HIVEMIND_REQUEST_TIMEOUT"),
    "bootstrap_timeout": ("bootstrap_timeout", "HIVEMIND_BOOTSTRAP_TIMEOUT"),
    "encryption": ("encryption", "HIVEMIND_ENCRYPTION"),
    "compression": ("compression", "HIVEMIND_COMPRESSION"),
}

Seconds = Union[float, int, timedelta]
Addresses = Union[str, Iterable[str]]


def _as_env_value(value: Any) -> str:
    """One option as its environment-variable text, in the form hivemind_backend.c10d parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return repr(value.total_seconds())
    if isinstance(value, float):
        return repr(value)  # full precision
    if isinstance(value, (int, str, os.PathLike)):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    # A list of multiaddrs: the backend splits the variable on commas.
    items = [str(item).strip() for item in value]
    for item in items:
        if not item or "," in item:
            raise ValueError(f"invalid multiaddr {item!r}: empty or contains a comma")
    return ",".join(items)


def swarm_environment(**options: Any) -> dict[str, str]:
    """The ``HIVEMIND_*`` variables for the given swarm options (the keys of ``ENV_VARS``).

    Options that are None are left out. Values are checked now, with the backend's own rules
    (``hivemind_backend.c10d.resolve_options``), so that a bad option fails where the strategy is
    built instead of later inside every training process.
    """
    unknown = set(options) - set(ENV_VARS)
    if unknown:
        raise TypeError(f"unknown swarm options: {sorted(unknown)}")
    given = {name: value for name, value in options.items() if value is not None}
    env = {ENV_VARS[name][1]: _as_env_value(value) for name, value in given.items()}
    # Validate the very text the backend will read, parsed the way the backend parses it.
    resolve_options(Options(**{ENV_VARS[name][0]: env[ENV_VARS[name][1]] for name in given}))
    return env


class HivemindStrategy(DDPStrategy):
    """``DDPStrategy`` over the hivemind c10d backend, configured with swarm options.

    Args (all optional; None leaves the ``HIVEMIND_*`` variable, and so the backend's default or
    a value set outside, untouched):
        initial_peers: multiaddrs of live peers of the swarm (list, or comma-separated string).
        run_id: launches with the same run id average together.
        matchmaking_time: seconds a forming averaging group waits for more launches.
        averaging_timeout: seconds, the backend's bound on every operation (``HIVEMIND_TIMEOUT``).
        identity_path: file with this peer's persistent identity.
        host_maddrs: multiaddrs to listen on.
        announce_maddrs: multiaddrs to announce instead (NAT, port forwarding).
        min_group_size: launches the first averaging group of a fresh swarm waits for.
        target_group_size: most launches in one averaging group (0: no cap).
        request_timeout: seconds, bound on each matchmaking request.
        bootstrap_timeout: seconds joining the DHT may take.
        encryption: CURVE on every link (default on); off only inside a trusted cluster.
        compression: codec for gradient all-reduces ("float16", "blockwise8", ...; default
            "none"), docs/compression.md.
        process_group_backend: torch.distributed backend; ``backend_name`` ("hivemind") when None.
            Another name (e.g. "gloo") runs the same strategy on that backend, for tests.
        **kwargs: everything else goes to ``DDPStrategy``: ``timeout`` (the process group's
            timeout), ``start_method``, ``DistributedDataParallel`` keyword arguments.
    """

    backend_name = "hivemind"

    def __init__(
        self,
        initial_peers: Optional[Addresses] = None,
        run_id: Optional[str] = None,
        matchmaking_time: Optional[Seconds] = None,
        averaging_timeout: Optional[Seconds] = None,
        identity_path: Union[str, os.PathLike, None] = None,
        host_maddrs: Optional[Addresses] = None,
        announce_maddrs: Optional[Addresses] = None,
        min_group_size: Optional[int] = None,
        target_group_size: Optional[int] = None,
        request_timeout: Optional[Seconds] = None,
        bootstrap_timeout: Optional[Seconds] = None,
        encryption: Optional[bool] = None,
        compression: Optional[str] = None,
        process_group_backend: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(process_group_backend=process_group_backend or self.backend_name, **kwargs)
        self.swarm_env = swarm_environment(
            initial_peers=initial_peers,
            run_id=run_id,
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            identity_path=identity_path,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs,
            min_group_size=min_group_size,
            target_group_size=target_group_size,
            request_timeout=request_timeout,
            bootstrap_timeout=bootstrap_timeout,
            encryption=encryption,
            compression=compression,
        )

    def _export_swarm_env(self) -> None:
        """Publish the swarm options to this process's environment, where the backend reads them."""
        os.environ.update(self.swarm_env)

    def setup_environment(self) -> None:
        # Runs in every training process: DDPStrategy.setup_environment -> setup_distributed ->
        # init_process_group, which creates the backend.
        self._export_swarm_env()
        super().setup_environment()

    def setup_distributed(self) -> None:
        # Also here, for callers that set up the process group without setup_environment.
        self._export_swarm_env()
        super().setup_distributed()

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        # Lightning creates the optimizers in setup, after wrapping the model in DDP; share_state
        # works on the wrapped model's parameters all the same, so a launch that joins a running
        # swarm gets its state at its first step (docs/c10d.md, "Joining a running swarm").
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "hivemind" and len(self.optimizers) == 1:
            from hivemind_backend.state_sync import share_state

            self.shared_state = share_state(self.lightning_module, self.optimizers[0])

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Overrides DDPStrategy's, which would register "ddp", "ddp_spawn", ... for this class.
        # Skips names already present, so importing this module again (e.g. a reload) is harmless.
        for name in ("hivemind", "ddp_hivemind"):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description="DDP over the hivemind c10d backend (swarm options: HIVEMIND_* variables)",
                )


HivemindStrategy.register_strategies(StrategyRegistry)
