"""The app factory: `create_app(settings)`. Heavy work happens in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
import uuid
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from model import Checkpoint, CheckpointError, load_checkpoint
from model.onnx_export import OnnxExportError, ensure_export, verified_export
from service import metrics
from service.backends import OnnxBackend, TorchBackend, resolve_device
from service.batcher import Batcher
from service.connections import BODY_RECEIVED
from service.errors import error_response, install_error_handlers
from service.logs import REQUEST_FIELDS, access_line
from service.settings import Settings

log = logging.getLogger("puppet.service")
HEALTH_PATHS = ("/health/", "/v2/health/", "/metrics")


class StartupFailed(Exception):
    """The model could not be loaded; the process exits without ever reporting ready."""


@dataclass
class ServiceState:
    """What the routes need; lives on app.state.service once the lifespan has loaded the model."""

    settings: Settings
    ckpt: Checkpoint | None = None
    backend: TorchBackend | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    worker_up: bool = True
    in_flight: int = 0

    def set_ready(self, value: bool) -> None:
        self.ready = value
        self._publish()

    def worker_changed(self, up: bool) -> None:
        """From the batcher's supervisor: the inference worker died (False) or runs again (True)."""
        self.worker_up = up
        self._publish()

    @property
    def serving(self) -> bool:
        return self.ready and self.worker_up and not self.draining and self.batcher is not None

    def _publish(self) -> None:
        metrics.READY.set(1 if self.ready and self.worker_up and not self.draining else 0)


def make_backend(s: Settings, ckpt: Checkpoint, device: torch.device) -> TorchBackend:
    if s.backend == "torch":
        return TorchBackend(ckpt, device, kernel_cache=s.kernel_cache)
    if s.onnx_dir is not None:  # supplied pre-built: serve it only if it matches this checkpoint
        files = verified_export(ckpt, s.onnx_dir)
    else:  # made here on first start, reused while the checkpoint is unchanged
        files = ensure_export(ckpt, s.onnx_cache_dir / ckpt.sha256[:16])
    return OnnxBackend(
        ckpt,
        device,
        files,
        threads=s.torch_threads,
        providers=tuple(p.strip() for p in s.onnx_providers.split(",") if p.strip()),
        trt_fp16=s.onnx_trt_fp16,
        trt_cache_dir=str(s.onnx_trt_cache_dir) if s.onnx_trt_cache_dir else None,
    )


def load_service(state: ServiceState) -> None:
    """Load the checkpoint onto the worker's device, cache kernels, warm every depth, start the worker."""
    s = state.settings
    torch.set_num_threads(s.torch_threads)
    t0 = time.perf_counter()
    device = resolve_device(s.device)
    ckpt = load_checkpoint(s.checkpoint, device)
    metrics.LOAD_SECONDS.set(time.perf_counter() - t0)
    backend = make_backend(s, ckpt, device)
    metrics.KERNEL_GENERATION.observe(backend.generate_kernels())
    metrics.WARMUP_SECONDS.set(backend.warmup(batch_sizes=(1, min(8, s.max_batch_size), s.max_batch_size)))
    metrics.MODEL_INFO.labels(
        ckpt.version, backend.name, backend.provider, str(device), str(ckpt.config.max_depth), ckpt.sha256[:12]
    ).set(1)
    metrics.MAX_DEPTH.set(ckpt.config.max_depth)
    if (mem := backend.device_memory_bytes()) is not None:
        metrics.DEVICE_MEMORY.labels(str(device)).set(mem)
    batcher = Batcher(
        backend,
        ckpt.policy,
        max_batch_size=s.max_batch_size,
        max_queue=s.max_queue,
        deadline_s=s.request_deadline_ms / 1000,
        max_queue_delay_s=s.max_queue_delay_ms / 1000,
        degrade_under_load=s.degrade_under_load,
        degrade_depth=s.degrade_depth,
        restart_backoff_s=s.worker_restart_backoff_s,
        on_worker_change=state.worker_changed,
    )
    batcher.calibrate()
    batcher.start()
    state.ckpt, state.backend, state.batcher = ckpt, backend, batcher
    gc.collect()
    gc.freeze()  # the model's objects never die: keep the collector from walking them on every pause
    log.info("model %s loaded on %s in %.2f s; ready", ckpt.version, device, time.perf_counter() - t0)


class BodyTimeout(Exception):
    """The request body did not arrive by its deadline."""


