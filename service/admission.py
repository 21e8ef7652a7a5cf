"""Admission by time: a request is taken only when its estimated completion fits its deadline.

A bound on queued images alone admits more work than the deadline allows on a slower CPU (or a busier one):
an accepted request was answered past its deadline (docs/reliability.md). So the worker measures what an image
costs at each depth, and a request is accepted only if the images ahead of it, plus its own, can be done before
its deadline, with time left for the answer's way back through the event loop (measured) and for the
estimate's errors (a share of the deadline); otherwise it gets 429 with a Retry-After of when they would fit.

Costs are seconds of worker time per image, an exponential moving average per depth. An image whose depth
the policy will choose (auto) is not routed until its batch runs, so it is priced at the moving average of
what the auto-routed images of recent batches cost. One model call runs images of several depths together
(per-sample exit), so a batch's measured time is shared among its depths in proportion to their estimates:
the warm-up's per-depth figures fix the ratios, the batches keep the level true under contention. Only
batches at least half full teach it: an image costs several times more in a batch of one or two, and a
queue deep enough to matter runs in full batches (priced from small batches after a quiet spell, the queue
looked longer than it was, and a burst that fitted was refused: docs/reliability.md).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

AUTO_KEY = 0  # cost key of an image whose depth the policy picks; keys 1..D_max are fixed depths
EMA_WEIGHT = 0.2  # weight of the newest batch
MARGIN = 0.5  # of the deadline, not planned for: stalls the overrun has not yet seen (docs/reliability.md)
WAY_BACK_HALF_LIFE_S = 2.0
OVERRUN_HALF_LIFE_S = 2.0
OVERRUN_MIN_S = 0.05  # an estimate shorter than this (a lone request on an idle worker) says nothing of the queue's
DEGRADE_AT = 0.5  # degrade an auto request once the work ahead of it fills this share of its time left


@dataclass
class Decision:
    """What admission decided: run at `key`'s cost (degraded or not), or refuse."""

    key: int
    estimate_s: float = 0.0  # worker time until it is answered: the work ahead plus its own
    degraded: bool = False
    retry_after_s: float = 0.0  # > 0: refused, 429; the queue should have room by then
    impossible: bool = False  # refused, 504: even on an idle worker it could not finish in time


