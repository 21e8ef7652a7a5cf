"""The inference worker: one thread owns the backend; requests queue, batches form without idle waits.

When the worker is free, whatever is waiting goes at once; while it is busy, arrivals accumulate and go
together, up to `max_batch_size` images. `max_queue_delay` (default 0) only bounds how long a partial
batch may wait for company. Admission is by time (service/admission.py): a request is queued only when the work ahead of
it plus its own, at the per-image costs the worker measures, fits its deadline; otherwise `QueueFull`
(429) with a retry time, or `DeadlineExceeded` (504) when it could not finish in time even alone. The queue
is also bounded in images (memory). Under load an auto-depth request runs at the degrade depth (reason
`degraded`). An item that can no longer finish by its deadline when its batch forms is not run (504).

Depths come from the checkpoint's router (model/routers.py): `router.first` gives every image's depth before any
pass, and `DepthPolicy.choose` applies the request's depth, the degrade depth and the caller's cap, as ever. An
image whose depth the router chose (its reason is the router's name) is then offered to `router.escalate` with its
first pass's probabilities; a second depth, capped by the same rule, that is deeper than the first runs in a second
model call for all such images of the batch, and its probabilities are the answer (only the cascade escalates).
Requests with no image to run again are answered before that second call.

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
from model.routers import EntropyRouter, Router
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
    depth: int  # the depth of the answer: the second pass's when the image escalated
    reason: str  # why `depth`: the router's name, requested, capped or degraded
    complexity: float
    first_depth: int  # the first pass's depth (== depth unless escalated)
    escalated: bool = False

    @property
    def depths_run(self) -> list[int]:
        return [self.first_depth, self.depth] if self.escalated else [self.depth]


@dataclass
class BatchTimings:
    queue_s: float
    inference_s: float  # the first pass: complexity, routing and the model
    estimate_s: float  # what admission expected queue and inference to take
    escalation_s: float = 0.0  # the batch's second pass, which the answer waited for (0: no image escalated)


@dataclass
class _Routing:
    """A batch's depths, image by image: the first pass's depth and reason, the second pass's (0: none)."""

    first: list[int]
    first_reasons: list[str]
    second: list[int]
    second_reasons: list[str]

    @property
    def escalated(self) -> list[int]:
        return [i for i, d in enumerate(self.second) if d]

    def final(self, i: int) -> tuple[int, str]:
        return (self.second[i], self.second_reasons[i]) if self.second[i] else (self.first[i], self.first_reasons[i])


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
        router: Router | None = None,
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
        self.router = router or EntropyRouter(policy)  # the depth table alone, as before routers
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
            spent = time.perf_counter() - started  # since its last bytes arrived, the wait unread included
            raise QueueFull(
                decision.retry_after_s,
                f"the work queued ahead (about {1000 * ahead:.0f} ms) and the time it has already waited here "
                f"({1000 * spent:.0f} ms) would not let this request finish before its deadline",
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
        routing = self._depths(live, intensities, h)
        if not self.backend.kernel_cache:
            metrics.KERNEL_GENERATION.observe(self.backend.generate_kernels())
        probs, seconds = self.backend.predict(images, torch.tensor(routing.first))
        inference_s = time.perf_counter() - start
        self._escalate(live, probs, routing)
        hs = h.tolist()
        waits = _items_escalated(live, routing)
        # requests with no image to run again are answered now: they do not wait for the batch's second pass
        self._answer(live, [not w for w in waits], routing, probs, hs, (start, inference_s, 0.0))
        probs, escalation_s = self._second_pass(images, probs, routing)
        self._answer(live, waits, routing, probs, hs, (start, inference_s, escalation_s))
        self._record(len(images), routing, hs, seconds)
        if 2 * len(images) >= self.max_batch_size:  # small batches cost more an image: they would misprice a queue
            routed = [r == self.router.name for r in routing.first_reasons]
            self.costs.observe(routing.first, routed, time.perf_counter() - start, second=routing.second)

    def _answer(
        self,
        live: list[_Item],
        chosen: list[bool],
        routing: _Routing,
        probs: torch.Tensor,
        hs: list[float],
        times: tuple[float, float, float],
    ) -> None:
        """Settle the chosen requests of the batch with their ranked answers; `times` is (the batch's start, its first
        pass's seconds, its second pass's seconds)."""
        start, inference_s, escalation_s = times
        offsets = [0]
        for item in live:
            offsets.append(offsets[-1] + len(item.images))
        rows = [r for item_no, c in enumerate(chosen) if c for r in range(offsets[item_no], offsets[item_no + 1])]
        if not rows:
            return
        values, classes = probs[rows].sort(dim=1, descending=True)  # once for these requests, not per request
        ranked = dict(
            zip(
                rows,
                (list(zip(c, v, strict=True)) for c, v in zip(classes.tolist(), values.tolist(), strict=True)),
                strict=True,
            )
        )
        settled = []
        for item_no, item in enumerate(live):
            if not chosen[item_no]:
                continue
            span = range(offsets[item_no], offsets[item_no + 1])
            results = [self._result(routing, i, probs[i], ranked[i], hs[i]) for i in span]
            metrics.QUEUE_WAIT.observe(start - item.enqueued)
            timings = BatchTimings(start - item.enqueued, inference_s, item.estimate_s, escalation_s)
            settled.append((item, (results, timings), None))
        _settle(settled)

    @staticmethod
    def _result(routing: _Routing, i: int, probs: torch.Tensor, ranked: list, h: float) -> ImageResult:
        depth, reason = routing.final(i)
        return ImageResult(probs, ranked, depth, reason, h, routing.first[i], escalated=bool(routing.second[i]))

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

    def _limits(self, live: list[_Item]) -> list[tuple[int | None, int | None, int | None]]:
        """Per image: its requested depth, its caller's cap and, when its request was degraded, the degrade depth."""
        return [
            (item.depth, item.max_depth, self.degrade_depth if item.degraded else None)
            for item in live
            for _ in range(len(item.images))
        ]

    def _reason(self, reason: str) -> str:
        """DepthPolicy.choose's reason, with the automatic one named by the router that decided."""
        return self.router.name if reason == AUTO else reason

    def _depths(self, live: list[_Item], intensities: torch.Tensor, h: torch.Tensor) -> _Routing:
        """Each image's first depth and its reason: the router's depth, then DepthPolicy.choose's precedence."""
        auto = self.router.first(intensities, h).tolist()
        depths, reasons = [], []
        for a, (depth, max_depth, degrade_to) in zip(auto, self._limits(live), strict=True):
            d, reason = self.policy.choose(int(a), depth=depth, max_depth=max_depth, degrade_to=degrade_to)
            depths.append(d)
            reasons.append(self._reason(reason))
        return _Routing(depths, reasons, [0] * len(depths), list(reasons))

    def _escalate(self, live: list[_Item], probs: torch.Tensor, routing: _Routing) -> None:
        """The second depth of each image the router routed (0: none): what the router asks, capped by the same
        precedence as the first (the caller's max_depth, the degrade depth), run only when deeper than the first."""
        routed = [i for i, r in enumerate(routing.first_reasons) if r == self.router.name]
        if not routed:
            return
        index = torch.tensor(routed)
        wanted = self.router.escalate(probs[index], torch.tensor([routing.first[i] for i in routed])).tolist()
        limits = self._limits(live)
        for i, w in zip(routed, wanted, strict=True):
            if w <= 0:
                continue
            _, max_depth, degrade_to = limits[i]
            d, reason = self.policy.choose(int(w), max_depth=max_depth, degrade_to=degrade_to)
            if d > routing.first[i]:
                routing.second[i], routing.second_reasons[i] = d, self._reason(reason)

    def _second_pass(self, images: torch.Tensor, probs: torch.Tensor, routing: _Routing) -> tuple[torch.Tensor, float]:
        """One model call for every escalated image of the batch: the probabilities with theirs replaced, and the
        seconds it took (0 when none escalated)."""
        escalated = routing.escalated
        if not escalated:
            return probs, 0.0
        t0 = time.perf_counter()
        index = torch.tensor(escalated)
        second, seconds = self.backend.predict(images[index], torch.tensor([routing.second[i] for i in escalated]))
        for d, s in seconds.items():
            metrics.INFERENCE.labels(str(d)).observe(s)
        return probs.index_copy(0, index, second), time.perf_counter() - t0

    def _record(self, n: int, routing: _Routing, complexities: list[float], seconds: dict[int, float]) -> None:
        """A batch's metrics: its size, the first pass's model time by depth, each pass's depth and reason, each
        escalation, and each image's depth run (both passes) and complexity."""
        metrics.BATCH_SIZE.observe(n)
        if (mem := self.backend.device_memory_bytes()) is not None:
            metrics.DEVICE_MEMORY.labels(str(self.backend.device)).set(mem)
        for d, s in seconds.items():
            metrics.INFERENCE.labels(str(d)).observe(s)
        for (d, reason), count in Counter(zip(routing.first, routing.first_reasons, strict=True)).items():
            metrics.DEPTH_CHOSEN.labels(str(d), reason, "first").inc(count)
        escalated = routing.escalated
        for (d, reason), count in Counter((routing.second[i], routing.second_reasons[i]) for i in escalated).items():
            metrics.DEPTH_CHOSEN.labels(str(d), reason, "second").inc(count)
        for (a, b), count in Counter((routing.first[i], routing.second[i]) for i in escalated).items():
            metrics.ESCALATIONS.labels(str(a), str(b)).inc(count)
        for d, e, c in zip(routing.first, routing.second, complexities, strict=True):
            metrics.IMAGE_DEPTH.observe(d + e)
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


def _items_escalated(live: list[_Item], routing: _Routing) -> list[bool]:
    """Per request of the batch: whether any of its images runs a second pass."""
    out, k = [], 0
    for item in live:
        out.append(any(routing.second[k : k + len(item.images)]))
        k += len(item.images)
    return out


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
