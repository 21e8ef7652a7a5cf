"""What the request being handled carries through the service, whatever its transport (HTTP middleware,
service/middleware.py; gRPC, service/grpc_server.py): the origin of its deadline, and its id."""

from __future__ import annotations

import itertools
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class RequestClock:
    """When the current request (or call) arrived, by the service's clock (time.perf_counter()).

    `received` is the origin of its deadline: when its body was all received (a slow upload's transfer is the
    client's time, not the service's), less how long it had waited unread in the socket before that (the event
    loop's lag, service/loop_lag.py)."""

    received: float

    def body_received(self, now: float, unread_s: float) -> None:
        self.received = now - unread_s


REQUEST_CLOCK: ContextVar[RequestClock | None] = ContextVar("puppet_request_clock", default=None)


def deadline_origin() -> float:
    """The origin of the current request's deadline (time.perf_counter()): time spent decoding and queueing after
    its body was received counts, the upload itself does not."""
    clock = REQUEST_CLOCK.get()
    return time.perf_counter() if clock is None else clock.received


def sane_request_id(value: bytes) -> bool:
    """A caller's request id is kept (logged and echoed) when it is a short printable ASCII token."""
    return 0 < len(value) <= 128 and all(33 <= c < 127 for c in value)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


# generated ids: a random per-process prefix and a counter (uuid4 on every request costs a syscall)
_ID_PREFIX, _ID_COUNTER = uuid.uuid4().hex[:12], itertools.count(1)

# nginx's "client closed request": the caller went away before its answer. Logged and counted under this status,
# never as a server error (alerts count 5xx)
CLIENT_CLOSED = 499
