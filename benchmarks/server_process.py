"""`puppet-cnn serve` as a child process on a free loopback port, for tests and benchmarks.

It lives outside the runtime packages on purpose: it needs httpx, a test and benchmark dependency that the
image does not install (tests/test_image_install.py proves the image's install starts without it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

# The production environment of the Dockerfile and `make serve`: one torch thread (the other core runs HTTP);
# glibc keeps activation buffers mapped between batches instead of zeroing fresh pages for each.
SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
    "MALLOC_TOP_PAD_": "67108864",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts the server and returns once /health/ready answers 200: HTTP on `port` (`url`), gRPC on `grpc_port`
    (`grpc_target`), both free loopback ports unless `settings` set them.

    Raises RuntimeError with the server's output if it exits first or is not ready in `timeout` seconds.
    Output goes to a temporary file, never a pipe that a long run could fill.

    Args:
        settings: PUPPET_* settings, by their name without the prefix.
        env: more environment variables, over `base_env`.
        base_env: the environment to start from (default: this process's).
        cwd: the working directory of the server (default: this process's).
        command: what to run instead of `python -m service.cli serve` with this interpreter.
    """

    def __init__(
        self,
        settings: dict[str, object],
        *,
        env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        timeout: float = 120.0,
        command: list[str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **(os.environ if base_env is None else base_env),
            **(env or {}),
            "PUPPET_PORT": str(self.port),
            "PUPPET_GRPC_PORT": str(free_port()),  # never Triton's 8001, which parallel servers would share
        }
        full_env.setdefault("PUPPET_LOG_LEVEL", "warning")
        full_env.update({f"PUPPET_{k.upper()}": str(v) for k, v in settings.items()})
        self.grpc_port = int(full_env["PUPPET_GRPC_PORT"])  # 0: gRPC is off
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "service.cli", "serve"],
            env=full_env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout:.0f} s: {self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> str:
        """SIGTERM, wait for the drain (killing after 30 s), and return what the server printed."""
        self.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.output()
