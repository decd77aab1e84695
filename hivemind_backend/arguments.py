"""Checks of user arguments shared by the Python API modules: clear errors naming the argument."""

import math
from typing import Any

import torch


def seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float number of seconds; TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} number of seconds, got {value}")
    return float(value)


def dtype_name(tensor: torch.Tensor) -> str:
    """The dtype as the native layer names it: "float32", "bfloat16", ..."""
    return str(tensor.dtype).replace("torch.", "")
