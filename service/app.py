"""The app factory: `create_app(settings)`. Heavy work happens in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model import CheckpointError
from model.onnx_export import OnnxExportError
from service.api_docs import install_api_docs
from service.api_keys import ApiKeys, ApiKeysError
from service.errors import install_error_handlers
from service.middleware import MetricsMiddleware
from service.oip import router as oip_router
from service.routes import router
from service.settings import Settings
from service.state import ServiceState, StartupFailed, load_service

log = logging.getLogger("puppet.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _start(state)
        grpc_server = None
        if settings.grpc_port:  # listens, like HTTP, only once the model is loaded and warm
            from service.grpc_server import start_grpc_server  # not at import: see service/grpc_server.py

            grpc_server = await start_grpc_server(state)
        state.loop_lag.start()  # how long requests wait unread: admission counts it (service/loop_lag.py)
        if state.api_keys is not None:
            state.api_keys.start_watching()
        state.set_ready(True)
        try:
            yield
        finally:
            state.set_ready(False)
            state.loop_lag.stop()
            if state.api_keys is not None:
                state.api_keys.stop_watching()
            if grpc_server is not None:  # calls still running get the grace period, new ones UNAVAILABLE
                await grpc_server.stop(settings.drain_timeout_s)
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, settings.drain_timeout_s)

    app = FastAPI(
        title="Puppet-CNN Serve",
        summary="Adaptive-depth image classification: a neural ODE generates the CNN's kernels, input complexity picks its depth.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by install_api_docs, with local assets
    )
    app.state.service = state
    install_error_handlers(app)
    install_api_docs(app)
    app.include_router(router)
    app.include_router(oip_router)
    app.add_middleware(MetricsMiddleware, state=state)
    return app


async def _start(state: ServiceState) -> None:
    """Load the model (service/state.py) off the event loop; a failure stops the process before it is ever ready."""
    state.set_ready(False)
    try:
        if state.settings.api_keys_file is not None:
            state.api_keys = ApiKeys(state.settings.api_keys_file)
        await asyncio.to_thread(load_service, state)
    # the message names the file and what is wrong
    except (CheckpointError, OnnxExportError, StartupFailed, ApiKeysError) as e:
        log.critical("cannot start: %s", e)
        raise StartupFailed(str(e)) from None
    except Exception as e:
        log.critical("cannot start: %s: %s", type(e).__name__, e, exc_info=e)
        raise StartupFailed(str(e)) from None
