"""Device choice: `auto` picks CUDA, then Apple MPS, then CPU. No device name is hard-coded
elsewhere; everything takes the torch.device chosen here."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend and backend.is_available())
    return False


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the best available device; an explicit name must be available."""
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if base == "auto":
        for kind in ("cuda", "mps", "cpu"):
            if _available(kind):
                return torch.device(kind)
    if not _available(base):
        raise ValueError(f"device {name!r} was requested but is not available on this machine "
                         f"(use --device auto or cpu)")
    return torch.device(name)


def as_device(device=None) -> torch.device:
    """None -> the CPU; a name through resolve_device ("auto", "cpu", "cuda:1"); a torch.device as is."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        return resolve_device(device)
    return torch.device(device)
