"""Device selection shared by training (model/train.py) and serving (service/backends.py)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; any other name as torch spells it (cpu, cuda, cuda:1, ...).

    An explicit CUDA device on a machine without CUDA is refused here with a message, rather than failing
    later with torch's error from deep inside the first `.to(device)`.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device
