"""hivemind_backend: decentralized deep learning as a PyTorch c10d backend over ZeroMQ."""

import torch  # noqa: F401  (must be loaded first: _C links against libtorch and libtorch_python)
import torch.distributed  # noqa: F401  (_C's process group class derives from its Backend)

from hivemind_backend import _C
from hivemind_backend.averager import DecentralizedAverager
from hivemind_backend.c10d import Options, register
from hivemind_backend.state_sync import SharedState, share_state
from hivemind_backend.dht import DHT, ValueWithExpiration, get_dht_time

__version__: str = _C.version()

register()

__all__ = [
    "__version__",
    "DHT",
    "DecentralizedAverager",
    "Options",
    "SharedState",
    "ValueWithExpiration",
    "get_dht_time",
    "share_state",
]
