"""A request's images through the service, whatever the API (/classify in service/routes.py, the Open Inference
Protocol in service/oip_tensors.py): admission → decode → the inference worker → ranked answers, with the worker's
refusals as HTTP errors."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from service.batch_answers import ImageResult
from service.batcher import BatchTimings
from service.decoding import decode_all
from service.errors import ApiError
from service.logs import note
from service.request_context import deadline_origin
from service.state import ServiceState
from service.work_queue import DeadlineExceeded, Draining, QueueFull, WorkerDown
from service.worker import InferenceFailed


@dataclass
class Classified:
    results: list[ImageResult]  # in request order
    timings: BatchTimings
    decoded_at: float  # time.perf_counter() once the images were decoded (preprocessing ends here)


async def classify(
    state: ServiceState, images: list[bytes] | torch.Tensor, *, depth: int | None, max_depth: int | None
) -> Classified:
    """Encoded images (admitted before they are decoded), or a tensor already decoded: the FP32 input of the Open
    Inference Protocol, normalised with the checkpoint's mean and std."""
    if isinstance(images, list):
        admission_check(state, len(images), depth=depth, max_depth=max_depth)
        images = await decode_all(state, images)
    decoded_at = time.perf_counter()
    results, timings = await infer(state, images, depth=depth, max_depth=max_depth)
    return Classified(results, timings, decoded_at)


async def infer(
    state: ServiceState, images: torch.Tensor, *, depth: int | None, max_depth: int | None
) -> tuple[list[ImageResult], BatchTimings]:
    """Through the worker, mapping its refusals to HTTP errors."""
    note(images=len(images))
    with refusals(state):
        results, timings = await state.batcher.submit(
            images, depth=depth, max_depth=max_depth, started=deadline_origin()
        )
    note(
        depths=[r.depth for r in results],
        depth_reasons=[r.reason for r in results],
        escalated=[r.escalated for r in results],
        queue_ms=round(timings.queue_s * 1000, 3),
        inference_ms=round(timings.inference_s * 1000, 3),
        escalation_ms=round(timings.escalation_s * 1000, 3),
        estimate_ms=round(timings.estimate_s * 1000, 3),
    )
    return results, timings


def refuse_early(state: ServiceState) -> None:
    """Refuse, before its body is read, a request that could not be admitted even as one image at depth 1, while
    the worker has work. Under overload most requests are refused, and reading and parsing their bodies took the
    event loop's time from the ones accepted (docs/reliability.md)."""
    with refusals(state):
        state.batcher.check_while_busy(started=deadline_origin())


def admission_check(state: ServiceState, n: int, *, depth: int | None, max_depth: int | None) -> None:
    """Refuse, before decoding, a request that the worker would refuse. Under overload most requests are
    refused, and decoding theirs took the event loop's time from the ones accepted (fewer accepted, and answers
    past the deadline; docs/reliability.md). So under overload even an undecodable upload gets 429; its 400
    comes when it is retried."""
    with refusals(state):
        state.batcher.check(n, depth=depth, max_depth=max_depth, started=deadline_origin())


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
    """The k most probable classes of one image (the worker ranks each batch once)."""
    return [{"label": classes[i], "class_id": i, "probability": round(v, 7)} for i, v in ranked[:k]]