class MetricsMiddleware:
    """Request id, in-flight gauge, 503 while draining, a deadline on reading the body, transfer codings,
    request metrics by route template, one access-log line."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state
        self.read_timeout_s = state.settings.read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        start = time.perf_counter()
        started_token = REQUEST_STARTED.set(start)
        request_id, coding = _scan_headers(scope)
        fields = {"request_id": request_id, "method": scope["method"], "path": path}
        token = REQUEST_FIELDS.set(fields)
        status, started = 500, False
        body_deadline = asyncio.get_running_loop().time() + self.read_timeout_s
        body_done = False

        async def receive_by_deadline():
            """The body must arrive by its deadline (a client that sends less than its Content-Length would
            otherwise hold the request for ever); afterwards receive() only reports a disconnect."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            if coding is not None:
                # RFC 9112 suggests 501; 400 says whose fault it is, and keeps a client's odd framing out of the
                # server-error ratio that pages people. The body's framing is unknown, so the connection closes.
                fields["error"] = "unsupported_transfer_coding"
                message = f"Transfer-Encoding {coding!r} is not supported; send Content-Length or chunked alone"
                await _refusal(path, 400, fields["error"], message, {"Connection": "close"})(
                    scope, receive, send_with_id
                )
            elif self.state.draining and not path.startswith(HEALTH_PATHS):
                metrics.REJECTIONS.labels("draining").inc()
                fields["error"] = "draining"
                message = "the service is shutting down; retry on another instance"
                await _refusal(path, 503, "draining", message, {"Retry-After": "1"})(scope, receive, send_with_id)
            else:
                received = scope.get(BODY_RECEIVED)  # service/connections.py
                await self.app(
                    scope, receive if received is not None and received() else receive_by_deadline, send_with_id
                )
        except BodyTimeout:
            if started:
                raise
            metrics.REJECTIONS.labels("request_timeout").inc()
            fields["error"] = "request_timeout"
            message = f"the request body did not arrive within {self.read_timeout_s:g} s"
            await _refusal(path, 408, "request_timeout", message, {"Connection": "close"})(scope, receive, send_with_id)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, and not our failure
            status = CLIENT_CLOSED
            fields["error"] = "client_closed"
        except Exception as exc:  # a bug, not bad input: log it under an id the caller can quote
            if started:
                raise
            fields.update(error="internal", error_id=uuid.uuid4().hex[:12])
            log.error("unhandled error on %s (error id %s)", path, fields["error_id"], exc_info=exc)
            response = error_response(
                500,
                "internal",
                f"internal error (error id {fields['error_id']}); it is logged",
                {"X-Error-Id": fields["error_id"]},
            )
            await response(scope, receive, send_with_id)
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            REQUEST_FIELDS.reset(token)
            REQUEST_STARTED.reset(started_token)
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            duration = time.perf_counter() - start
            metrics.REQUESTS.labels(template, str(status)).inc()
            metrics.REQUEST_DURATION.labels(template).observe(duration)
            fields.update(route=template, status=status, duration_ms=round(duration * 1000, 3))
            if client := scope.get("client"):
                fields["client"] = client[0]
            access_line(fields, quiet=path.startswith(HEALTH_PATHS))


# nginx's "client closed request": logged and counted, never as a server error (alerts count 5xx)
CLIENT_CLOSED = 499


def _refusal(path: str, status: int, code: str, message: str, headers: dict[str, str]) -> JSONResponse:
    """An answer given before the route runs, in the error shape of the API the path belongs to."""
    if path.startswith("/v2/"):  # the Open Inference Protocol's error shape
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(status, code, message, headers)


# When the service began handling the current request or call (time.perf_counter()): set by the HTTP middleware
# and by the gRPC service (service/grpc_server.py)
REQUEST_STARTED: ContextVar[float | None] = ContextVar("puppet_request_started", default=None)


def request_started() -> float:
    """When the service began handling the current request (time.perf_counter()): its deadline counts from
    here, so time spent reading the body and decoding counts too."""
    started = REQUEST_STARTED.get()
    return time.perf_counter() if started is None else started


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


def sane_request_id(value: bytes) -> bool:
    """A caller's request id is kept (logged and echoed) when it is a short printable ASCII token."""
    return 0 < len(value) <= 128 and all(33 <= c < 127 for c in value)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


# generated ids: a random per-process prefix and a counter (uuid4 on every request costs a syscall)
_ID_PREFIX, _ID_COUNTER = uuid.uuid4().hex[:12], itertools.count(1)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.set_ready(False)
        try:
            await asyncio.to_thread(load_service, state)
        except (CheckpointError, OnnxExportError) as e:  # the message names the file and what is wrong
            log.critical("cannot start: %s", e)
            raise StartupFailed(str(e)) from None
        except Exception as e:
            log.critical("cannot start: %s: %s", type(e).__name__, e, exc_info=e)
            raise StartupFailed(str(e)) from None
        grpc_server = None
        if settings.grpc_port:  # listens, like HTTP, only once the model is loaded and warm
            from service.grpc_server import start_grpc_server  # not at import: see service/grpc_server.py

            grpc_server = await start_grpc_server(state)
        state.set_ready(True)
        try:
            yield
        finally:
            state.set_ready(False)
            if grpc_server is not None:  # calls still running get the grace period, new ones UNAVAILABLE
                await grpc_server.stop(settings.drain_timeout_s)
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, settings.drain_timeout_s)

    app = FastAPI(
        title="Puppet-CNN Serve",
        summary="Adaptive-depth image classification: a neural ODE generates the CNN's kernels, input complexity picks its depth.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    from service.oip import router as oip_router
    from service.routes import router

    app.include_router(router)
    app.include_router(oip_router)
    app.add_middleware(MetricsMiddleware, state=state)
    return app
