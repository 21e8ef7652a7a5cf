"""HTTP routes: POST /classify, health, model description, metrics."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from service.errors import ApiError
from service.imaging import ImageError, OpenedImage, decode_opened, discard, open_image, opens_cheaply
from service.logs import note
from service.schemas import CLASSIFY_REQUEST_DOCS, ClassifyResponse, ErrorResponse, HealthStatus, ModelInfo
from service.uploads import images_and_options, parse_depth, parse_top_k

router = APIRouter()
# What a request may do on the event loop, in all (measured on the 2-core CPU): read the headers of its first
# 16 KB of uploads (a PNG's compressed text chunks are inflated as its header is read: about 1.3 ms per KB of
# upload at worst), and decode its first 256 K declared pixels of those: 0.1 ms for 28x28, 1.4-2.5 ms for a
# 512x512 PNG, 6 ms for the worst (a 16-bit RGBA PNG of 4x65,535). A hand-off to a thread costs 0.03-0.1 ms,
# more than decoding 28x28. Everything else is read and decoded in threads.
INLINE_OPEN_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 256 * 1024
DECODE_NICE = 10  # decoding threads' CPU priority, below the event loop's and the inference thread's (0)
_decode_pools: dict[int, ThreadPoolExecutor] = {}


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


async def decode_all(state: ServiceState, blobs: list[bytes]) -> torch.Tensor:
    """Decode every image (in order) to one uint8 batch; 4xx naming the image that failed.

    All headers are read first: an image over `max_pixels`, or images together over `max_request_pixels`, are
    refused (413) before any bitmap is decoded. Small images decode on the event loop (a thread hand-off costs
    more than decoding 28x28); large ones in at most `max_concurrent_decodes` threads of this process, so
    neither the event loop (health checks, other requests) nor memory depends on what is uploaded."""
    s, pre = state.settings, state.ckpt.preprocessing
    where = (lambda i: f"image {i}: ") if len(blobs) > 1 else (lambda i: "")
    opened, i, started = [], 0, -1  # started: the last image handed to a decoder (which releases it)
    try:
        opened, inline = await _open_all(blobs, s.max_pixels)
        total = sum(o.pixels for o in opened)
        if total > s.max_request_pixels:
            sizes = ", ".join(f"image {k}: {o.dimensions}" for k, o in enumerate(opened[:8]))
            more = f" and {len(opened) - 8} more" if len(opened) > 8 else ""
            raise ApiError(
                413,
                "too_many_pixels",
                f"the request's {len(opened)} images hold {total:,} pixels in all ({sizes}{more}); "
                f"the limit is {s.max_request_pixels:,} per request",
            )
        out, inline_pixels = [], 0
        pool = _decode_pool(s.max_concurrent_decodes)
        loop = asyncio.get_running_loop()
        for i, o in enumerate(opened):
            started = i
            if i in inline and inline_pixels + o.pixels <= INLINE_DECODE_PIXELS:
                inline_pixels += o.pixels
                out.append(decode_opened(o, pre))
            else:
                out.append(await loop.run_in_executor(pool, decode_opened, o, pre))
    except ImageError as e:
        metrics.REJECTIONS.labels("bad_input").inc()
        raise ApiError(e.status, e.code, where(i if e.index is None else e.index) + e.message) from None
    except ApiError:
        metrics.REJECTIONS.labels("bad_input").inc()
        raise
    finally:  # refused, failed or cancelled: the images not reached are released (off the loop: may trim)
        if any(o.image is not None for o in opened[started + 1 :]):
            await asyncio.to_thread(discard, opened[started + 1 :])
    return torch.stack(out)


async def _open_all(blobs: list[bytes], max_pixels: int) -> tuple[list[OpenedImage], set[int]]:
    """Every image's header, in order, and which were read on the event loop: uploads while their bytes add
    up to INLINE_OPEN_BYTES (and whose header is cheap to read whatever their size); the rest in one thread.
    An ImageError names the image that failed (`index`); what was opened before it is released."""
    opened: list[OpenedImage | None] = [None] * len(blobs)
    inline_bytes, inline, later = 0, set(), []
    try:
        for i, blob in enumerate(blobs):
            if inline_bytes + len(blob) <= INLINE_OPEN_BYTES and opens_cheaply(blob):
                inline_bytes += len(blob)
                opened[i] = _open_one(i, blob, max_pixels)
                inline.add(i)
            else:
                later.append(i)
        if later:
            for i, o in zip(later, await asyncio.to_thread(_open_many, blobs, later, max_pixels), strict=True):
                opened[i] = o
    except BaseException:
        if any(o is not None for o in opened):
            await asyncio.to_thread(discard, opened)
        raise
    return opened, inline


def _open_many(blobs: list[bytes], which: list[int], max_pixels: int) -> list[OpenedImage]:
    """In a thread: the headers of blobs[i] for i in `which`; on a failure, those read so far are released."""
    out: list[OpenedImage] = []
    try:
        for i in which:
            out.append(_open_one(i, blobs[i], max_pixels))
    except BaseException:
        discard(out)
        raise
    return out


def _open_one(i: int, blob: bytes, max_pixels: int) -> OpenedImage:
    try:
        return open_image(blob, max_pixels=max_pixels)
    except ImageError as e:
        e.index = i
        raise


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    """This process's decoding threads: at most `threads` large images are decoded at once (memory), in
    arrival order; one whose request was cancelled before its turn is never decoded."""
    pool = _decode_pools.get(threads)
    if pool is None:
        pool = _decode_pools[threads] = ThreadPoolExecutor(
            threads, thread_name_prefix="puppet-decode", initializer=_yield_cpu
        )
    return pool


def _yield_cpu() -> None:
    """A decoding thread runs at a lower CPU priority than the event loop and the inference thread (Linux:
    each thread has its own nice value), so they get a core at once when they wake, however many decodes
    are running."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
        except OSError:
            pass


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
