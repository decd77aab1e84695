"""Joining a running swarm: ``hivemind_backend.share_state(model, optimizer)``.

DDP only averages gradients, so every replica must hold the same parameters, and a process that
joins a swarm mid-training must first get them. Call ``share_state`` once, after
``init_process_group`` and after building the model and optimizer, in every process (founders and
newcomers run the same script):

* A newcomer (a process that finds other launches of the run already training) has its
  contributions weighted next to nothing until it holds the swarm's state.
* Whenever this process's averaging group has changed (it formed, or newcomers were admitted) the
  next ``optimizer.step()`` ends with a state sync: the model's floating-point parameters and
  buffers and the optimizer's floating-point state are averaged over the group, established peers
  weighted, newcomers not. Established peers hold identical state, so a newcomer ends with exactly
  theirs, and the launches that founded the swarm together start from one common state.

docs/c10d.md ("Joining a running swarm") has the details and the limits.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


def _backend(group: Optional[dist.ProcessGroup]):
    group = group if group is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("share_state needs an initialized process group: call "
                           "torch.distributed.init_process_group('hivemind', ...) first")
    backend = group._get_backend(torch.device("cpu"))
    if not hasattr(backend, "sync_state"):
        raise RuntimeError(f"share_state needs the hivemind backend, this group runs "
                           f"{dist.get_backend(group)!r}")
    return backend


class SharedState:
    """What ``share_state`` returns: the tensors it keeps in sync and :meth:`sync_if_needed`."""

    def __init__(self, backend, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
        self._backend = backend
        self._model = model
        self._optimizer = optimizer
        self._generation = backend.group_generation
        self.syncs = 0

    @property
    def established(self) -> bool:
        """False while this process is a newcomer that has not received the swarm's state."""
        return self._backend.established

    def tensors(self) -> List[torch.Tensor]:
        """Detached views (same storage) of every floating-point tensor of the state."""
        found: List[torch.Tensor] = []
        seen = set()

        def add(candidates: Iterable):
            for tensor in candidates:
                if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                        and id(tensor) not in seen):
                    seen.add(id(tensor))
                    found.append(tensor.detach())

        add(self._model.parameters())
        add(self._model.buffers())
        if self._optimizer is not None:
            for state in self._optimizer.state.values():
                add(state.values())
        return found

    def sync_if_needed(self) -> bool:
        """Syncs the state if the averaging group changed since the last call (the optimizer hook
        calls this after every step). Every member of a group calls it at the same step, so the
        syncs line up. Returns whether it synced."""
        generation = self._backend.group_generation
        if generation == self._generation:
            return False
        self._generation = generation
        with torch.no_grad():
            self._backend.sync_state(self.tensors()).wait()
        self.syncs += 1
        return True


def share_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                group: Optional[dist.ProcessGroup] = None) -> SharedState:
    """Keeps ``model`` (and ``optimizer``) in sync with the swarm; see the module documentation.

    With an optimizer the syncs run by themselves after ``optimizer.step()``; without one, call
    ``sync_if_needed()`` after each update yourself.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = _backend(group)
    if backend.swarm_is_running():
        backend.set_joining()
    shared = SharedState(backend, model, optimizer)
    if optimizer is not None:
        optimizer.register_step_post_hook(lambda *_: shared.sync_if_needed())
    return shared
