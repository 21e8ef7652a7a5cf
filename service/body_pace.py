"""Receiving a request body from a client on a slow link: served while its bytes keep coming, cut when they stop.

A deadline on the whole body cuts a large upload on any slow link (a phone photo over a mobile network), and the
time a body takes is the client's, not the service's: the request's deadline starts once the body is in
(service/request_context.py). What a body must do instead, else 408 and the connection closes:

- keep arriving: no pause of `idle_s` (PUPPET_READ_TIMEOUT_S) between two reads;
- once it has taken longer than `idle_s`, keep an average of `min_rate` bytes/s over the last `window_s` seconds
  (PUPPET_MIN_UPLOAD_RATE, PUPPET_UPLOAD_RATE_WINDOW_S): a drip of a byte a second is cut, a slow upload is not.

`BodyPace` is the rule on one body's arrivals, with the clock passed in; `paced_receive` applies it to an ASGI
`receive` (service/middleware.py), on a clock that runs only while the service waits for the client's bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

BUCKETS = 10  # the rate window is kept as this many buckets of bytes, whatever the number of reads


class UploadTooSlow(Exception):
    """The body stopped arriving, or arrives too slowly to be waited for: 408 with `code` and this message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class PaceLimits:
    idle_s: float  # the longest pause between two reads; also how long a body may take before its rate counts
    min_rate: float  # bytes/s over the window, once the body has taken longer than idle_s; 0: no minimum
    window_s: float


class BodyPace:
    """One body's arrival, read by read: the bytes of the last window in `BUCKETS` buckets, and the verdict."""

    def __init__(self, limits: PaceLimits, now: float):
        self.limits = limits
        self.start = self.last = now
        self.bucket_s = limits.window_s / BUCKETS
        self._buckets: deque[list] = deque()  # [bucket index since start, bytes], oldest first

    def received(self, n: int, now: float) -> None:
        if n <= 0:
            return
        self.last = now
        index = int((now - self.start) / self.bucket_s)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([index, n])

    def rate(self, now: float) -> tuple[float, float]:
        """Bytes/s over the last window (or since the start, when shorter), and that span in seconds."""
        span = min(self.limits.window_s, now - self.start)
        oldest = int((now - self.start - span) / self.bucket_s)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
        return sum(n for _, n in self._buckets) / max(span, 1e-9), span

    def verdict(self, now: float) -> UploadTooSlow | None:
        """Why the body is cut at `now`, or None while it may go on."""
        limits = self.limits
        if now - self.last >= limits.idle_s:
            return UploadTooSlow("request_timeout", f"no byte of the request body arrived for {limits.idle_s:g} s")
        # a body that has gone quiet for half the idle limit is left to it: it is told it stopped, not that it is slow
        if limits.min_rate > 0 and now - self.start >= limits.idle_s and now - self.last < limits.idle_s / 2:
            rate, span = self.rate(now)
            if rate < limits.min_rate:
                return UploadTooSlow(
                    "upload_too_slow",
                    f"the request body arrived at {rate:,.0f} bytes/s over the last {span:.0f} s; a body that takes "
                    f"longer than {limits.idle_s:g} s must keep at least {limits.min_rate:,.0f} bytes/s",
                )
        return None

    def next_check(self, now: float) -> float:
        """When to look again if nothing arrives: the next bucket once the rate counts, or the end of the pause."""
        idle_at = self.last + self.limits.idle_s
        if self.limits.min_rate > 0:
            return min(idle_at, max(self.start + self.limits.idle_s, now + self.bucket_s))
        return idle_at


Receive = Callable[[], Awaitable[dict]]


def paced_receive(receive: Receive, limits: PaceLimits, on_body: Callable[[], None]) -> Receive:
    """`receive`, held to `limits` until the body is complete (then `on_body()` is called once); raises
    UploadTooSlow. The underlying receive is never cancelled while the body may still go on, so no message is
    lost to a timer.

    The pace runs on the time spent waiting for the client's bytes, not on the wall clock: while the service is
    busy elsewhere (its event loop late, the route not yet reading), bytes pile up in the socket, and that time is
    the service's, not the client's."""
    pace = BodyPace(limits, 0.0)
    waited = 0.0  # seconds this body has spent waiting for bytes: the pace's clock
    done = False

    async def receive_paced() -> dict:
        nonlocal done, waited
        if done:
            return await receive()
        pending = asyncio.ensure_future(receive())
        try:
            while True:
                t0 = time.monotonic()
                await asyncio.wait((pending,), timeout=max(0.0, pace.next_check(waited) - waited))
                waited += time.monotonic() - t0
                if pending.done():
                    break
                if (cut := pace.verdict(waited)) is not None:
                    raise cut
        except BaseException:
            pending.cancel()
            raise
        message = pending.result()
        if message["type"] != "http.request":  # the client went away: no body to time
            done = True
            return message
        if not message.get("more_body", False):
            done = True
            on_body()
            return message
        pace.received(len(message.get("body", b"")), waited)
        if (cut := pace.verdict(waited)) is not None:
            raise cut
        return message

    return receive_paced
