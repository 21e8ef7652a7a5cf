"""What every HTTP request goes through before and after its route: its id, the in-flight count, 503 while
draining, a deadline on reading the body, refusal of transfer codings other than chunked, request metrics by
route template and one access-log line. The gRPC service does the same for its calls (service/grpc_server.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service import metrics
from service.connections import BODY_RECEIVED
from service.errors import DRAINING_MESSAGE, error_response
from service.logs import REQUEST_FIELDS, access_line
from service.request_context import CLIENT_CLOSED, REQUEST_STARTED, new_request_id, sane_request_id
from service.state import ServiceState

log = logging.getLogger("puppet.service")
HEALTH_PATHS = ("/health/", "/v2/health/", "/metrics")  # answered while draining, logged quietly


class BodyTimeout(Exception):
    """The request body did not arrive by its deadline."""


class _Exchange:
    """One HTTP request as the middleware sees it: its log fields, and its status once the answer starts."""

    def __init__(self, scope, send):
        self.scope, self._send = scope, send
        self.path = scope["path"]
        self.start = time.perf_counter()
        self.request_id, self.coding = _scan_headers(scope)
        self.fields = {"request_id": self.request_id, "method": scope["method"], "path": self.path}
        self.status, self.started = 500, False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            message.setdefault("headers", []).append((b"x-request-id", self.request_id.encode()))
        await self._send(message)

    async def refuse(self, receive, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        """Answer before (or instead of) the route, in the error shape of the API the path belongs to."""
        self.fields["error"] = code
        if self.path.startswith("/v2/"):  # the Open Inference Protocol's error shape
            response = JSONResponse({"error": message}, status_code=status, headers=headers)
        else:
            response = error_response(status, code, message, headers)
        await response(self.scope, receive, self.send)


class MetricsMiddleware:
    """Request id, in-flight gauge, 503 while draining, a deadline on reading the body, transfer codings,
    request metrics by route template, one access-log line."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state
        self.read_timeout_s = state.settings.read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = _Exchange(scope, send)
        started_token = REQUEST_STARTED.set(exchange.start)
        fields_token = REQUEST_FIELDS.set(exchange.fields)
        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self._handle(exchange, receive)
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            REQUEST_FIELDS.reset(fields_token)
            REQUEST_STARTED.reset(started_token)
            _record(exchange)

    async def _handle(self, exchange: _Exchange, receive) -> None:
        """The route, or the refusal that replaces it; the errors that escape the route, answered."""
        scope = exchange.scope
        try:
            if exchange.coding is not None:
                # RFC 9112 suggests 501; 400 says whose fault it is, and keeps a client's odd framing out of the
                # server-error ratio that pages people. The body's framing is unknown, so the connection closes.
                message = (
                    f"Transfer-Encoding {exchange.coding!r} is not supported; send Content-Length or chunked alone"
                )
                await exchange.refuse(receive, 400, "unsupported_transfer_coding", message, {"Connection": "close"})
            elif self.state.draining and not exchange.path.startswith(HEALTH_PATHS):
                metrics.REJECTIONS.labels("draining").inc()
                await exchange.refuse(receive, 503, "draining", DRAINING_MESSAGE, {"Retry-After": "1"})
            else:
                received = scope.get(BODY_RECEIVED)  # service/connections.py
                whole = received is not None and received()
                await self.app(scope, receive if whole else self._by_deadline(receive), exchange.send)
        except BodyTimeout:
            if exchange.started:
                raise
            metrics.REJECTIONS.labels("request_timeout").inc()
            message = f"the request body did not arrive within {self.read_timeout_s:g} s"
            await exchange.refuse(receive, 408, "request_timeout", message, {"Connection": "close"})
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, and not our failure
            exchange.status = CLIENT_CLOSED
            exchange.fields["error"] = "client_closed"
        except Exception as exc:  # a bug, not bad input: log it under an id the caller can quote
            if exchange.started:
                raise
            error_id = uuid.uuid4().hex[:12]
            exchange.fields.update(error="internal", error_id=error_id)
            log.error("unhandled error on %s (error id %s)", exchange.path, error_id, exc_info=exc)
            message = f"internal error (error id {error_id}); it is logged"
            await error_response(500, "internal", message, {"X-Error-Id": error_id})(scope, receive, exchange.send)

    def _by_deadline(self, receive):
        """`receive`, held to the body's deadline: a client that sends less than its Content-Length would otherwise
        hold the request for ever. Once the body is complete, receive() only reports a disconnect."""
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s
        body_done = False

        async def receive_by_deadline():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_by_deadline


def _record(exchange: _Exchange) -> None:
    """The request's metrics (by route template: bounded label values) and its access-log line."""
    route = exchange.scope.get("route")
    template = getattr(route, "path", "unmatched")
    duration = time.perf_counter() - exchange.start
    metrics.REQUESTS.labels(template, str(exchange.status)).inc()
    metrics.REQUEST_DURATION.labels(template).observe(duration)
    fields = exchange.fields
    fields.update(route=template, status=exchange.status, duration_ms=round(duration * 1000, 3))
    if client := exchange.scope.get("client"):
        fields["client"] = client[0]
    access_line(fields, quiet=exchange.path.startswith(HEALTH_PATHS))


def _scan_headers(scope) -> tuple[str, str | None]:
    """The request id: the caller's X-Request-Id when it is a sane token (it is logged and echoed), else a
    fresh one; and a Transfer-Encoding other than plain chunked (None when there is none or it is chunked)."""
    request_id = coding = None
    for k, v in scope["headers"]:
        if k == b"x-request-id" and request_id is None:
            request_id = v.decode("ascii") if sane_request_id(v) else ""
        elif k == b"transfer-encoding" and v.strip().lower() != b"chunked":
            coding = v.decode("latin-1")
    return request_id or new_request_id(), coding
