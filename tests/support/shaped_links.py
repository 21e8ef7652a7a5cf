"""A host of the test's own for a server: a network namespace joined to this one by veth pairs, each link with
its own upload rate (`tc qdisc ... tbf` on this side's end, so what the client sends is shaped; answers are not).

Everything is made and removed here: the namespace (deleting it deletes its veth pairs, their addresses and
qdiscs) and addresses in 198.18.0.0/15, the range set aside for network tests (RFC 2544). Traffic goes only to
those addresses. Needs root, iproute2 (the Makefile installs it) and a kernel with namespaces and tbf.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


class Unavailable(Exception):
    """Namespaces, veth pairs or tbf cannot be made here; the message says why."""


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise Unavailable(f"`{' '.join(args)}` failed: {result.stderr.strip()}")


class ShapedHost:
    """A namespace `name` with one link per entry of `rates` (bytes/s from here to there; None: unshaped).

    `address[link]` is the server's address on that link (this side's is the one below it); `exec_prefix` runs a
    command inside the namespace."""

    def __init__(self, rates: dict[str, float | None]):
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise Unavailable("iproute2 (ip, tc) is not installed")
        pid = os.getpid()
        self.name = f"puppet-test-{pid}"
        self.address: dict[str, str] = {}
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            for k, (link, rate) in enumerate(rates.items()):
                here, there = f"pt{pid % 100000}{k}a", f"pt{pid % 100000}{k}b"
                # one /30 a link: 198.18-19.x.y, from the process id, so parallel runs do not meet
                base = (pid % 8192) * 32 + 4 * k
                prefix = f"198.{18 + base // 65536}.{base // 256 % 256}"
                mine, theirs = f"{prefix}.{base % 256 + 1}", f"{prefix}.{base % 256 + 2}"
                _run("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", self.name)
                _run("ip", "addr", "add", f"{mine}/30", "dev", here)
                _run("ip", "-n", self.name, "addr", "add", f"{theirs}/30", "dev", there)
                _run("ip", "link", "set", here, "up")
                _run("ip", "-n", self.name, "link", "set", there, "up")
                if rate is not None:  # bucket: a few packets, or 20 ms at the rate; a second of queue
                    burst = max(16 * 1024, int(rate / 50))
                    _run("tc", "qdisc", "add", "dev", here, "root", "tbf", "rate", f"{int(rate * 8)}bit",
                         "burst", str(burst), "latency", "1s")  # fmt: skip
                self.address[link] = theirs
        except BaseException:
            self.close()
            raise

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def server_command(self) -> list[str]:
        """`puppet-cnn serve` with this interpreter, inside the namespace."""
        return [*self.exec_prefix, sys.executable, "-m", "service.cli", "serve"]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@contextmanager
def shaped_host_or_skip(rates: dict[str, int | None], why: str) -> Iterator[ShapedHost]:
    """A ShapedHost for a module fixture, removed after; the test skips, saying `why` and the cause, where none can
    be made."""
    try:
        host = ShapedHost(rates)
    except Unavailable as e:
        pytest.skip(f"{why}: {e}")
    try:
        yield host
    finally:
        host.close()
