"""Argument checks every layer uses at its boundary (schedule construction, the schedulers, the samplers, the CLI):
each names the parameter and the accepted range, and raises a ``TypeError`` for a wrong type, a ``ValueError`` for a
wrong value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_float_tensor",
    "check_generator",
    "check_int",
    "check_number",
    "check_values",
]


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), else a TypeError/ValueError.

    The value must be finite: NaN is never in range, and an infinite bound is an open end (``high=math.inf`` means
    every finite value from ``low`` on, written ``[low, ∞)`` in the message), so no setting takes ``inf``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (low < v if low_open else low <= v) and v <= high
    if not ok:
        opening = "(-∞" if low == -math.inf else f"({low}" if low_open else f"[{low}"
        closing = "∞)" if high == math.inf else f"{high}]"
        finite = "a finite number " if math.isinf(v) else ""
        raise ValueError(f"{name} must be {finite}in {opening}, {closing}, got {value}")
    return v


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = "∞" if high is None else str(high)
        raise ValueError(f"{name} must be an integer in [{low}, {upper}], got {value}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return str(value)


def check_float_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` if it is a floating-point tensor, else a TypeError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_generator(generator: Any, batch: int) -> None:
    """``generator``: None, a ``torch.Generator``, or a list/tuple of them with one per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of them")
        if len(generator) not in (1, batch):
            raise ValueError(f"a list of generators needs one per batch item ({batch}), got {len(generator)}")
        return
    raise TypeError(f"generator must be a torch.Generator, a list of them, or None; got {type(generator).__name__}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_values(
    name: str, values: Sequence[float] | np.ndarray, low: float, high: float, descending: bool = True
) -> np.ndarray:
    """``values`` as a new float32 array: non-empty, 1-D, finite, in ``[low, high]`` and strictly monotone
    (descending unless ``descending`` is False), else a ValueError naming ``name``."""
    arr = np.array(values, dtype=np.float32, copy=True)  # never alias the caller's array
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < low or arr.max() > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {arr.min()} … {arr.max()}")
    if np.any(np.diff(arr) >= 0 if descending else np.diff(arr) <= 0):
        order = "descending" if descending else "ascending (invert_sigmas)"
        raise ValueError(f"{name} must be strictly {order}, got {arr.tolist()}")
    return arr
