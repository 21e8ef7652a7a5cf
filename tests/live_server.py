"""A real `puppet-cnn serve` process on loopback, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from conftest import REPO

SHIPPED = os.path.join(REPO, "checkpoints", "puppet-cnn-fmnist.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": REPO,
            "OMP_NUM_THREADS": "1",
            "PUPPET_PORT": str(self.port),
            "PUPPET_LOG_LEVEL": "warning",
        }
        env.setdefault("PUPPET_CHECKPOINT", SHIPPED)
        env.update({f"PUPPET_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

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

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> str:
        self.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""
