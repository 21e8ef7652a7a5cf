"""The rule a request body must keep while it arrives (service/body_pace.py), and the event loop's lag that admission
adds to a request's time (service/loop_lag.py): pure, with the clock passed in."""

from __future__ import annotations

import pytest

from service.body_pace import BodyPace, PaceLimits
from service.loop_lag import LoopLag

LIMITS = PaceLimits(idle_s=10.0, min_rate=16384.0, window_s=10.0)


def _feed(pace: BodyPace, rate: float, seconds: float, step: float = 0.1) -> float:
    """`rate` bytes/s in reads every `step` seconds from the pace's start; returns the time of the last read."""
    t = pace.start
    for i in range(1, round(seconds / step) + 1):
        t = pace.start + i * step
        assert pace.verdict(t) is None, f"cut at {t - pace.start:.1f} s at {rate} bytes/s"
        pace.received(round(rate * step), t)
    return t


def test_a_slow_but_steady_upload_is_never_cut():
    pace = BodyPace(LIMITS, now=100.0)
    _feed(pace, rate=200 * 1024, seconds=52)  # 10 MiB at 200 KB/s


def test_a_body_under_the_minimum_rate_is_cut_once_it_has_taken_longer_than_the_idle_limit():
    pace = BodyPace(LIMITS, now=0.0)
    t = _feed(pace, rate=8192, seconds=9.9)  # half the minimum: allowed while the body is young
    assert pace.verdict(t) is None
    cut = pace.verdict(10.0)
    assert cut is not None and cut.code == "upload_too_slow"
    assert cut.message.startswith("the request body arrived at 8,") and "16,384 bytes/s" in cut.message


def test_a_drip_of_one_byte_a_second_is_cut_at_the_idle_limit_not_before():
    pace = BodyPace(LIMITS, now=0.0)
    for second in range(1, 10):
        assert pace.verdict(second) is None
        pace.received(1, second)
    assert pace.next_check(9.0) == 10.0  # nothing arrives: look again when the rate starts to count
    assert pace.verdict(10.0).code == "upload_too_slow"


def test_a_pause_as_long_as_the_idle_limit_is_cut_whatever_the_rate_before():
    pace = BodyPace(PaceLimits(idle_s=10.0, min_rate=0.0, window_s=10.0), now=0.0)
    pace.received(10_000_000, 1.0)
    assert pace.verdict(10.9) is None and pace.next_check(5.0) == 11.0
    cut = pace.verdict(11.0)
    assert cut.code == "request_timeout" and cut.message == "no byte of the request body arrived for 10 s"


def test_a_body_that_stopped_is_told_so_at_the_idle_limit_not_that_it_is_slow():
    pace = BodyPace(PaceLimits(idle_s=1.0, min_rate=16384.0, window_s=10.0), now=0.0)
    pace.received(100, 0.0003)  # then nothing: at 1 s the rate is 100 bytes/s, but the body has stopped
    assert pace.verdict(1.0001) is None
    assert pace.verdict(1.0004).code == "request_timeout"


def test_the_rate_is_over_the_last_window_only():
    pace = BodyPace(LIMITS, now=0.0)
    pace.received(10_000_000, 0.5)  # a fast start buys nothing later
    for second in range(1, 21):
        pace.received(100, second)
    rate, span = pace.rate(20.0)
    assert span == 10.0 and rate == pytest.approx(100.0, rel=0.15)
    assert pace.verdict(20.0).code == "upload_too_slow"


def test_the_window_keeps_a_bounded_number_of_buckets_whatever_the_reads():
    pace = BodyPace(LIMITS, now=0.0)
    _feed(pace, rate=1_000_000, seconds=60, step=0.001)
    pace.rate(60.0)
    assert len(pace._buckets) <= 11


def test_the_loop_lag_takes_a_peak_at_once_and_forgets_it_by_its_half_life():
    lag = LoopLag(half_life_s=1.0)
    assert lag.current(5.0) == 0.0
    lag.observe(0.4, now=10.0)
    assert lag.current(10.0) == 0.4
    lag.observe(0.1, now=10.5)  # below the fading peak: ignored
    assert lag.current(11.0) == pytest.approx(0.2)
    lag.observe(0.3, now=11.0)  # above it: the new peak
    assert lag.current(12.0) == pytest.approx(0.15)
