"""Admission by time (service/admission.py): the cost model and the decision, with exact arithmetic."""

import pytest

from service import admission
from service.admission import (
    AUTO_KEY,
    DEGRADE_AT,
    EMA_WEIGHT,
    MARGIN,
    OVERRUN_HALF_LIFE_S,
    OVERRUN_MIN_S,
    WAY_BACK_HALF_LIFE_S,
    CostModel,
    decide,
)


@pytest.fixture
def costs() -> CostModel:
    c = CostModel(max_depth=4)
    for d, seconds in ((1, 0.001), (2, 0.002), (3, 0.003), (4, 0.004)):
        c.seed(d, seconds)
    return c


def test_seeding_prices_an_auto_image_at_the_deepest_depth_until_traffic_shows_the_mix(costs):
    assert costs.cost(AUTO_KEY) == 0.004 and costs.cost(2) == 0.002


def test_a_batch_moves_the_depths_it_ran_toward_its_measured_time(costs):
    # estimated 2 x 1 ms + 2 x 3 ms = 8 ms; it took 16 ms: both depths scale by 1 + w (2 - 1)
    costs.observe([1, 1, 3, 3], [True, True, True, False], 0.016)
    scale = 1 + EMA_WEIGHT
    assert costs.cost(1) == pytest.approx(0.001 * scale) and costs.cost(3) == pytest.approx(0.003 * scale)
    assert costs.cost(2) == 0.002 and costs.cost(4) == 0.004  # not in the batch: unchanged
    # the auto price moves toward the mean cost of the images the policy routed (1, 1, 3)
    routed = (2 * 0.001 + 0.003) * scale / 3
    assert costs.cost(AUTO_KEY) == pytest.approx((1 - EMA_WEIGHT) * 0.004 + EMA_WEIGHT * routed)


def test_a_steady_batch_time_is_learned(costs):
    for _ in range(200):
        costs.observe([2] * 10, [False] * 10, 0.05)  # 5 ms an image, not the seeded 2 ms
    assert costs.cost(2) == pytest.approx(0.005, rel=1e-6)


def test_a_cap_is_priced_as_the_cheaper_of_the_cap_and_the_auto_mix(costs):
    assert costs.key(3, None) == 3  # a fixed depth is its own price
    assert costs.key(None, None) == AUTO_KEY
    assert costs.key(None, 2) == 2  # cap 2 (2 ms) is cheaper than auto (4 ms)
    assert costs.key(None, 4) == AUTO_KEY


