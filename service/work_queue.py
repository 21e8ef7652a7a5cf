"""The inference worker's queue, with admission: what may wait, in what order, and what a batch takes from it.

Admission is by time (service/admission.py): a request is queued only when the work ahead of it plus its own, at
the per-image costs the worker measures, fits its deadline; otherwise `QueueFull` (429) with a retry time, or
`DeadlineExceeded` (504) when it could not finish in time even alone. The queue is also bounded in images
(memory). Under load an auto-depth request is admitted at the degrade depth.

A batch takes whatever is waiting when the worker is free, up to `max_batch_size` images; `max_queue_delay_s`
(default 0) only bounds how long a partial batch may wait for company. Requests that can no longer be answered
by their deadline when their batch forms are refused there (504), not run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service import metrics
from service.admission import CostModel, Decision, decide


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


@dataclass(eq=False)  # each entry is itself: compared by identity
class Queued:
    """One request in the queue: its images, its depth limits, and the future its event loop awaits."""

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


@dataclass(frozen=True)
class QueueLimits:
    max_batch_size: int
    max_queue: int  # images waiting
    deadline_s: float
    max_queue_delay_s: float = 0.0
    degrade_under_load: bool = True
    degrade_depth: int = 1


class WorkQueue:
    """Requests waiting for the worker, priced by `costs`. `worker_down_for()` is None while the worker runs, else
    the seconds until its restart; a request is refused then, as it is once the queue is stopping."""

    def __init__(self, limits: QueueLimits, costs: CostModel, worker_down_for: Callable[[], float | None]):
        self.limits, self.costs = limits, costs
        self._worker_down_for = worker_down_for
        self._queue: deque[Queued] = deque()
        self._images = 0
        self._by_key = [0] * (costs.max_depth + 1)  # images waiting, by cost key
        self._busy_s, self._busy_since = 0.0, 0.0  # estimated worker time of the running batch, its start
        self._cond = threading.Condition()
        self.stopping = False

    def stop(self) -> None:
        """Refuse what comes; the worker finishes what is queued, then `take_batch` returns nothing."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()

    def wait_stopping(self, timeout: float) -> bool:
        """Whether the queue stops within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self.stopping, timeout=timeout)

    def estimated_wait_s(self) -> float:
        """Worker time of everything queued, plus what is left of the running batch (call under the lock)."""
        queued = sum(n * self.costs.cost(k) for k, n in enumerate(self._by_key) if n)
        running = max(0.0, self._busy_s - (time.perf_counter() - self._busy_since))
        return queued + running

    # -- the event loop's side ----------------------------------------------------------------------
    def _admit(self, n: int, depth: int | None, max_depth: int | None, started: float) -> Decision:
        """Admission of `n` images (call under the lock): the decision, or the refusal raised and counted."""
        if self.stopping:
            raise Draining()
        if (down_for := self._worker_down_for()) is not None:
            raise WorkerDown(max(0.5, down_for))
        lim, ahead = self.limits, self.estimated_wait_s()
        if self._images + n > lim.max_queue:
            metrics.REJECTIONS.labels("queue_full").inc()
            raise QueueFull(max(1.0, ahead))
        decision = decide(
            self.costs,
            images=n,
            key=self.costs.key(depth, max_depth),
            ahead_s=ahead,
            batch_images=lim.max_batch_size,
            time_left_s=started + lim.deadline_s - time.perf_counter(),
            deadline_s=lim.deadline_s,
            degrade_key=lim.degrade_depth if lim.degrade_under_load and depth is None else None,
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
        """Refuse now what `put` would refuse, raising as it does (before the images are decoded)."""
        with self._cond:
            self._admit(n, depth, max_depth, started)

    def check_while_busy(self, started: float) -> None:
        """While work waits or runs, refuse what `check` would refuse of a single image at depth 1. On an idle worker
        nothing is refused here: the full check, once the request's images are known, can tell a request that
        could never fit (504) from one that must wait its turn (429)."""
        with self._cond:
            if self._queue or self._busy_s > 0:
                self._admit(1, 1, None, started)

    def put(self, images: torch.Tensor, *, depth: int | None, max_depth: int | None, started: float) -> Queued:
        """Admit and queue one request's images (from its event loop); its deadline is `deadline_s` after `started`."""
        loop = asyncio.get_running_loop()
        with self._cond:
            decision = self._admit(len(images), depth, max_depth, started)
            item = Queued(
                images,
                depth,
                max_depth,
                started + self.limits.deadline_s,
                loop,
                loop.create_future(),
                decision.key,
                decision.estimate_s,
                degraded=decision.degraded,
            )
            self._queue.append(item)
            self._images += len(images)
            self._by_key[item.key] += len(images)
            metrics.QUEUE_LENGTH.set(self._images)
            self._cond.notify()
        return item

    # -- the worker's side ----------------------------------------------------------------------------
    def take_batch(self) -> list[Queued]:
        """The next batch (blocking until there is one): empty once the queue is stopping and empty."""
        lim = self.limits
        with self._cond:
            while not self._queue and not self.stopping:
                self._cond.wait()
            if not self._queue:
                return []
            batch, images = [], 0
            deadline = time.perf_counter() + lim.max_queue_delay_s
            while True:
                while self._queue and images + len(self._queue[0].images) <= lim.max_batch_size:
                    batch.append(self._queue.popleft())
                    images += len(batch[-1].images)
                if not batch:  # one request larger than a batch goes alone
                    batch.append(self._queue.popleft())
                    images += len(batch[-1].images)
                remaining = deadline - time.perf_counter()
                if images >= lim.max_batch_size or remaining <= 0 or (self._queue and images > 0) or self.stopping:
                    break
                self._cond.wait(remaining)
            self._images -= images
            for item in batch:
                self._by_key[item.key] -= len(item.images)
            self._busy_s = sum(len(item.images) * self.costs.cost(item.key) for item in batch)
            self._busy_since = time.perf_counter()
            metrics.QUEUE_LENGTH.set(self._images)
            return batch

    @property
    def waiting(self) -> bool:
        """Whether any request waits (read without the lock: a hint, not a count)."""
        return bool(self._queue)

    def batch_done(self) -> None:
        self._busy_s = 0.0

    def drop_late(self, batch: list[Queued], start: float) -> list[Queued]:
        """What cannot be answered by its deadline is not run (504): the whole batch finishes together."""
        work = sum(len(item.images) * self.costs.cost(item.key) for item in batch) * self.costs.overrun
        finish = start + work + self.costs.way_back
        live, late = [], []
        for item in batch:
            (late if finish > item.deadline else live).append(item)
        if late:
            metrics.REJECTIONS.labels("deadline").inc(len(late))
            settle([(item, None, DeadlineExceeded()) for item in late])
        return live


def settle(settled: list[tuple[Queued, object, Exception | None]]) -> None:
    """Hand results to their event loops: one wake-up per loop for the whole batch, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for entry in settled:
        by_loop.setdefault(entry[0].loop, []).append(entry)

    def settle_here(entries):
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
        loop.call_soon_threadsafe(settle_here, entries)
