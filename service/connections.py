"""uvicorn's HTTP/1.1 connection (httptools) with a deadline on reading each request's head.

uvicorn closes a keep-alive connection that stays idle, but not one that sends its request head slowly (slow
heads held their connections open: docs/design.md), nor one that opens and sends nothing. Here the head must
be complete within `read_timeout_s` of the connection opening, or of the request's first byte on a kept-alive
connection. Otherwise: a connection that sent part of a head gets 408 and is closed (logged and counted
like any answered request); one that sent nothing is closed silently (a load balancer's TCP check, a
browser's spare connection: no request was made). The body has its own deadline in the middleware
(service/app.py), which knows the route and answers in the route's error shape.

A head is also limited in size (httptools has no limit: a huge header line or a huge number of headers was read
in full, docs/design.md): past `MAX_HEAD_BYTES` the client gets 431 and the connection is closed.

Closing a connection while the client is still sending makes the kernel reset it, and a reset can destroy the
answer before the client reads it. So every close with input still unread (a refused head; an answer with
`Connection: close` before the body was read, such as 408) is a lingering close: the sending side closes first,
and what still arrives is dropped for `LINGER_S`, or until the client closes.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.logs import access_line
from service.loop_lag import unread_s

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; far above what ours and every OIP client send (docs/design.md)
# in the ASGI scope: a function saying whether the whole request body has arrived (the middleware keeps a deadline
# on reading the body only when it has not: most requests come whole with their head)
BODY_RECEIVED = "puppet.body_received"
# in the ASGI scope: a function giving how long the connection's last bytes waited unread (service/loop_lag.py)
UNREAD_S = "puppet.unread_s"
LINGER_S = 2.0  # after refusing a head: what the client still sends is read and dropped, then the connection closes


def timed_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this head deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"read_timeout_s": read_timeout_s})


class HeadDeadlineProtocol(HttpToolsProtocol):
    read_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _in_head = False  # between a request's first byte and the end of its head
    _head_bytes = 0  # bytes received while the current head is incomplete
    _discarding = False  # refused: the rest of what the client sends is dropped unread

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's head, or nothing: either way, within the deadline

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._in_head:  # the usual case: the head came whole (no timer on a kept-alive connection)
            return
        if self._head_timer is None:  # a kept-alive connection's next head, split across reads: now timed
            self._arm()
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._disarm()
            self._refuse(
                431,
                "Request Header Fields Too Large",
                "header_too_large",
                f"the request head is over {MAX_HEAD_BYTES:,} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm()
        super().on_headers_complete()
        if (cycle := self.cycle) is not None:
            cycle.transport = _LingeringTransport(
                self
            )  # the request's view of the connection: closing mid-body lingers
            self.scope[BODY_RECEIVED] = lambda: not cycle.more_body  # read by the middleware's body deadline
            sock = self.transport.get_extra_info("socket")
            self.scope[UNREAD_S] = lambda: unread_s(sock) if sock is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined head waits while the request before it is answered: not the client's fault
            return
        if not self._in_head:
            self.transport.close()  # nothing asked, nothing to answer
            return
        self._refuse(
            408,
            "Request Timeout",
            "request_timeout",
            f"the request head did not arrive within {self.read_timeout_s:g} s",
        )

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        """Answer a request whose head never completed, log and count it, and close the connection (lingering)."""
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
        )
        self.linger()
        metrics.REJECTIONS.labels(code).inc()
        metrics.REQUESTS.labels("unmatched", str(status)).inc()
        fields = {"route": "unmatched", "status": status, "error": code}
        if self.client:
            fields["client"] = self.client[0]
        access_line(fields, quiet=False)

    def linger(self) -> None:
        """Close the sending side now, drop what still arrives, and close for good after LINGER_S (or sooner, when
        the client closes)."""
        if self._discarding or self.transport.is_closing():
            return
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class _LingeringTransport:
    """The transport as uvicorn's request cycle uses it: `close()` while the request's body is still arriving
    lingers (HeadDeadlineProtocol.linger); everything else is the transport's own."""

    def __init__(self, protocol: HeadDeadlineProtocol):
        self._protocol, self._transport = protocol, protocol.transport
        self.write, self.is_closing = self._transport.write, self._transport.is_closing  # the hot path, unwrapped

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            self._protocol.linger()
        else:
            self._transport.close()
