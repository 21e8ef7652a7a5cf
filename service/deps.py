"""FastAPI dependencies: the service's state for a route, and the 503 for a route that needs the model before it
is loaded. Readiness itself is defined once, in `ServiceState.serving` (service/state.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.state import ServiceState


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off on every request
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def loaded_state(request: Request) -> ServiceState:
    state = request.app.state.service
    if not state.loaded:
        raise ApiError(503, "not_ready", "the model is still loading or the service is draining", {"Retry-After": "1"})
    return state


State = Annotated[ServiceState, Depends(get_state)]
Loaded = Annotated[ServiceState, Depends(loaded_state)]
