"""A real `puppet-cnn serve` process on loopback, for integration tests."""

from __future__ import annotations

import os

import httpx

from conftest import REPO
from service.server import ServerProcess, free_port

SHIPPED = os.path.join(REPO, "checkpoints", "puppet-cnn-fmnist.safetensors")
__all__ = ["SHIPPED", "LiveServer", "free_port"]


class LiveServer(ServerProcess):
    def __init__(self, **settings):
        env = {
            "PYTHONPATH": REPO,
            "OMP_NUM_THREADS": "1",
            "PUPPET_CHECKPOINT": os.environ.get("PUPPET_CHECKPOINT", SHIPPED),
        }
        super().__init__(settings, env=env, timeout=60)

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample of /metrics (0 if absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            sample, _, label_part = key.partition("{")
            if sample != name:
                continue
            got = ",".join(sorted(p for p in label_part.rstrip("}").split(",") if p))
            if got == want:
                return float(value)
        return 0.0
