"""What every HTTP request goes through before and after its route: its id, the in-flight count, 503 while
draining, the pace a body must keep while it arrives (service/body_pace.py) and the origin of its deadline,
refusal of transfer codings other than chunked, request metrics by route template and one access-log line. The
gRPC service does the same for its calls (service/grpc_server.py)."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service import metrics
from service.api_keys import Refusal, check_credentials
from service.body_pace import PaceLimits, UploadTooSlow, paced_receive
from service.connections import BODY_RECEIVED, UNREAD_S
from service.errors import DRAINING_MESSAGE, error_response, oip_path
from service.logs import REQUEST_FIELDS, access_line
from service.request_context import CLIENT_CLOSED, REQUEST_CLOCK, RequestClock, new_request_id, sane_request_id
from service.state import ServiceState

log = logging.getLogger("puppet.service")
HEALTH_PATHS = ("/health/", "/v2/health/", "/metrics")  # answered while draining, logged quietly
OPEN_PATHS = ("/health/", "/v2/health/", "/docs", "/openapi.json")  # no API key: probes, and the API's description


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
        if oip_path(self.path):
            response = JSONResponse({"error": message}, status_code=status, headers=headers)
        else:
            response = error_response(status, code, message, headers)
        await response(self.scope, receive, self.send)


class MetricsMiddleware:
    """Request id, in-flight gauge, 503 while draining, the body's pace and the deadline's origin, transfer
    codings, request metrics by route template, one access-log line."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state
        s = state.settings
        self.pace = PaceLimits(s.read_timeout_s, s.min_upload_rate, s.upload_rate_window_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = _Exchange(scope, send)
        clock = RequestClock(exchange.start - self._unread_s(scope))
        clock_token = REQUEST_CLOCK.set(clock)
        fields_token = REQUEST_FIELDS.set(exchange.fields)
        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self._handle(exchange, receive, clock)
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            REQUEST_FIELDS.reset(fields_token)
            REQUEST_CLOCK.reset(clock_token)
            _record(exchange)

    def _unread_s(self, scope) -> float:
        """How long the request's last bytes waited unread: the kernel's count for this connection where it has one,
        else the event loop's recent lag (service/loop_lag.py)."""
        unread = scope.get(UNREAD_S)
        waited = unread() if unread is not None else None
        return self.state.loop_lag.current() if waited is None else waited

    def _credentials(self, exchange: _Exchange) -> Refusal | None:
        """Why the request's API key does not admit it (None: it does, or none is needed); the key's name is logged."""
        keys, path = self.state.api_keys, exchange.path
        if keys is None or path.startswith(OPEN_PATHS) or (path.startswith("/v2/models/") and path.endswith("/ready")):
            return None
        if path == "/metrics" and not self.state.settings.metrics_require_key:
            return None
        authorization = api_key = None
        for k, v in exchange.scope["headers"]:
            if k == b"authorization" and authorization is None:
                authorization = v.decode("latin-1")
            elif k == b"x-api-key" and api_key is None:
                api_key = v.decode("latin-1")
        outcome = check_credentials(keys, authorization, api_key)
        if isinstance(outcome, Refusal):
            return outcome
        exchange.fields["key_name"] = outcome
        return None

    async def _handle(self, exchange: _Exchange, receive, clock: RequestClock) -> None:
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
            elif (refusal := self._credentials(exchange)) is not None:
                metrics.AUTH_FAILURES.labels(refusal.reason).inc()
                headers = {"WWW-Authenticate": refusal.challenge}
                await exchange.refuse(receive, 401, "unauthorized", refusal.message, headers)
            elif self.state.draining and not exchange.path.startswith(HEALTH_PATHS):
                metrics.REJECTIONS.labels("draining").inc()
                await exchange.refuse(receive, 503, "draining", DRAINING_MESSAGE, {"Retry-After": "1"})
            else:
                received = scope.get(BODY_RECEIVED)  # service/connections.py
                if received is None or received():  # the usual case: the body came whole with the head
                    await self.app(scope, receive, exchange.send)
                else:  # the deadline starts once the body is in, less the time it waited unread

                    def body_in() -> None:
                        clock.body_received(time.perf_counter(), self._unread_s(scope))

                    await self.app(scope, paced_receive(receive, self.pace, body_in), exchange.send)
        except UploadTooSlow as e:
            if exchange.started:
                raise
            metrics.REJECTIONS.labels(e.code).inc()
            await exchange.refuse(receive, 408, e.code, e.message, {"Connection": "close"})
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
