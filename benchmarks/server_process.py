"""`puppet-cnn serve` as a child process on a free loopback port, for tests and benchmarks.

It lives outside the runtime packages on purpose: it needs httpx, a test and benchmark dependency that the
image does not install (tests/test_image_install.py proves the image's install starts without it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx

from service.process_env import SERVING_ENV

# What `puppet-cnn serve` gives itself, passed on explicitly: to the peers, and to revisions older than it.
SERVER_ENV = dict(SERVING_ENV)


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: every socket stays bound until all are picked, so the kernel cannot hand
    out one port twice (a server given the same port for HTTP and gRPC refuses to start)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def wait_ready(
    url: str,
    timeout: float,
    *,
    running: Callable[[], bool] = lambda: True,
    interval: float = 0.1,
    request_timeout: float = 1.0,
) -> bool:
    """GET `url` every `interval` seconds until it answers 200: True then, False once `running()` (asked before
    each try) is false or `timeout` seconds have passed. A connection that fails or times out is a not-yet.

    The one readiness poll of the tests and benchmarks: a server process, a peer, a container, a restarted worker.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            return False
        try:
            if httpx.get(url, timeout=request_timeout).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(interval)
    return False


_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a /metrics page (Prometheus text format): {(name, frozenset of (label, value)): value}.

    Comment lines (# HELP, # TYPE) and blank lines are skipped; label values are unescaped; a sample that repeats
    keeps its first value. The one /metrics parser of the tests and benchmarks, e.g. the value of
    `puppet_requests_total{route="/classify",status="200"}` is
    `samples[("puppet_requests_total", frozenset({("route", "/classify"), ("status", "200")}))]`.
    """
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, brace, rest = line.partition("{")
        labels: list[tuple[str, str]] = []
        if brace:
            label_text, _, value_text = rest.rpartition("}")
            labels = [
                (k, re.sub(r"\\.", lambda m: _UNESCAPE.get(m.group(), m.group()), v))
                for k, v in _LABEL.findall(label_text)
            ]
        else:
            name, _, value_text = line.partition(" ")
        value = value_text.split()[0]  # a timestamp may follow the value
        samples.setdefault((name.strip(), frozenset(labels)), float(value))
    return samples


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by `root`, its descendants, and whatever else runs in its session: a
    server's whole footprint, however it spreads its work (worker processes, an inference server it spawns)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        # after the command: state, ppid, pgrp, session, ..., utime (11), stime (12)
        stats[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12]))
    session = stats.get(root, (0, -1, 0))[1]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in mine:
            mine.add(pid)
            todo += children.get(pid, [])
    mine |= {pid for pid, (_, sid, _) in stats.items() if sid == session and session > 1 and session != os.getsid(0)}
    return sum(stats[pid][2] for pid in mine) / _TICK


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
        address: where this process reaches the server (a server in another network namespace listens on
            another address than loopback).
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
        address: str = "127.0.0.1",
    ):
        self.port, grpc_port = free_ports(2)
        self.url = f"http://{address}:{self.port}"
        full_env = {
            **(os.environ if base_env is None else base_env),
            **(env or {}),
            "PUPPET_PORT": str(self.port),
            "PUPPET_GRPC_PORT": str(grpc_port),  # never Triton's 8001, which parallel servers would share
        }
        full_env.setdefault("PUPPET_LOG_LEVEL", "warning")
        full_env.update({f"PUPPET_{k.upper()}": str(v) for k, v in settings.items()})
        self.grpc_port = int(full_env["PUPPET_GRPC_PORT"])  # 0: gRPC is off
        self.grpc_target = f"{address}:{self.grpc_port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "service.cli", "serve"],
            env=full_env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if wait_ready(self.url + "/health/ready", timeout, running=lambda: self.proc.poll() is None):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
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
