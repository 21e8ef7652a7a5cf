"""The inference worker thread and its supervisor: one thread takes batches from the queue and processes them.

An exception in one batch fails only that batch's requests (`InferenceFailed`, with an error id that is logged).
A worker thread that dies anyway is restarted by the supervisor thread after a back-off (doubling while it keeps
dying, up to 30 s); meanwhile `down_for()` says when, readiness is false and new requests get `WorkerDown`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable

from service import metrics
from service.work_queue import Queued, WorkQueue, settle

log = logging.getLogger("puppet.worker")


class InferenceFailed(Exception):
    def __init__(self, error_id: str):
        super().__init__(f"inference failed (error id {error_id})")
        self.error_id = error_id


class Worker:
    def __init__(
        self,
        queue: WorkQueue,
        process: Callable[[list[Queued]], None],
        *,
        restart_backoff_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.queue, self.process = queue, process
        self.restart_backoff_s = restart_backoff_s
        self._on_change = on_change or (lambda up: None)
        self._thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._restart_at = 0.0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def down_for(self) -> float | None:
        """None while the worker runs; else the seconds until its restart (0 when overdue)."""
        return None if self.alive else max(0.0, self._restart_at - time.monotonic())

    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="puppet-worker-supervisor", daemon=True)
        self._supervisor.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name="puppet-inference-worker", daemon=True)
        self._thread.start()
        self._on_change(True)

    def _supervise(self) -> None:
        """Restart the worker whenever it dies (not when it stops): back off while it keeps dying."""
        backoff, last_restart = self.restart_backoff_s, -math.inf
        while True:
            self._thread.join()
            if self.queue.stopping:
                return
            now = time.monotonic()
            backoff = min(30.0, backoff * 2) if now - last_restart < 60 else self.restart_backoff_s
            self._restart_at = now + backoff
            self._on_change(False)
            log.error("the inference worker died; restarting it in %.1f s", backoff)
            if self.queue.wait_stopping(backoff):
                return
            metrics.WORKER_RESTARTS.inc()
            last_restart = time.monotonic()
            self._spawn()
            log.warning("the inference worker was restarted")

    def _run(self) -> None:
        batch: list[Queued] = []
        try:
            while True:
                batch = self.queue.take_batch()
                if not batch:
                    return
                try:
                    self.process(batch)
                except Exception:
                    fail(batch, "inference failed for a batch of %d requests (error id %s)")
                finally:
                    self.queue.batch_done()
                batch = []
        except BaseException:  # the thread ends here; the supervisor starts another
            fail(batch, "the inference worker died with a batch of %d requests (error id %s)")


def fail(batch: list[Queued], message: str) -> None:
    """Fail every request of the batch with one error id, logged with the traceback."""
    error_id = uuid.uuid4().hex[:12]
    log.exception(message, len(batch), error_id, extra={"fields": {"error_id": error_id}})
    settle([(item, None, InferenceFailed(error_id)) for item in batch])
