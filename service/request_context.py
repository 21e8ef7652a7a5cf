"""What the request being handled carries through the service, whatever its transport (HTTP middleware,
service/middleware.py; gRPC, service/grpc_server.py): when the service began handling it, and its id."""

from __future__ import annotations

import itertools
import time
import uuid
from contextvars import ContextVar

# When the service began handling the current request or call (time.perf_counter())
REQUEST_STARTED: ContextVar[float | None] = ContextVar("puppet_request_started", default=None)


def request_started() -> float:
    """When the service began handling the current request (time.perf_counter()): its deadline counts from
    here, so time spent reading the body and decoding counts too."""
    started = REQUEST_STARTED.get()
    return time.perf_counter() if started is None else started


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
