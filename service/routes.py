"""HTTP routes: POST /classify, health, model description, metrics."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.app import ServiceState, request_started
from service.batcher import (
    BatchTimings,
    DeadlineExceeded,
    Draining,
    ImageResult,
    InferenceFailed,
    QueueFull,
    WorkerDown,
)
from service.decoding import decode_all
from service.errors import ApiError
from service.logs import note
from service.schemas import CLASSIFY_REQUEST_DOCS, ClassifyResponse, ErrorResponse, HealthStatus, ModelInfo
from service.uploads import images_and_options, parse_depth, parse_top_k

router = APIRouter()


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off on every request
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def ready_state(request: Request) -> ServiceState:
    state = request.app.state.service
    if not state.ready or state.batcher is None:
        raise ApiError(503, "not_ready", "the model is still loading or the service is draining", {"Retry-After": "1"})
    return state


State = Annotated[ServiceState, Depends(get_state)]
ReadyState = Annotated[ServiceState, Depends(ready_state)]


async def infer(
    state: ServiceState, images: torch.Tensor, *, depth: int | None, max_depth: int | None
) -> tuple[list[ImageResult], BatchTimings]:
    """Through the worker, mapping its refusals to HTTP errors."""
    note(images=len(images))
    with refusals(state):
        results, timings = await state.batcher.submit(
            images, depth=depth, max_depth=max_depth, started=request_started()
        )
    note(
        depths=[r.depth for r in results],
        depth_reasons=[r.reason for r in results],
        queue_ms=round(timings.queue_s * 1000, 3),
        inference_ms=round(timings.inference_s * 1000, 3),
        estimate_ms=round(timings.estimate_s * 1000, 3),
    )
    return results, timings


def admission_check(state: ServiceState, n: int, *, depth: int | None, max_depth: int | None) -> None:
    """Refuse, before decoding, a request that the worker would refuse. Under overload most requests are
    refused, and decoding theirs took the event loop's time from the ones accepted (at 3x capacity: 333-450
    accepted in 8 s against 606-819 with this check, and answers past the deadline; docs/reliability.md). So
    under overload even an undecodable upload gets 429; its 400 comes when it is retried."""
    with refusals(state):
        state.batcher.check(n, depth=depth, max_depth=max_depth, started=request_started())


@contextmanager
def refusals(state: ServiceState):
    """The worker's refusals as HTTP errors."""
    s = state.settings
    try:
        yield
    except QueueFull as e:
        raise ApiError(429, "queue_full", str(e), {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
    except DeadlineExceeded as e:
        raise ApiError(
            504, "deadline_exceeded", f"{e} (deadline {s.request_deadline_ms:.0f} ms); it was not run"
        ) from None
    except Draining:
        raise ApiError(503, "draining", "the service is shutting down", {"Retry-After": "1"}) from None
    except InferenceFailed as e:
        raise ApiError(
            500, "inference_failed", f"{e}; the error is logged under this id", {"X-Error-Id": e.error_id}
        ) from None
    except WorkerDown as e:
        raise ApiError(503, "worker_restarting", str(e), {"Retry-After": str(max(1, round(e.retry_after_s)))}) from None


def top_k(ranked: list[tuple[int, float]], k: int, classes: tuple[str, ...]) -> list[dict]:
    return [{"label": classes[i], "class_id": i, "probability": round(v, 7)} for i, v in ranked[:k]]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={
        400: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
        500: {"model": ErrorResponse, "description": "The model failed on this batch; X-Error-Id names the log entry"},
        503: {"model": ErrorResponse},
        504: {"model": ErrorResponse},
    },
    openapi_extra=CLASSIFY_REQUEST_DOCS,
    summary="Classify one or more images",
    description=(
        "Send a raw image body (image/png, image/jpeg, image/webp, image/bmp, image/gif), a multipart upload "
        '(`file`, or several `files`), or JSON `{"image": base64}` / `{"images": [...]}`. Options as query '
        "parameters or JSON fields: `top_k`, `depth` (`auto` or 1..D_max), `max_depth`."
    ),
)
async def classify(request: Request, state: ReadyState) -> JSONResponse:
    t0 = time.perf_counter()
    s, ckpt = state.settings, state.ckpt
    d_max = ckpt.config.max_depth
    blobs, options = await images_and_options(request, s.max_upload_bytes, s.max_images_per_request)
    k = parse_top_k(options["top_k"], s.default_top_k, len(ckpt.classes))
    depth = parse_depth(options["depth"], d_max)
    max_depth = parse_depth(options["max_depth"], d_max, "max_depth")
    admission_check(state, len(blobs), depth=depth, max_depth=max_depth)
    images = await decode_all(state, blobs)
    t_pre = time.perf_counter()
    metrics.PREPROCESS.observe(t_pre - t0)
    note(preprocess_ms=round((t_pre - t0) * 1000, 3))
    results, timings = await infer(state, images, depth=depth, max_depth=max_depth)
    total = time.perf_counter() - t0
    body = {
        "results": [
            {
                "predictions": top_k(r.ranked, k, ckpt.classes),
                "depth": r.depth,
                "depth_reason": r.reason,
                "complexity": round(r.complexity, 5),
                "max_depth": d_max,
            }
            for r in results
        ],
        "model_version": ckpt.version,
        "backend": {"name": state.backend.name, "provider": state.backend.provider},
        "timings_ms": {
            "queue": round(timings.queue_s * 1000, 3),
            "preprocess": round((t_pre - t0) * 1000, 3),
            "inference": round(timings.inference_s * 1000, 3),
            "total": round(total * 1000, 3),
        },
    }
    server_timing = f"queue;dur={timings.queue_s * 1000:.3f}, preprocess;dur={(t_pre - t0) * 1000:.3f}, inference;dur={timings.inference_s * 1000:.3f}, total;dur={total * 1000:.3f}"
    return JSONResponse(body, headers={"Server-Timing": server_timing})


@router.get("/health/live", summary="The process is up", response_model=HealthStatus)
async def live() -> dict:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="Loaded, warm and not draining (503 otherwise)",
    response_model=HealthStatus,
    responses={503: {"model": ErrorResponse}},
)
async def ready(state: State) -> JSONResponse:
    if state.serving and state.batcher.alive:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "loading" if not state.ready else "worker restarting"
    return JSONResponse({"error": {"code": "not_ready", "message": f"not ready: {reason}"}}, status_code=503)


def model_info(state: ServiceState) -> dict:
    ckpt, backend = state.ckpt, state.backend
    pre, policy = ckpt.preprocessing, ckpt.policy
    return {
        "name": "puppet-cnn",
        "version": ckpt.version,
        "classes": list(ckpt.classes),
        "preprocessing": {
            "input_size": [pre.image_size, pre.image_size],
            "channels": pre.channels,
            "mean": list(pre.mean),
            "std": list(pre.std),
        },
        "depths": list(range(1, ckpt.config.max_depth + 1)),
        "max_depth": ckpt.config.max_depth,
        "depth_table": {"edges": list(policy.edges), "depths": list(policy.depths), "tolerance": policy.tolerance},
        "stored_parameters": ckpt.model.stored_parameters(),
        "backend": backend.name,
        "provider": backend.provider,
        "device": str(backend.device),
        "checkpoint_sha256": ckpt.sha256,
        "dataset": ckpt.dataset,
    }


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorResponse}},
    summary="The loaded model: classes, preprocessing, depth table, backend",
)
async def describe_model(state: ReadyState) -> dict:
    return model_info(state)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics() -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
