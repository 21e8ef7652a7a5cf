"""How long a request waited, unread, before the service saw it.

A request's bytes wait in the kernel (the accept queue, the socket's buffer) until the event loop gets round to
them. Admission adds that wait to the time a request has already spent (service/request_context.py), so its
deadline is closer to the client's clock than to the moment the service began handling it. Two measures:

- `unread_s(sock)`: the kernel's own, per connection: how long ago its last bytes arrived (TCP_INFO's
  `tcpi_last_data_recv`), read when the request is taken. Exact to the kernel's tick, for HTTP over TCP.
- `LoopLag`: where no socket can say (gRPC, whose library reads the sockets), the event loop's lag: a timer due
  every `interval_s` fires late by about as long as the loop was busy, which is also how long data that arrived
  meanwhile waited. The estimate is the latest peak, forgotten with a half-life.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

INTERVAL_S = 0.01
HALF_LIFE_S = 1.0
_TCP_INFO_BYTES = 104  # struct tcp_info up to its fixed-size fields
_LAST_DATA_RECV_AT = 52  # byte offset of tcpi_last_data_recv (u32, milliseconds) in struct tcp_info


def unread_s(sock: socket.socket) -> float | None:
    """How long ago the connection's last bytes arrived, by the kernel: for a request read now, how long they waited
    unread. None where the socket cannot say (not TCP, not Linux, closed)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError, ValueError):  # uvloop's view of a closed socket raises ValueError
        return None
    if len(raw) < _LAST_DATA_RECV_AT + 4:
        return None
    return struct.unpack_from("=I", raw, _LAST_DATA_RECV_AT)[0] / 1000


class LoopLag:
    """The event loop's recent lag, in seconds (`current()`), from a timer that runs on it."""

    def __init__(self, interval_s: float = INTERVAL_S, half_life_s: float = HALF_LIFE_S):
        self.interval_s, self.half_life_s = interval_s, half_life_s
        self._peak, self._peak_at = 0.0, 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Sample the running loop from now on."""
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = time.monotonic() + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        self.observe(max(0.0, now - self._due), now)
        self._schedule(loop)

    def observe(self, lag_s: float, now: float) -> None:
        """One sample: a new peak counts at once; an old one fades with the half-life."""
        if lag_s >= self.current(now):
            self._peak, self._peak_at = lag_s, now

    def current(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self._peak * 0.5 ** ((now - self._peak_at) / self.half_life_s)
