"""The inference worker: one thread owns the backend; requests queue, batches form without idle waits.

When the worker is free, whatever is waiting goes at once; while it is busy, arrivals accumulate and go
together, up to `max_batch_size` images. `max_queue_delay` (default 0) only bounds how long a partial
batch may wait for company. Admission is by time (service/admission.py): a request is queued only when the work ahead of
it plus its own, at the per-image costs the worker measures, fits its deadline; otherwise `QueueFull`
(429) with a retry time, or `DeadlineExceeded` (504) when it could not finish in time even alone. The queue
is also bounded in images (memory). Under load an auto-depth request runs at the degrade depth (reason
`degraded`). An item that can no longer finish by its deadline when its batch forms is not run (504).

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

from model import AUTO, DepthPolicy, Preprocessing
from service import metrics
from service.admission import CostModel, decide
from service.backends import Backend

log = logging.getLogger("puppet.worker")


class QueueFull(Exception):
    def __init__(self, retry_after_s: float, why: str = "the queue is full"):
        super().__init__(f"{why}; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    def __init__(self, message: str = "the request could not finish before its deadline"):
        super().__init__(message)


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
    estimate_s: float  # what admission expected queue and inference to take


@dataclass
class _Item:
    images: torch.Tensor  # (n, C, H, W): uint8 levels, or float32 normalised (the OIP's FP32 input)
    depth: int | None
    max_depth: int | None
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    key: int  # what its images cost (service/admission.py)
    estimate_s: float  # admission's estimate of its queue wait plus its own worker time
    degraded: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    answered: float = 0.0  # when the worker handed its result to the event loop


class Batcher:
    def __init__(
        self,
        backend: Backend,
        policy: DepthPolicy,
        preprocessing: Preprocessing,
        *,
        max_batch_size: int,
        max_queue: int,
        deadline_s: float,
        max_queue_delay_s: float = 0.0,
        degrade_under_load: bool = True,
        degrade_depth: int = 1,
        restart_backoff_s: float = 1.0,
        on_worker_change: Callable[[bool], None] | None = None,
    ):
        self.backend, self.policy, self.preprocessing = backend, policy, preprocessing
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.deadline_s, self.max_queue_delay_s = deadline_s, max_queue_delay_s
        self.degrade_under_load = degrade_under_load
        self.degrade_depth = min(degrade_depth, policy.max_depth)
        self.costs = CostModel(policy.max_depth)
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._queued_by_key = [0] * (policy.max_depth + 1)  # images waiting, by cost key
        self._busy_s, self._busy_since = 0.0, 0.0  # estimated worker time of the running batch, its start
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.restart_backoff_s = restart_backoff_s
        self._on_worker_change = on_worker_change or (lambda up: None)
        self._restart_at = 0.0
        self._supervisor: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def calibrate(self, repeats: int = 3) -> None:
        """Measure a full batch at every depth (complexity and model, median of `repeats`): admission's first
        per-image costs, before any request has been served. Call after the backend's warm-up."""
        pre, n = self.preprocessing, self.max_batch_size
        images = torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8)
        for d in range(1, self.policy.max_depth + 1):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.backend.complexity(images)
                self.backend.predict(images, torch.full((n,), d))
                times.append(time.perf_counter() - t0)
            self.costs.seed(d, sorted(times)[repeats // 2] / n)

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

    def estimated_wait_s(self) -> float:
        """Worker time of everything queued, plus what is left of the running batch (call under the lock)."""
        queued = sum(n * self.costs.cost(k) for k, n in enumerate(self._queued_by_key) if n)
        running = max(0.0, self._busy_s - (time.perf_counter() - self._busy_since))
        return queued + running

    # -- the event loop's side ----------------------------------------------------------------------
    def _admit(self, n: int, depth: int | None, max_depth: int | None, started: float):
        """Admission of `n` images (call under the lock): the decision, or the refusal raised and counted."""
        if self._stopping:
            raise Draining()
        if not self.alive:
            raise WorkerDown(max(0.5, self._restart_at - time.monotonic()))
        ahead = self.estimated_wait_s()
        if self._queued_images + n > self.max_queue:
            metrics.REJECTIONS.labels("queue_full").inc()
            raise QueueFull(max(1.0, ahead))
        may_degrade = self.degrade_under_load and depth is None
        decision = decide(
            self.costs,
            images=n,
            key=self.costs.key(depth, max_depth),
            ahead_s=ahead,
            batch_images=self.max_batch_size,
            time_left_s=started + self.deadline_s - time.perf_counter(),
            deadline_s=self.deadline_s,
            degrade_key=self.degrade_depth if may_degrade else None,
        )
        if decision.impossible:
            metrics.REJECTIONS.labels("deadline").inc()
            raise DeadlineExceeded("the request could not finish before its deadline even on an idle worker")
        if decision.retry_after_s > 0:
            metrics.REJECTIONS.labels("queue_full").inc()
            raise QueueFull(
                decision.retry_after_s,
                f"the work queued ahead (about {1000 * ahead:.0f} ms) would not let this request finish before its deadline",
            )
        return decision

    def check(self, n: int, *, depth: int | None, max_depth: int | None, started: float) -> None:
        """Refuse now what `submit` would refuse, raising as it does (before the images are decoded)."""
        with self._cond:
            self._admit(n, depth, max_depth, started)

    async def submit(
        self, images: torch.Tensor, *, depth: int | None, max_depth: int | None, started: float
    ) -> tuple[list[ImageResult], BatchTimings]:
        """Queue one request's images and wait for their results (in request order).

        `started` (time.perf_counter()) is when the service began handling the request: its deadline is
        `deadline_s` after that.
        """
        loop = asyncio.get_running_loop()
        n = len(images)
        with self._cond:
            decision = self._admit(n, depth, max_depth, started)
            item = _Item(
                images,
                depth,
                max_depth,
                started + self.deadline_s,
                loop,
                loop.create_future(),
                decision.key,
                decision.estimate_s,
                degraded=decision.degraded,
            )
            self._queue.append(item)
            self._queued_images += n
            self._queued_by_key[item.key] += n
            metrics.QUEUE_LENGTH.set(self._queued_images)
            self._cond.notify()
        result = await item.future
        self.costs.observe_way_back(time.perf_counter() - item.answered)
        return result

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
            for item in batch:
                self._queued_by_key[item.key] -= len(item.images)
            self._busy_s = sum(len(item.images) * self.costs.cost(item.key) for item in batch)
            self._busy_since = time.perf_counter()
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
                    self._busy_s = 0.0
                batch = []
        except BaseException:  # the thread ends here; the supervisor starts another
            _fail(batch, "the inference worker died with a batch of %d requests (error id %s)")

    def _process(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        live = self._drop_late(batch, start)
        if not live:
            return
        images, intensities = _inputs(live, self.preprocessing)
        h = self.backend.complexity(intensities)
        depths, reasons = self._depths(live, h)
        if not self.backend.kernel_cache:
            metrics.KERNEL_GENERATION.observe(self.backend.generate_kernels())
        probs, seconds = self.backend.predict(images, torch.tensor(depths))
        inference_s = time.perf_counter() - start
        hs = h.tolist()
        self._record(len(images), depths, reasons, hs, seconds)
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
            settled.append((item, (results, BatchTimings(start - item.enqueued, inference_s, item.estimate_s)), None))
        _settle(settled)
        if 2 * len(images) >= self.max_batch_size:  # small batches cost more an image: they would misprice a queue
            self.costs.observe(depths, [r == AUTO for r in reasons], time.perf_counter() - start)

    def _drop_late(self, batch: list[_Item], start: float) -> list[_Item]:
        """What cannot be answered by its deadline is not run (504): the whole batch finishes together."""
        finish = start + sum(len(item.images) * self.costs.cost(item.key) for item in batch) + self.costs.way_back
        live, late = [], []
        for item in batch:
            (late if finish > item.deadline else live).append(item)
        if late:
            metrics.REJECTIONS.labels("deadline").inc(len(late))
            _settle([(item, None, DeadlineExceeded()) for item in late])
        return live

    def _depths(self, live: list[_Item], h: torch.Tensor) -> tuple[list[int], list[str]]:
        """Each image's depth and its reason (the precedence is DepthPolicy.choose's)."""
        auto = self.policy.auto(h).tolist()
        depths, reasons, k = [], [], 0
        for item in live:
            degrade_to = self.degrade_depth if item.degraded else None
            for _ in range(len(item.images)):
                d, reason = self.policy.choose(
                    auto[k], depth=item.depth, max_depth=item.max_depth, degrade_to=degrade_to
                )
                depths.append(d)
                reasons.append(reason)
                k += 1
        return depths, reasons

    def _record(
        self, n: int, depths: list[int], reasons: list[str], complexities: list[float], seconds: dict[int, float]
    ) -> None:
        """A batch's metrics: its size, model time by depth, and each image's depth, reason and complexity."""
        metrics.BATCH_SIZE.observe(n)
        if (mem := self.backend.device_memory_bytes()) is not None:
            metrics.DEVICE_MEMORY.labels(str(self.backend.device)).set(mem)
        for d, s in seconds.items():
            metrics.INFERENCE.labels(str(d)).observe(s)
        for (d, reason), count in Counter(zip(depths, reasons, strict=True)).items():
            metrics.DEPTH_CHOSEN.labels(str(d), reason).inc(count)
        for d, c in zip(depths, complexities, strict=True):
            metrics.IMAGE_DEPTH.observe(d)
            metrics.COMPLEXITY.observe(c)


def _inputs(live: list[_Item], pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for the model, and the same images for the complexity score. Uploads (uint8 levels) serve as both;
    the backend normalises them on its device. With OIP FP32 tensors in the batch (already normalised, and given to
    the model as they are) the batch is normalised here, and complexity reads intensities recovered from it."""
    if all(item.images.dtype == torch.uint8 for item in live):
        images = torch.cat([item.images for item in live])
        return images, images
    x = torch.cat([pre.normalise(item.images) if item.images.dtype == torch.uint8 else item.images for item in live])
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return x, (x * std + mean).clamp(0, 1)


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

    now = time.perf_counter()
    for entry in settled:
        entry[0].answered = now
    for loop, entries in by_loop.items():
        loop.call_soon_threadsafe(settle, entries)
