"""uvicorn's HTTP/1.1 connection (httptools) with a deadline on reading each request's head.

uvicorn closes a keep-alive connection that stays idle, but not one that sends its request head slowly (200
such connections stayed open 15 s), nor one that opens and sends nothing. Here the head must be complete
within `read_timeout_s` of the connection opening, or of the request's first byte on a kept-alive
connection. Otherwise: a connection that sent part of a head gets 408 and is closed (logged and counted
like any answered request); one that sent nothing is closed silently (a load balancer's TCP check, a
browser's spare connection: no request was made). The body has its own deadline in the middleware
(service/app.py), which knows the route and answers in the route's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.logs import access_line

log = logging.getLogger("puppet.connections")


def timed_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this head deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"read_timeout_s": read_timeout_s})


class HeadDeadlineProtocol(HttpToolsProtocol):
    read_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _began = False  # the current request's first byte has arrived

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._arm()
        self._began = True

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._began = False
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
        if not self._began:
            self.transport.close()  # nothing asked, nothing to answer
            return
        message = f"the request head did not arrive within {self.read_timeout_s:g} s"
        body = json.dumps({"error": {"code": "request_timeout", "message": message}}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        metrics.REJECTIONS.labels("read_timeout").inc()
        metrics.REQUESTS.labels("unmatched", "408").inc()
        fields = {"route": "unmatched", "status": 408, "error": "request_timeout"}
        if self.client:
            fields["client"] = self.client[0]
        access_line(fields, quiet=False)
