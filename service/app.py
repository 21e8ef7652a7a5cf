"""The app factory: `create_app(settings)`. Heavy work happens in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI

from model import Checkpoint, load_checkpoint
from model.onnx_export import ensure_export, verified_export
from service import metrics
from service.backends import OnnxBackend, TorchBackend, resolve_device
from service.batcher import Batcher
from service.errors import error_response, install_error_handlers
from service.settings import Settings

log = logging.getLogger("puppet.service")
HEALTH_PATHS = ("/health/", "/v2/health/", "/metrics")


@dataclass
class ServiceState:
    """What the routes need; lives on app.state.service once the lifespan has loaded the model."""

    settings: Settings
    ckpt: Checkpoint | None = None
    backend: TorchBackend | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    in_flight: int = 0

    def set_ready(self, value: bool) -> None:
        self.ready = value
        metrics.READY.set(1 if value else 0)


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
        max_queue_delay_s=s.max_queue_delay_ms / 1000,
        degrade_under_load=s.degrade_under_load,
        degrade_depth=s.degrade_depth,
    )
    batcher.start()
    state.ckpt, state.backend, state.batcher = ckpt, backend, batcher
    gc.collect()
    gc.freeze()  # the model's objects never die: keep the collector from walking them on every pause
    log.info("model %s loaded on %s in %.2f s; ready", ckpt.version, device, time.perf_counter() - t0)


class MetricsMiddleware:
    """Request id, in-flight gauge, 503 while draining, and request metrics by route template."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.state.draining and not path.startswith(HEALTH_PATHS):
            metrics.REJECTIONS.labels("draining").inc()
            response = error_response(
                503, "draining", "the service is shutting down; retry on another instance", {"Retry-After": "1"}
            )
            return await response(scope, receive, send)
        request_id = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), None) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()[:128]))
            await send(message)

        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(template, str(status)).inc()
            metrics.REQUEST_DURATION.labels(template).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.set_ready(False)
        await asyncio.to_thread(load_service, state)
        state.set_ready(True)
        try:
            yield
        finally:
            state.set_ready(False)
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
