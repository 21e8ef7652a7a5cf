"""The inference worker: one thread owns the backend; requests queue, batches form without idle waits.

When the worker is free, whatever is waiting goes at once; while it is busy, arrivals accumulate and go
together, up to `max_batch_size` images. `max_queue_delay` (default 0) only bounds how long a partial
batch may wait for company. The queue is bounded in images (full -> `QueueFull`); an item whose deadline
has passed when its batch forms is not run (`DeadlineExceeded`); under load, a request whose estimated
wait would miss its deadline gets its depth capped instead (reason `degraded`).

An exception in one batch fails only that batch's requests (`InferenceFailed`, with an error id that is
logged). A worker thread that dies anyway is restarted by a supervisor thread after a back-off (doubling
while it keeps dying, up to 30 s); while it is down, readiness is false and new requests get `WorkerDown`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model import AUTO, CAPPED, DEGRADED, REQUESTED, DepthPolicy
from service import metrics
from service.backends import TorchBackend

log = logging.getLogger("puppet.worker")


class QueueFull(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"the queue is full; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class Draining(Exception):
    pass


class WorkerDown(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"the inference worker crashed and is restarting; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class InferenceFailed(Exception):
    def __init__(self, error_id: str):
        super().__init__(f"inference failed (error id {error_id})")
        self.error_id = error_id


@dataclass
class ImageResult:
    probabilities: torch.Tensor  # (K,)
    ranked: list[tuple[int, float]]  # (class id, probability), most probable first
    depth: int
    reason: str
    complexity: float


@dataclass
class BatchTimings:
    queue_s: float
    inference_s: float


@dataclass
class _Item:
    images: torch.Tensor  # (n, C, H, W) uint8
    depth: int | None
    max_depth: int | None
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    degraded: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        backend: TorchBackend,
        policy: DepthPolicy,
        *,
        max_batch_size: int,
        max_queue: int,
        max_queue_delay_s: float = 0.0,
        degrade_under_load: bool = True,
        degrade_depth: int = 1,
        restart_backoff_s: float = 1.0,
        on_worker_change: Callable[[bool], None] | None = None,
    ):
        self.backend, self.policy = backend, policy
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_queue_delay_s = max_queue_delay_s
        self.degrade_under_load = degrade_under_load
        self.degrade_depth = min(degrade_depth, policy.max_depth)
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._busy_images = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 0.0  # moving average over batches, for the wait estimate
        self.restart_backoff_s = restart_backoff_s
        self._on_worker_change = on_worker_change or (lambda up: None)
        self._restart_at = 0.0
        self._supervisor: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn_worker()
        self._supervisor = threading.Thread(target=self._supervise, name="puppet-worker-supervisor", daemon=True)
        self._supervisor.start()

    def _spawn_worker(self) -> None:
        self._thread = threading.Thread(target=self._run, name="puppet-inference-worker", daemon=True)
        self._thread.start()
        self._on_worker_change(True)

    def _supervise(self) -> None:
        """Restart the worker whenever it dies (not when it stops): back off while it keeps dying."""
        backoff, last_restart = self.restart_backoff_s, -math.inf
        while True:
            self._thread.join()
            if self._stopping:
                return
            now = time.monotonic()
            backoff = min(30.0, backoff * 2) if now - last_restart < 60 else self.restart_backoff_s
            self._restart_at = now + backoff
            self._on_worker_change(False)
            log.error("the inference worker died; restarting it in %.1f s", backoff)
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=backoff)
                if self._stopping:
                    return
            metrics.WORKER_RESTARTS.inc()
            last_restart = time.monotonic()
            self._spawn_worker()
            log.warning("the inference worker was restarted")

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def estimated_wait_s(self) -> float:
        return (self._queued_images + self._busy_images) * self._seconds_per_image

    # -- the event loop's side ----------------------------------------------------------------------
    async def submit(
        self, images: torch.Tensor, *, depth: int | None, max_depth: int | None, deadline_s: float
    ) -> tuple[list[ImageResult], BatchTimings]:
        """Queue one request's images and wait for their results (in request order)."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        item = _Item(images, depth, max_depth, now + deadline_s, loop, loop.create_future())
        n = len(images)
        with self._cond:
            if self._stopping:
                raise Draining()
            if not self.alive:
                raise WorkerDown(max(0.5, self._restart_at - time.monotonic()))
            if self._queued_images + n > self.max_queue:
                metrics.REJECTIONS.labels("queue_full").inc()
                raise QueueFull(max(1.0, self.estimated_wait_s()))
            if self.degrade_under_load and depth is None and self._seconds_per_image > 0:
                # would the work ahead of this request, plus its own, miss the deadline?
                if self.estimated_wait_s() + n * self._seconds_per_image > deadline_s:
                    item.degraded = True
            self._queue.append(item)
            self._queued_images += n
            metrics.QUEUE_LENGTH.set(self._queued_images)
            self._cond.notify()
        return await item.future

    # -- the worker thread --------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return []
            batch, images = [], 0
            deadline = time.perf_counter() + self.max_queue_delay_s
            while True:
                while self._queue and images + len(self._queue[0].images) <= self.max_batch_size:
                    item = self._queue.popleft()
                    batch.append(item)
                    images += len(item.images)
                if not batch:  # one request larger than a batch goes alone
                    item = self._queue.popleft()
                    batch.append(item)
                    images += len(item.images)
                remaining = deadline - time.perf_counter()
                if images >= self.max_batch_size or remaining <= 0 or (self._queue and images > 0) or self._stopping:
                    break
                self._cond.wait(remaining)
            self._queued_images -= images
            self._busy_images = images
            metrics.QUEUE_LENGTH.set(self._queued_images)
            return batch

    def _run(self) -> None:
        batch: list[_Item] = []
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    return
                try:
                    self._process(batch)
                except Exception:
                    _fail(batch, "inference failed for a batch of %d requests (error id %s)")
                finally:
                    self._busy_images = 0
                batch = []
        except BaseException:  # the thread ends here; the supervisor starts another
            _fail(batch, "the inference worker died with a batch of %d requests (error id %s)")

    def _process(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        live = []
        for item in batch:
            if start > item.deadline:
                metrics.REJECTIONS.labels("deadline").inc()
                _resolve(item, exc=DeadlineExceeded())
            else:
                live.append(item)
        if not live:
            return
        if all(item.images.dtype == torch.uint8 for item in live):  # uploads: levels, as decoded
            images = torch.cat([item.images for item in live])
        else:  # with OIP FP32 tensors in the batch: everything as intensities in [0, 1]
            images = torch.cat(
                [item.images.float() / 255.0 if item.images.dtype == torch.uint8 else item.images for item in live]
            )
        h = self.backend.complexity(images)
        auto = self.policy.auto(h).tolist()
        depths, reasons, k = [], [], 0
        for item in live:
            for _ in range(len(item.images)):
                d, reason = auto[k], AUTO
                if item.depth is not None:
                    d, reason = item.depth, REQUESTED
                elif item.degraded and d > self.degrade_depth:
                    d, reason = self.degrade_depth, DEGRADED
                elif item.max_depth is not None and d > item.max_depth:
                    d, reason = item.max_depth, CAPPED
                depths.append(d)
                reasons.append(reason)
                k += 1
        if not self.backend.kernel_cache:
            metrics.KERNEL_GENERATION.observe(self.backend.generate_kernels())
        probs, seconds = self.backend.predict(images, torch.tensor(depths))
        inference_s = time.perf_counter() - start
        n = len(images)
        self._seconds_per_image = (
            inference_s / n if self._seconds_per_image == 0 else 0.8 * self._seconds_per_image + 0.2 * inference_s / n
        )
        metrics.BATCH_SIZE.observe(n)
        if (mem := self.backend.device_memory_bytes()) is not None:
            metrics.DEVICE_MEMORY.labels(str(self.backend.device)).set(mem)
        for d, s in seconds.items():
            metrics.INFERENCE.labels(str(d)).observe(s)
        for (d, reason), count in Counter(zip(depths, reasons, strict=True)).items():
            metrics.DEPTH_CHOSEN.labels(str(d), reason).inc(count)
        hs = h.tolist()
        for d, c in zip(depths, hs, strict=True):
            metrics.IMAGE_DEPTH.observe(d)
            metrics.COMPLEXITY.observe(c)
        values, classes = probs.sort(dim=1, descending=True)  # once per batch, not per request on the loop
        ranked = [list(zip(c, v, strict=True)) for c, v in zip(classes.tolist(), values.tolist(), strict=True)]
        k, settled = 0, []
        for item in live:
            m = len(item.images)
            results = [
                ImageResult(probs[k + i], ranked[k + i], depths[k + i], reasons[k + i], hs[k + i]) for i in range(m)
            ]
            k += m
            metrics.QUEUE_WAIT.observe(start - item.enqueued)
            settled.append((item, (results, BatchTimings(start - item.enqueued, inference_s)), None))
        _settle(settled)


def _fail(batch: list[_Item], message: str) -> None:
    """Fail every request of the batch with one error id, logged with the traceback."""
    error_id = uuid.uuid4().hex[:12]
    log.exception(message, len(batch), error_id, extra={"fields": {"error_id": error_id}})
    _settle([(item, None, InferenceFailed(error_id)) for item in batch])


def _settle(settled: list[tuple[_Item, object, Exception | None]]) -> None:
    """Hand results to their event loops: one wake-up per loop for the whole batch, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for entry in settled:
        by_loop.setdefault(entry[0].loop, []).append(entry)

    def settle(entries):
        for item, result, exc in entries:
            if item.future.done():  # the client went away
                continue
            if exc is not None:
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)

    for loop, entries in by_loop.items():
        loop.call_soon_threadsafe(settle, entries)


def _resolve(item: _Item, *, result=None, exc: Exception | None = None) -> None:
    _settle([(item, result, exc)])
