"""A real `puppet-cnn serve` process on loopback, for integration tests."""

from __future__ import annotations

import os
import time

import httpx

from benchmarks.server_process import ServerProcess, free_port, metric_samples
from conftest import REPO
from model import SHIPPED_CHECKPOINT
from service.settings import Settings

SHIPPED = str(SHIPPED_CHECKPOINT)  # model/checkpoint.py: the one place that names it
# The deadline a test server gets unless the test sets one: a test that is not about admission by time is never
# refused because the machine is slow or busy. Tests of admission set theirs, often SHIPPED_DEADLINE_MS.
UNHURRIED_DEADLINE_MS = 60_000
SHIPPED_DEADLINE_MS = Settings.model_fields["request_deadline_ms"].default
__all__ = ["SHIPPED", "SHIPPED_DEADLINE_MS", "LiveServer", "answer_or_cut", "free_port", "hung_teardown"]


class LiveServer(ServerProcess):
    def __init__(
        self,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
        address: str = "127.0.0.1",
        **settings,
    ):
        full_env = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH")])
            ),
            "PUPPET_WORKERS": "1",  # exact batching and metric semantics; test_workers.py runs several
            "PUPPET_CHECKPOINT": os.environ.get("PUPPET_CHECKPOINT", SHIPPED),
            **(env or {}),
        }
        if "request_deadline_ms" not in settings and "PUPPET_REQUEST_DEADLINE_MS" not in full_env:
            settings["request_deadline_ms"] = UNHURRIED_DEADLINE_MS
        super().__init__(settings, env=full_env, base_env=base_env, timeout=60, command=command, address=address)

    def output_with(self, *texts: str, timeout: float = 10.0) -> str:
        """What the server printed, once every one of `texts` is in it: a log line is written after its answer was
        sent, so a client can read the output before the line of the request it just got back."""
        deadline = time.monotonic() + timeout
        while not all(t in (out := self.output()) for t in texts):
            assert time.monotonic() < deadline, f"not logged within {timeout:g} s: {[t for t in texts if t not in out]}"
            time.sleep(0.02)
        return out

    def process_stats(self) -> dict[str, int]:
        """Resident memory (bytes), open file descriptors and threads of the server process, from /proc."""
        pid = self.proc.pid
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
        return {
            "rss": int(status["VmRSS"].split()[0]) * 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]),
        }

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics now: {(name, frozenset of (label, value)): value} (`metric_samples`)."""
        return metric_samples(httpx.get(self.url + "/metrics").text)

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample of /metrics (0 if absent)."""
        return self.metrics().get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def answer_or_cut(future):
    """A request future's response, or the name of the transport error when the connection was cut without one."""
    try:
        return future.result()
    except httpx.TransportError as e:
        return type(e).__name__


def hung_teardown(output: str) -> list[str]:
    """The log lines that say a serving process outlived its drain: its watchdog ending it (service/server.py), or
    the supervisor killing it (service/supervisor.py). Each carries the threads' stacks."""
    return [line for line in output.splitlines() if "after the drain timeout with" in line or "has not stopped" in line]
