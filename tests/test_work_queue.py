"""The worker's queue (service/work_queue.py), called directly: no thread, no server.

Batches form in arrival order up to the batch size; admission refuses by the image bound, by time, while the
worker is down and while stopping, each with its own error and its own count; requests that cannot be answered
by their deadline are refused when their batch forms; the queue's price of the work ahead is what its requests
cost.
"""

import asyncio
import time

import pytest
import torch
from prometheus_client import REGISTRY

from service.admission import AUTO_KEY, CostModel
from service.work_queue import DeadlineExceeded, Draining, QueueFull, QueueLimits, WorkerDown, WorkQueue

COST_S = 0.001  # seconds per image at every depth (the cost model's seed)


def _queue(*, max_batch_size=8, max_queue=32, deadline_s=10.0, down_for=None, degrade=True) -> WorkQueue:
    costs = CostModel(3)
    for d in (1, 2, 3):
        costs.seed(d, COST_S * d)
    limits = QueueLimits(max_batch_size, max_queue, deadline_s, 0.0, degrade, 1)
    return WorkQueue(limits, costs, lambda: down_for)


def _images(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, 28, 28, dtype=torch.uint8)


def _rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("puppet_rejections_total", {"reason": reason}) or 0.0


def _put_all(q: WorkQueue, sizes: list[int], *, depth=None, waited_s=0.0):
    """Queue requests of these sizes from one event loop, each `waited_s` into its deadline; the queued requests,
    or the first refusal raised."""

    async def go():
        started = time.perf_counter() - waited_s
        return [q.put(_images(n), depth=depth, max_depth=None, started=started) for n in sizes]

    return asyncio.run(go())


def test_batches_form_in_arrival_order_up_to_the_batch_size():
    q = _queue(max_batch_size=8)
    items = _put_all(q, [3, 4, 2, 8, 12, 1])
    batches = []
    while q._queue:
        batches.append([items.index(i) for i in q.take_batch()])
        q.batch_done()
    # 3+4 fit, 2 would overflow; 2 then 8 would overflow; 8 alone; 12 is larger than a batch and goes alone
    assert batches == [[0, 1], [2], [3], [4], [5]]
    assert q._images == 0 and q._by_key == [0, 0, 0, 0]


def test_the_work_ahead_is_what_the_queued_images_cost():
    q = _queue()
    _put_all(q, [2], depth=3)
    _put_all(q, [5], depth=1)
    assert q.estimated_wait_s() == pytest.approx(2 * 3 * COST_S + 5 * COST_S)
    q.take_batch()  # the running batch counts until it is done
    assert 0 < q.estimated_wait_s() <= 11 * COST_S
    q.batch_done()
    assert q.estimated_wait_s() == 0


def test_the_image_bound_refuses_with_queue_full_and_counts_it():
    q = _queue(max_queue=10)
    _put_all(q, [6])
    before = _rejections("queue_full")
    with pytest.raises(QueueFull, match="the queue is full; retry in"):
        _put_all(q, [5])
    assert _rejections("queue_full") == before + 1
    _put_all(q, [4])  # exactly to the bound
    assert q._images == 10


def test_work_that_cannot_fit_its_deadline_is_refused_with_the_time_it_would_fit():
    q = _queue(max_queue=10_000, deadline_s=10.0)
    _put_all(q, [500], depth=3)  # 1.5 s of work ahead
    before = _rejections("queue_full")
    with pytest.raises(
        QueueFull, match=r"queued ahead \(about 1500 ms\) and the time it has already waited here \(9\d\d\d ms\)"
    ) as refused:
        _put_all(q, [1], depth=1, waited_s=9.0)  # 1 s left, less than the margin kept for stalls
    assert refused.value.retry_after_s > 1.5
    assert _rejections("queue_full") == before + 1


def test_a_request_too_big_for_its_deadline_even_alone_is_a_deadline_refusal():
    q = _queue(max_queue=10_000, deadline_s=1.0)
    before = _rejections("deadline")
    with pytest.raises(DeadlineExceeded, match="even on an idle worker"):
        _put_all(q, [1000], depth=3)
    assert _rejections("deadline") == before + 1 and q._images == 0


def test_under_load_an_auto_request_is_admitted_at_the_degrade_depth():
    q = _queue(max_queue=10_000, deadline_s=1.0)
    _put_all(q, [100], depth=3)  # 0.3 s ahead: more than half of the 0.6 s planned for
    [item] = _put_all(q, [1])
    assert item.degraded and item.key == 1
    [fixed] = _put_all(q, [1], depth=2)  # a requested depth is never degraded
    assert not fixed.degraded and fixed.key == 2


def test_a_worker_that_is_down_refuses_with_the_time_until_its_restart():
    with pytest.raises(WorkerDown, match="retry in 2.5 s"):
        _put_all(_queue(down_for=2.5), [1])
    with pytest.raises(WorkerDown, match="retry in 0.5 s"):  # an overdue restart still asks for a moment
        _put_all(_queue(down_for=0.0), [1])


def test_a_stopping_queue_refuses_new_work_and_hands_out_what_waits():
    q = _queue(max_batch_size=4)
    items = _put_all(q, [3, 3])
    q.stop()
    with pytest.raises(Draining):
        _put_all(q, [1])
    assert q.take_batch() == [items[0]] and q.take_batch() == [items[1]]
    assert q.take_batch() == []  # empty and stopping: the worker ends
    assert q.wait_stopping(0)


def test_requests_past_their_deadline_when_the_batch_forms_are_refused_not_run():
    q = _queue()

    async def go():
        now = time.perf_counter()
        early = q.put(_images(2), depth=1, max_depth=None, started=now - 4)  # due at now + 6
        fresh = q.put(_images(2), depth=1, max_depth=None, started=now)  # due at now + 10
        before = _rejections("deadline")
        live = q.drop_late(q.take_batch(), now + 6 - 0.002)  # the batch's 4 ms of work would end past `early`'s
        with pytest.raises(DeadlineExceeded):
            await early.future
        assert live == [fresh] and not fresh.future.done()
        assert _rejections("deadline") == before + 1

    asyncio.run(go())


def test_a_capped_auto_request_is_priced_at_the_cheaper_of_its_cap_and_auto():
    q = _queue()
    assert q.costs.key(None, 1) == 1 and q.costs.key(None, 3) == AUTO_KEY and q.costs.key(2, None) == 2


def test_the_early_check_refuses_only_while_the_worker_has_work():
    q = _queue(max_queue=10_000, deadline_s=2.0)
    q.check_while_busy(time.perf_counter() - 1.9)  # idle: left to the full check, whatever the time spent
    _put_all(q, [200], depth=3)  # 0.6 s of work waiting
    with pytest.raises(QueueFull):  # with 1.5 s left, half of it kept: not even one image at depth 1 fits behind it
        q.check_while_busy(time.perf_counter() - 0.5)
    q.take_batch()  # now running
    with pytest.raises(QueueFull):
        q.check_while_busy(time.perf_counter() - 0.5)
    q.batch_done()
    q.check_while_busy(time.perf_counter() - 1.9)