def test_the_way_back_follows_a_peak_at_once_and_forgets_it_with_time(costs, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    costs.observe_way_back(0.2)
    assert costs.way_back == 0.2
    costs.observe_way_back(0.05)  # smaller: the peak stands
    now[0] += WAY_BACK_HALF_LIFE_S  # and halves in a half-life, whether requests complete or not
    assert costs.way_back == pytest.approx(0.1)
    costs.observe_way_back(0.15)
    assert costs.way_back == pytest.approx(0.15)


def test_the_overrun_is_the_recent_peak_of_actual_over_estimated_and_never_below_one(costs, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    assert costs.overrun == 1.0
    costs.observe_overrun(0.5, 0.4)  # faster than estimated: no discount
    assert costs.overrun == 1.0
    costs.observe_overrun(OVERRUN_MIN_S / 2, OVERRUN_MIN_S * 10)  # too short an estimate to say anything
    assert costs.overrun == 1.0
    costs.observe_overrun(0.8, 1.2)
    assert costs.overrun == pytest.approx(1.5)
    costs.observe_overrun(0.8, 1.0)  # smaller: the peak stands
    now[0] += OVERRUN_HALF_LIFE_S  # and its excess over 1 halves in a half-life
    assert costs.overrun == pytest.approx(1.25)
    costs.observe_overrun(1.0, 1.3)
    assert costs.overrun == pytest.approx(1.3)


def _decide(costs, **kw):
    args = dict(images=8, key=4, ahead_s=0.0, batch_images=8, time_left_s=2.0, deadline_s=2.0, degrade_key=None)
    return decide(costs, **{**args, **kw})


def test_a_request_that_fits_is_admitted_with_its_estimate(costs):
    d = _decide(costs, ahead_s=0.5)
    assert (d.key, d.degraded, d.retry_after_s, d.impossible) == (4, False, 0.0, False)
    assert d.estimate_s == pytest.approx(0.5 + 8 * 0.004)


def test_the_rest_of_its_batch_counts_toward_its_estimate(costs):
    d = _decide(costs, images=2, batch_images=8)  # 6 more images (auto price) may ride in its batch
    assert d.estimate_s == pytest.approx(2 * 0.004 + 6 * 0.004)


def test_a_request_that_would_miss_its_deadline_is_refused_with_the_time_until_it_fits(costs):
    budget = 2.0 - MARGIN * 2.0
    d = _decide(costs, ahead_s=budget + 0.3)
    assert d.retry_after_s == pytest.approx(0.3 + 8 * 0.004) and not d.impossible


def test_the_time_already_spent_counts(costs):
    budget = 2.0 - MARGIN * 2.0
    assert _decide(costs, ahead_s=0.5, time_left_s=2.0).retry_after_s == 0
    late = _decide(costs, ahead_s=0.5, time_left_s=2.0 - (budget - 0.5))  # the same wait, after time spent
    assert late.retry_after_s == pytest.approx(8 * 0.004)


def test_the_way_back_is_kept_free(costs, monkeypatch):
    monkeypatch.setattr(admission.time, "monotonic", lambda: 100.0)
    costs.observe_way_back(0.3)
    budget = 2.0 - MARGIN * 2.0 - 0.3
    assert _decide(costs, ahead_s=budget - 8 * 0.004).retry_after_s == 0
    assert _decide(costs, ahead_s=budget - 8 * 0.004 + 0.01).retry_after_s == pytest.approx(0.01)


def test_an_overrun_scales_the_estimate_admission_plans_with(costs, monkeypatch):
    monkeypatch.setattr(admission.time, "monotonic", lambda: 100.0)
    budget = 2.0 - MARGIN * 2.0
    work = budget / 1.5  # fits as estimated, and exactly at 1.5 times the estimate
    assert _decide(costs, ahead_s=work - 8 * 0.004).retry_after_s == 0
    costs.observe_overrun(1.0, 1.5)
    assert _decide(costs, ahead_s=work - 8 * 0.004).retry_after_s == pytest.approx(0, abs=1e-12)
    refused = _decide(costs, ahead_s=work - 8 * 0.004 + 0.1)
    assert refused.retry_after_s == pytest.approx(0.15)  # the excess, at the overrun
    assert refused.estimate_s == pytest.approx(work + 0.1)  # the estimate itself stays unscaled: it is what is measured


def test_a_request_too_big_for_its_deadline_is_impossible_one_late_by_load_is_retried(costs):
    d = _decide(costs, images=64, batch_images=64, time_left_s=0.1, deadline_s=0.1)  # 256 ms of work in 100 ms
    assert d.impossible
    d = _decide(costs, images=8, time_left_s=0.01, deadline_s=2.0)  # its time went in the queue for the loop
    assert not d.impossible and d.retry_after_s > 0


def test_under_load_an_auto_request_is_degraded(costs):
    budget = 2.0 - MARGIN * 2.0
    light = _decide(costs, key=AUTO_KEY, degrade_key=1, ahead_s=0.1)
    assert not light.degraded and light.key == AUTO_KEY
    heavy = _decide(costs, key=AUTO_KEY, degrade_key=1, ahead_s=DEGRADE_AT * budget)
    assert heavy.degraded and heavy.key == 1 and heavy.estimate_s == pytest.approx(DEGRADE_AT * budget + 8 * 0.001)


def test_degrading_admits_what_fits_only_at_the_cheaper_depth(costs):
    budget = 2.0 - MARGIN * 2.0
    ahead = budget - 8 * 0.002  # 8 images at 4 ms do not fit; at 1 ms they do
    assert _decide(costs, key=AUTO_KEY, degrade_key=1, ahead_s=ahead).degraded
    assert _decide(costs, key=AUTO_KEY, degrade_key=None, ahead_s=ahead).retry_after_s > 0
