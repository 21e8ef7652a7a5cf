"""HTTP routes: POST /classify, health, model description, metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics, pipeline
from service.deps import Loaded, State
from service.logs import note
from service.schemas import CLASSIFY_REQUEST_DOCS, ClassifyResponse, ErrorResponse, HealthStatus, ModelInfo
from service.state import model_info
from service.uploads import images_and_options, parse_depth, parse_top_k

router = APIRouter()


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
async def classify(request: Request, state: Loaded) -> JSONResponse:
    t0 = time.perf_counter()
    s, ckpt = state.settings, state.ckpt
    d_max = ckpt.config.max_depth
    pipeline.refuse_early(state)
    blobs, options = await images_and_options(request, s.max_upload_bytes, s.max_images_per_request)
    t_body = time.perf_counter()
    k = parse_top_k(options["top_k"], s.default_top_k, len(ckpt.classes))
    depth = parse_depth(options["depth"], d_max)
    max_depth = parse_depth(options["max_depth"], d_max, "max_depth")
    answer = await pipeline.classify(state, blobs, depth=depth, max_depth=max_depth)
    results, timings, t_pre = answer.results, answer.timings, answer.decoded_at
    metrics.PREPROCESS.observe(t_pre - t_body)
    note(receive_ms=round((t_body - t0) * 1000, 3), preprocess_ms=round((t_pre - t_body) * 1000, 3))
    total = time.perf_counter() - t0
    body = {
        "results": [
            {
                "predictions": pipeline.top_k(r.ranked, k, ckpt.classes),
                "depth": r.depth,
                "depth_reason": r.reason,
                "escalated": r.escalated,
                "depths_run": r.depths_run,
                "complexity": round(r.complexity, 5),
                "max_depth": d_max,
            }
            for r in results
        ],
        "model_version": ckpt.version,
        "backend": {"name": state.backend.name, "provider": state.backend.provider},
        "timings_ms": {
            "receive": round((t_body - t0) * 1000, 3),
            "queue": round(timings.queue_s * 1000, 3),
            "preprocess": round((t_pre - t_body) * 1000, 3),
            "inference": round(timings.inference_s * 1000, 3),
            "escalation": round(timings.escalation_s * 1000, 3),
            "total": round(total * 1000, 3),
        },
    }
    server_timing = ", ".join(f"{name};dur={ms:.3f}" for name, ms in body["timings_ms"].items())
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
    if state.serving:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "loading" if not state.ready else "worker restarting"
    return JSONResponse({"error": {"code": "not_ready", "message": f"not ready: {reason}"}}, status_code=503)


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorResponse}},
    summary="The loaded model: classes, preprocessing, depth table, backend",
)
async def describe_model(state: Loaded) -> dict:
    return model_info(state)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics() -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
