"""Checks of values that come from callers or from files: each failure is one ValueError whose
message names the value, what it must be and what it was."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
import torch


def check_int(name: str, value: Any, lo: int, hi: int) -> None:
    """`value` an int (not a bool; numpy integers too) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def check_positive(name: str, value: Any) -> None:
    """`value` a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}")


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A tensor (detached) from a tensor, an array or a nested list."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # noqa: BLE001 - whatever numpy makes of it, one line for the caller
        raise ValueError(f"{name} could not be converted to a tensor: {exc}") from None


def config_from_dict(cls, data: Any, required: tuple[str, ...]):
    """Dataclass `cls` from a JSON-like mapping: unknown or missing keys refused, then `cls.validate()`."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} must be a JSON object / dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; allowed keys: {sorted(names)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{cls.__name__}: missing required key(s) {missing}")
    return cls(**dict(data)).validate()
