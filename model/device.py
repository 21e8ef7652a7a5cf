"""The hardware: which device a name means (shared by training, model/train.py, and serving, service/backends.py),
what the CPU can do, and how to describe it in a checkpoint. /proc/cpuinfo is read here and nowhere else."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

CPUINFO = "/proc/cpuinfo"
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


@functools.cache
def _cpuinfo(path: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """The CPU feature flags and the model names listed in `path` (Linux's /proc/cpuinfo); empty where it cannot
    be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset(), ()
    flags, models = set(), []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
        elif key.strip() == "model name":
            models.append(value.strip())
    return frozenset(flags), tuple(models)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively, so that bf16 autocast speeds training up rather than down.

    CUDA: compute capability 8.0+ (Ampere on; ROCm always), not the slow emulation older GPUs offer. CPU: the
    AVX512-BF16 or AMX-BF16 instructions (`avx512_bf16`/`amx_bf16` in /proc/cpuinfo), with which a bf16 step
    is faster than float32; without them bf16 is emulated, and autocast makes a step much slower than float32
    (docs/model.md). False where /proc/cpuinfo cannot be read, and on other devices.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return not NATIVE_BF16_CPU_FLAGS.isdisjoint(_cpuinfo(CPUINFO)[0])
    return False


def describe_device(device: torch.device, world: int) -> str:
    """What trained a checkpoint, for its metrics: the device's kind and model, and how many processes."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        models = _cpuinfo(CPUINFO)[1]
        name = f"{models[0]} ({os.cpu_count()} cores)" if models else platform.processor() or "unknown CPU"
    return f"{device.type}: {name}, {world} training process(es)"
