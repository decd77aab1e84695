"""Registers the c10d backend ``hivemind`` with torch.distributed.

Entry point of the ``torch.backends`` group: ``import torch`` (>= 2.5) calls ``register`` so that
``backend="hivemind"`` works without importing hivemind_backend. It runs inside every
``import torch`` (torchrun agents, DataLoader workers), so it is a top-level module outside the
package: cheap, loads no native code until a process group is created, and never raises.
"""

BACKEND_NAME = "hivemind"


def _create(dist_options, pg_options):
    from hivemind_backend.c10d import create_backend

    return create_backend(dist_options, pg_options)


def register_backend() -> None:
    """Registers ``hivemind`` (idempotent; torch's own registration refuses a second one)."""
    import torch.distributed as dist

    if not dist.is_available() or BACKEND_NAME in dist.Backend.backend_list:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True,
                                  devices=["cpu", "cuda"])


def register() -> None:
    try:
        register_backend()
    except Exception:  # noqa: BLE001  (a broken install must not break `import torch`)
        pass