class CostModel:
    """Seconds per image at each depth and for an auto-routed image, and the event loop's way back.

    The worker thread writes the costs and the event loop the way back; each is a float that is read whole
    (CPython), and an estimate a batch old is as good as a current one, so no lock is needed.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.by_depth = [0.0] * (max_depth + 1)  # index: depth (0: no pass, free; AUTO_KEY's price is .auto)
        self.auto = 0.0
        self._peak, self._peak_at = 0.0, 0.0  # the way back: from a batch's end until its requests resume
        self._over, self._over_at = 1.0, 0.0  # the overrun: how much longer than estimated requests took

    def observe_way_back(self, seconds: float) -> None:
        """From the event loop: how long a finished request waited to resume. Under overload the loop is busy
        and the wait swings widely (docs/reliability.md), so a new peak counts at once and is forgotten with time
        (half-life WAY_BACK_HALF_LIFE_S), also when no request completes."""
        now = time.monotonic()
        if seconds >= self._way_back_at(now):
            self._peak, self._peak_at = seconds, now

    def _way_back_at(self, now: float) -> float:
        return self._peak * 0.5 ** ((now - self._peak_at) / WAY_BACK_HALF_LIFE_S)

    @property
    def way_back(self) -> float:
        return self._way_back_at(time.monotonic())

    def observe_overrun(self, estimate_s: float, actual_s: float) -> None:
        """From the worker: how long a request took from its admission to its answer, against admission's estimate.
        The per-image costs are averages; when the event loop and the worker contend for the interpreter, batches
        run slower than those averages for a while and a full queue overran its deadline (docs/reliability.md). A
        new peak ratio counts at once and is forgotten with time (half-life OVERRUN_HALF_LIFE_S)."""
        if estimate_s < OVERRUN_MIN_S:
            return
        now = time.monotonic()
        if (ratio := actual_s / estimate_s) >= self._overrun_at(now):
            self._over, self._over_at = ratio, now

    def _overrun_at(self, now: float) -> float:
        return 1 + (self._over - 1) * 0.5 ** ((now - self._over_at) / OVERRUN_HALF_LIFE_S)

    @property
    def overrun(self) -> float:
        """What admission multiplies its estimates by: the recent peak ratio of actual to estimated, at least 1."""
        return max(1.0, self._overrun_at(time.monotonic()))

    def seed(self, depth: int, seconds_per_image: float) -> None:
        """A per-image cost measured at start-up (the warm-up), before any request."""
        self.by_depth[depth] = seconds_per_image
        if depth == self.max_depth:
            self.auto = seconds_per_image  # until real traffic shows the mix: the deepest, to be safe

    def cost(self, key: int) -> float:
        return self.auto if key == AUTO_KEY else self.by_depth[key]

    def observe(self, depths: list[int], auto: list[bool], seconds: float, second: list[int] | None = None) -> None:
        """One batch: the depth each image ran at, whether the router chose it, the batch's worker time, and the
        depth of each image's second pass (0: none; the cascade router's escalations), which the auto price of an
        image includes."""
        second = second or [0] * len(depths)
        counts = Counter(depths) + Counter(d for d in second if d)
        estimate = sum(n * self.by_depth[d] for d, n in counts.items())
        if estimate <= 0:  # nothing known yet: an even share
            for d in counts:
                self.by_depth[d] = seconds / counts.total()
        else:
            scale = 1 + EMA_WEIGHT * (seconds / estimate - 1)
            for d in counts:
                self.by_depth[d] *= scale
        routed = [self.by_depth[d] + self.by_depth[e] for d, e, a in zip(depths, second, auto, strict=True) if a]
        if routed:
            mean = sum(routed) / len(routed)
            self.auto = mean if self.auto <= 0 else (1 - EMA_WEIGHT) * self.auto + EMA_WEIGHT * mean

    def key(self, depth: int | None, max_depth: int | None) -> int:
        """The cost key of an image: its fixed depth, or auto (a cap is priced as the cheaper of the two)."""
        if depth is not None:
            return depth
        if max_depth is not None and self.by_depth[max_depth] < self.auto:
            return max_depth
        return AUTO_KEY


def decide(
    costs: CostModel,
    *,
    images: int,
    key: int,
    ahead_s: float,
    batch_images: int,
    time_left_s: float,
    deadline_s: float,
    degrade_key: int | None,
) -> Decision:
    """Admit, degrade or refuse one request of `images` images.

    Its answer comes when its batch is done, and images that arrive after it may fill that batch: so its
    estimate is the work ahead, its own images, and the rest of a batch (`batch_images`) at the auto price.

    Args:
        costs: the worker's cost model.
        images: the request's images.
        key: their cost key (a depth, or AUTO_KEY).
        ahead_s: estimated worker time of everything queued or running ahead of it.
        batch_images: the most images a batch takes.
        time_left_s: seconds until its deadline.
        deadline_s: the whole deadline, of which MARGIN is kept for errors of the estimate.
        degrade_key: the degrade depth, when this request may be degraded (auto depth, degrade on).
    """
    budget = time_left_s - MARGIN * deadline_s - costs.way_back
    over = costs.overrun  # the estimates are planned at what recent requests actually took
    ahead_s += max(0, batch_images - images) * costs.cost(AUTO_KEY)
    own = images * costs.cost(key)
    if (
        degrade_key is not None
        and costs.cost(degrade_key) < costs.cost(key)
        and (ahead_s + own) * over > DEGRADE_AT * budget
    ):
        # under load an auto request runs at the degrade depth, if it fits there (else it is refused below,
        # with the time until it would fit at that depth)
        own = images * costs.cost(degrade_key)
        if (ahead_s + own) * over <= budget:
            return Decision(degrade_key, ahead_s + own, degraded=True)
    if (ahead_s + own) * over <= budget:
        return Decision(key, ahead_s + own)
    if own > (1 - MARGIN) * deadline_s:  # too big for its deadline on this machine, however idle
        return Decision(key, own, impossible=True)
    return Decision(key, ahead_s + own, retry_after_s=(ahead_s + own) * over - budget)
