"""The inference worker, put together: the queue with admission (service/work_queue.py), the worker thread and its
supervisor (service/worker.py), a batch through the model (service/batch_answers.py) and its metrics
(service/batch_metrics.py).

When the worker is free, whatever is waiting goes at once; while it is busy, arrivals accumulate and go together.
Requests with no image to run again are answered as soon as the batch's first pass ends, before its second pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model import DepthPolicy, Preprocessing
from model.routers import EntropyRouter, Router
from service import metrics
from service.admission import CostModel
from service.backends import Backend
from service.batch_answers import BatchRun, ImageResult, Request, Rules, first_pass
from service.batch_metrics import record_batch
from service.work_queue import Queued, QueueLimits, WorkQueue, settle
from service.worker import Worker


@dataclass
class BatchTimings:
    queue_s: float
    inference_s: float  # the first pass: complexity, routing and the model
    estimate_s: float  # what admission expected queue and inference to take
    escalation_s: float = 0.0  # the batch's second pass, which the answer waited for (0: no image escalated)


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
        on_worker_change=None,
    ):
        self.backend = backend
        self.rules = Rules(policy, router or EntropyRouter(policy), preprocessing, degrade_depth)
        self.costs = CostModel(policy.max_depth)
        limits = QueueLimits(
            max_batch_size,
            max_queue,
            deadline_s,
            max_queue_delay_s,
            degrade_under_load,
            min(degrade_depth, policy.max_depth),
        )
        self.queue = WorkQueue(limits, self.costs, lambda: self.worker.down_for())
        self._last_end, self._back_to_back = 0.0, False  # when the last batch ended; whether work was waiting then
        self.worker = Worker(self.queue, self.process, restart_backoff_s=restart_backoff_s, on_change=on_worker_change)

    def calibrate(self, repeats: int = 3) -> None:
        """Measure a full batch at every depth (complexity and model, median of `repeats`): admission's first
        per-image costs, before any request has been served. Call after the backend's warm-up."""
        pre, n = self.rules.preprocessing, self.queue.limits.max_batch_size
        images = torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8)
        for d in range(1, self.rules.policy.max_depth + 1):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.backend.complexity(images)
                self.backend.predict(images, torch.full((n,), d))
                times.append(time.perf_counter() - t0)
            self.costs.seed(d, sorted(times)[repeats // 2] / n)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        self.queue.stop()
        self.worker.join(timeout)

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def check(self, n: int, *, depth: int | None, max_depth: int | None, started: float) -> None:
        """Refuse now what `submit` would refuse, raising as it does (before the images are decoded)."""
        self.queue.check(n, depth=depth, max_depth=max_depth, started=started)

    def check_while_busy(self, *, started: float) -> None:
        """Under load, refuse what could not be admitted even as one image at depth 1 (before the body is read)."""
        self.queue.check_while_busy(started)

    async def submit(
        self, images: torch.Tensor, *, depth: int | None, max_depth: int | None, started: float
    ) -> tuple[list[ImageResult], BatchTimings]:
        """Queue one request's images and wait for their results (in request order). `started`
        (time.perf_counter()) is the origin of its deadline."""
        item = self.queue.put(images, depth=depth, max_depth=max_depth, started=started)
        result = await item.future
        self.costs.observe_way_back(time.perf_counter() - item.answered)
        return result

    # -- on the worker thread -------------------------------------------------------------------------
    def process(self, batch: list[Queued]) -> None:
        """One batch: the late refused, the first pass, its answers, the second pass, its answers, the metrics."""
        start = time.perf_counter()
        # back to back with the last batch, the time between the two (the lock, the interpreter lock) is work too
        since = self._last_end if self._back_to_back else start
        try:
            self._process(batch, start, since)
        finally:
            self._last_end, self._back_to_back = time.perf_counter(), self.queue.waiting

    def _process(self, batch: list[Queued], start: float, since: float) -> None:
        live = self.queue.drop_late(batch, start)
        if not live:
            return
        if not self.backend.kernel_cache:
            metrics.KERNEL_GENERATION.observe(self.backend.generate_kernels())
        requests = [Request(item.images, item.depth, item.max_depth, item.degraded) for item in live]
        run = first_pass(requests, self.backend, self.rules)
        inference_s = time.perf_counter() - start
        waits = run.waits_for_second_pass()
        # requests with no image to run again are answered now: they do not wait for the batch's second pass
        self._answer(live, run.answers([not w for w in waits]), start, inference_s, 0.0)
        run.second_pass()
        self._answer(live, run.answers(waits), start, inference_s, run.second_s)
        record_batch(run)
        self._learn_costs(run, time.perf_counter() - since)

    def _answer(
        self,
        live: list[Queued],
        answers: dict[int, list[ImageResult]],
        start: float,
        inference_s: float,
        escalation_s: float,
    ) -> None:
        """Settle these requests of the batch (by index in `live`) with their results and timings."""
        settled, now = [], time.perf_counter()
        for k, results in answers.items():
            item = live[k]
            metrics.QUEUE_WAIT.observe(start - item.enqueued)
            self.costs.observe_overrun(item.estimate_s, now - item.enqueued)
            timings = BatchTimings(start - item.enqueued, inference_s, item.estimate_s, escalation_s)
            settled.append((item, (results, timings), None))
        if settled:
            settle(settled)

    def _learn_costs(self, run: BatchRun, seconds: float) -> None:
        """Admission's per-image costs, from batches at least half full (small batches cost more an image: they
        would misprice a queue)."""
        if 2 * len(run.images) >= self.queue.limits.max_batch_size:
            routed = [r == self.rules.router.name for r in run.routing.first_reasons]
            self.costs.observe(run.routing.first, routed, seconds, second=run.routing.second)
