"""The service serves the checkpoint's depth routers (model/routers.py): entropy, learned and cascade.

A batch through the model (service/batch_answers.py, torch and onnxruntime backends): first depths from the router, the
cascade's second pass for the images it escalates, capped by max_depth and the degrade depth, never for a requested
depth; every answer checked against a direct model call. Through a real server: the answer's fields, the metrics,
/v1/model, the OIP output, and PUPPET_ROUTER / PUPPET_ROUTER_BUDGET chosen or refused at start-up.
"""

import asyncio
import base64
import time

import httpx
import pytest
import torch
from prometheus_client import REGISTRY
from pydantic import ValidationError

from model import complexity, load_dataset
from model.data import encode_png
from model.onnx_export import ensure_export
from model.routers import CascadeRouter
from service.backends import OnnxBackend, TorchBackend
from service.batch_answers import Request, Rules, first_pass
from service.batch_metrics import record_batch
from service.batcher import Batcher
from service.settings import Settings
from service.work_queue import Queued
from support.live_server import LiveServer
from support.routing import PREPROCESSING, catalog, direct, policy_for, save_routed_checkpoint, small_model

N = 24
FIRST, SECOND = {"pass": "first"}, {"pass": "second"}


@pytest.fixture(scope="module")
def data():
    d = load_dataset("fashion-mnist", "test").subset(slice(200, 200 + N))
    return d.images, complexity(d.images), [encode_png(img) for img in d.images]


def _mid_threshold(top1: torch.Tensor) -> float:
    """A cascade threshold between two of these top-1 probabilities, in the widest gap near their median: some
    images escalate, some do not, and none is within float error of the threshold on either backend."""
    values = top1.sort().values
    n = len(values)
    gaps = [(float(values[i + 1] - values[i]), i) for i in range(n // 4, 3 * n // 4)]
    gap, i = max(gaps)
    assert gap > 1e-4, gap
    return float(values[i] + values[i + 1]) / 2


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    """A small checkpoint whose catalog has every router; the cascade (1 -> 3) escalates about half the images."""
    images, h, _ = data
    model, policy = small_model(), policy_for(h)
    with torch.inference_mode():
        top1 = torch.softmax(model(PREPROCESSING.normalise(images), 1), -1).max(1).values
    threshold = _mid_threshold(top1)
    routers = catalog(model, policy=policy, cascade=(1, 3, threshold))
    return save_routed_checkpoint(tmp_path_factory.mktemp("ckpt") / "routed.safetensors", policy, routers, model)


@pytest.fixture(scope="module")
def backends(ckpt, tmp_path_factory):
    torch_backend = TorchBackend(ckpt, torch.device("cpu"))
    torch_backend.generate_kernels()
    files = ensure_export(ckpt, tmp_path_factory.mktemp("onnx"))
    return {"torch": torch_backend, "onnx": OnnxBackend(ckpt, torch.device("cpu"), files)}


def _setup(ckpt, backend, router, degrade_depth=1):
    return backend, Rules(ckpt.policy, router, ckpt.preprocessing, degrade_depth)


def _run(setup, requests):
    """One batch of these requests (images, depth, max_depth, degraded) through both passes, as the worker runs it
    (service/batcher.py), its metrics recorded: each request's (results, the batch's run)."""
    backend, rules = setup
    run = first_pass([Request(*r) for r in requests], backend, rules)
    waits = run.waits_for_second_pass()
    answers = run.answers([not w for w in waits])
    run.second_pass()
    answers |= run.answers(waits)
    record_batch(run)
    return [(answers[k], run) for k in range(len(requests))]


def _sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _counts():
    """The routing counters of this process now."""
    return {
        "escalated": _sample("puppet_escalations_total", from_depth="1", to_depth="3"),
        "first": _sample("puppet_depth_chosen_total", depth="1", reason="cascade", **FIRST),
        "second": _sample("puppet_depth_chosen_total", depth="3", reason="cascade", **SECOND),
    }


# -- the inference worker ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_threshold_above_one_escalates_every_routed_image(ckpt, backends, data, backend):
    images, _, _ = data
    before = _counts()
    [(results, run)] = _run(
        _setup(ckpt, backends[backend], CascadeRouter(1, 3, 1.01, 3)), [(images, None, None, False)]
    )
    after = _counts()
    assert [(r.depth, r.first_depth, r.escalated, r.reason) for r in results] == [(3, 1, True, "cascade")] * N
    assert all(r.depths_run == [1, 3] for r in results)
    served = torch.stack([r.probabilities for r in results])
    torch.testing.assert_close(served, direct(ckpt, images, [3] * N), atol=1e-5, rtol=0)
    assert {k: after[k] - before[k] for k in after} == {"escalated": N, "first": N, "second": N}
    assert run.second_s > 0


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_threshold_of_zero_escalates_nothing(ckpt, backends, data, backend):
    images, _, _ = data
    before = _counts()
    [(results, run)] = _run(_setup(ckpt, backends[backend], CascadeRouter(1, 3, 0.0, 3)), [(images, None, None, False)])
    after = _counts()
    assert [(r.depth, r.escalated, r.depths_run, r.reason) for r in results] == [(1, False, [1], "cascade")] * N
    served = torch.stack([r.probabilities for r in results])
    torch.testing.assert_close(served, direct(ckpt, images, [1] * N), atol=1e-5, rtol=0)
    assert {k: after[k] - before[k] for k in after} == {"escalated": 0, "first": N, "second": 0}
    assert run.second_s == 0


def test_max_depth_caps_the_second_pass_and_a_requested_depth_never_escalates(ckpt, backends, data):
    images, _, _ = data
    batcher = _setup(ckpt, backends["torch"], CascadeRouter(1, 3, 1.01, 3))
    answers = _run(
        batcher,
        [
            (images[:4], None, 2, False),  # the second pass runs at the cap
            (images[4:8], None, 1, False),  # the cap is not deeper than the first pass: no second pass
            (images[8:12], 1, None, False),  # requested: never offered to the router
            (images[12:16], 2, 3, False),
            (images[16:20], None, None, False),  # uncapped, in the same batch
        ],
    )
    got = [[(r.depths_run, r.reason) for r in results] for results, _ in answers]
    assert got == [
        [([1, 2], "capped")] * 4,
        [([1], "cascade")] * 4,
        [([1], "requested")] * 4,
        [([2], "requested")] * 4,
        [([1, 3], "cascade")] * 4,
    ]
    final = [r.depth for results, _ in answers for r in results]
    served = torch.stack([r.probabilities for results, _ in answers for r in results])
    torch.testing.assert_close(served, direct(ckpt, images[:20], final), atol=1e-5, rtol=0)


class _Recording:
    """A backend whose calls are timed: when each model call started and ended."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def predict(self, images, depths):
        t0 = time.perf_counter()
        out = self.backend.predict(images, depths)
        self.calls.append((t0, time.perf_counter()))
        return out


def test_requests_with_nothing_to_run_again_are_answered_before_the_second_pass(ckpt, backends, data):
    images, _, _ = data
    backend = _Recording(backends["torch"])
    batcher = Batcher(
        backend,
        ckpt.policy,
        ckpt.preprocessing,
        router=CascadeRouter(1, 3, 1.01, 3),
        max_batch_size=64,
        max_queue=64,
        deadline_s=60,
    )

    async def go():
        loop = asyncio.get_running_loop()
        requests = [(images[:4], 2), (images[4:8], None), (images[8:12], 1)]  # requested, escalated, requested
        items = [
            Queued(x, depth, None, time.perf_counter() + 60, loop, loop.create_future(), 0, 0.0)
            for x, depth in requests
        ]
        batcher.process(items)
        return items, [await item.future for item in items]

    items, answers = asyncio.run(go())
    (_, first_end), (second_start, second_end) = backend.calls
    assert first_end <= items[0].answered < second_start and first_end <= items[2].answered < second_start
    assert items[1].answered >= second_end
    assert [t.escalation_s == 0 for _, t in answers] == [True, False, True]
    assert [r.depths_run for r in answers[1][0]] == [[1, 3]] * 4 and [r.depth for r in answers[2][0]] == [1] * 4


def test_degraded_requests_are_capped_in_both_passes(ckpt, backends, data):
    images, _, _ = data
    cascade = CascadeRouter(1, 3, 1.01, 3)
    [(deg2, _), (free, _)] = _run(
        _setup(ckpt, backends["torch"], cascade, degrade_depth=2),
        [(images[:4], None, None, True), (images[4:8], None, None, False)],
    )
    assert [(r.depths_run, r.reason) for r in deg2] == [([1, 2], "degraded")] * 4
    assert [(r.depths_run, r.reason) for r in free] == [([1, 3], "cascade")] * 4
    [(deg1, _)] = _run(_setup(ckpt, backends["torch"], cascade, degrade_depth=1), [(images[:4], None, None, True)])
    assert [(r.depths_run, r.reason) for r in deg1] == [([1], "cascade")] * 4
    # a router's first depth above the degrade depth drops to it, as with the depth table
    entropy = ckpt.catalog.router("entropy")
    [(deg, _)] = _run(_setup(ckpt, backends["torch"], entropy, degrade_depth=1), [(images, None, None, True)])
    first = entropy.first(images, complexity(images)).tolist()
    assert [(r.depth, r.reason) for r in deg] == [(1, "degraded" if d > 1 else "entropy") for d in first]


def _expected(ckpt, router, images, caps):
    """What each image's answer must be, from the router and direct model calls: (first, final depth, reason),
    and the final probabilities. `caps`: each image's max_depth (None: uncapped)."""
    first = router.first(images, complexity(images))
    rows = []
    for d, cap in zip(first.tolist(), caps, strict=True):
        rows.append((min(d, cap), "capped") if cap is not None and d > cap else (d, router.name))
    p1 = direct(ckpt, images, [d for d, _ in rows])
    wanted = router.escalate(p1, torch.tensor([d for d, _ in rows])).tolist()
    out = []
    for (d, reason), w, cap in zip(rows, wanted, caps, strict=True):
        if reason == router.name and w > 0:
            e, why = (cap, "capped") if cap is not None and w > cap else (w, router.name)
            if e > d:
                out.append((d, e, why))
                continue
        out.append((d, d, reason))
    return out, direct(ckpt, images, [f for _, f, _ in out])


@pytest.mark.parametrize("name", ["entropy", "learned", "cascade"])
def test_each_router_answers_the_truth_alike_on_torch_and_onnx(ckpt, backends, data, name):
    images, _, _ = data
    router = ckpt.catalog.router(name)
    requests = [(images[:16], None, None, False), (images[16:], None, 2, False)]
    caps = [None] * 16 + [2] * (N - 16)
    want, want_probs = _expected(ckpt, router, images, caps)
    answers = {}
    for backend in ("torch", "onnx"):
        results = [r for rs, _ in _run(_setup(ckpt, backends[backend], router), requests) for r in rs]
        assert [(r.first_depth, r.depth, r.reason) for r in results] == want, backend
        torch.testing.assert_close(torch.stack([r.probabilities for r in results]), want_probs, atol=1e-5, rtol=0)
        answers[backend] = results
    for a, b in zip(answers["torch"], answers["onnx"], strict=True):
        assert (a.depth, a.escalated, a.ranked[0][0]) == (b.depth, b.escalated, b.ranked[0][0])
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-5, rtol=0)
    escalated = [r.escalated for r in answers["torch"]]
    if name == "cascade":  # the threshold splits the images: both paths are compared
        assert any(escalated) and not all(escalated), escalated
    else:
        assert not any(escalated)
        assert len({r.first_depth for r in answers["torch"]}) > 1, "the router should route to several depths"


# -- a real server -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def escalating(data, tmp_path_factory):
    """A checkpoint whose default router is a cascade 1 -> 3 that escalates every image (threshold 1.01)."""
    _, h, _ = data
    model, policy = small_model(), policy_for(h)
    routers = catalog(model, policy=policy, cascade=(1, 3, 1.01))
    return save_routed_checkpoint(tmp_path_factory.mktemp("esc") / "escalating.safetensors", policy, routers, model)


@pytest.fixture(scope="module")
def server(escalating, tmp_path_factory):
    s = LiveServer(checkpoint=escalating.path, onnx_cache_dir=tmp_path_factory.mktemp("onnx-cache"))
    yield s
    s.stop()


def _classify(url, pngs, **params):
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    r = httpx.post(url + "/classify", files=files, params={"top_k": 10, **params}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _served_probabilities(result):
    p = torch.zeros(10)
    for x in result["predictions"]:
        p[x["class_id"]] = x["probability"]
    return p


def test_classify_answers_with_both_passes_and_the_metrics_count_them(server, escalating, data):
    images, _, pngs = data
    m = server.metrics
    key = {
        "escalated": ("puppet_escalations_total", {"from_depth": "1", "to_depth": "3"}),
        "first": ("puppet_depth_chosen_total", {"depth": "1", "reason": "cascade", **FIRST}),
        "second": ("puppet_depth_chosen_total", {"depth": "3", "reason": "cascade", **SECOND}),
        "capped": ("puppet_depth_chosen_total", {"depth": "2", "reason": "capped", **SECOND}),
    }

    def counts():
        samples = m()
        return {k: samples.get((n, frozenset(labels.items())), 0.0) for k, (n, labels) in key.items()}

    before = counts()
    r = _classify(server.url, pngs)
    body = r.json()
    results = body["results"]
    assert [(x["depth"], x["depth_reason"], x["escalated"], x["depths_run"]) for x in results] == [
        (3, "cascade", True, [1, 3])
    ] * N
    served = torch.stack([_served_probabilities(x) for x in results])
    torch.testing.assert_close(served, direct(escalating, images, [3] * N), atol=1e-5, rtol=0)
    assert set(body["timings_ms"]) == {"receive", "queue", "preprocess", "inference", "escalation", "total"}
    assert body["timings_ms"]["escalation"] > 0 and "escalation;dur=" in r.headers["server-timing"]
    capped = _classify(server.url, pngs[:3], max_depth=2).json()["results"]
    assert [(x["depth"], x["depth_reason"], x["depths_run"]) for x in capped] == [(2, "capped", [1, 2])] * 3
    for params in ({"max_depth": 1}, {"depth": 1}, {"depth": 2}):  # no second pass
        for x in _classify(server.url, pngs[:2], **params).json()["results"]:
            assert not x["escalated"] and x["depths_run"] == [x["depth"]], (params, x)
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {"escalated": N, "first": N + 3 + 2, "second": N, "capped": 3}
    assert server.metric("puppet_router_info", router="cascade", budget="1") == 1


def test_oip_reports_the_escalation(server, data):
    _, _, pngs = data
    body = {
        "inputs": [
            {
                "name": "image_bytes",
                "shape": [3],
                "datatype": "BYTES",
                "data": [base64.b64encode(p).decode() for p in pngs[:3]],
            }
        ]
    }
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["escalated"] == {"name": "escalated", "datatype": "BOOL", "shape": [3], "data": [True] * 3}
    assert outputs["depth"]["data"] == [3, 3, 3]
    requested = {**body, "parameters": {"depth": 2}}
    outputs = {
        o["name"]: o for o in httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=requested).json()["outputs"]
    }
    assert outputs["escalated"]["data"] == [False] * 3 and outputs["depth"]["data"] == [2, 2, 2]
    meta = httpx.get(server.url + "/v2/models/puppet-cnn").json()
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "depth", "label", "escalated"]


def test_model_description_reports_the_router(server, escalating):
    info = httpx.get(server.url + "/v1/model").json()
    assert info["router"] == {
        "name": "cascade",
        "budget": 1.0,
        "settings": {"first": 1, "second": 3, "threshold": 1.01},
        "val_accuracy": 0.83,
        "val_macs": pytest.approx(0.65 * escalating.model.macs(3)),
        "available": ["entropy", "learned", "cascade"],
        "default": "cascade",
    }
    assert info["depth_table"]["depths"] == list(escalating.policy.depths)


@pytest.mark.integration
def test_router_and_budget_settings_choose_the_router_and_its_point(data, tmp_path):
    images, h, pngs = data
    model, policy = small_model(), policy_for(h)
    # two learned points: the cheap one within a budget of 0.5, the accurate one only within 1.0
    routers = catalog(model, policy=policy, learned=[(0.3, 0.70, 0.4), (0.0, 0.85, 0.9)], default_budget=1.0)
    ckpt = save_routed_checkpoint(tmp_path / "two-points.safetensors", policy, routers, model)
    s = LiveServer(checkpoint=ckpt.path, backend="torch", router="learned", router_budget="0.5")
    try:
        info = httpx.get(s.url + "/v1/model").json()["router"]
        assert (info["name"], info["budget"], info["settings"], info["val_accuracy"]) == (
            "learned",
            0.5,
            {"penalty": 0.3},
            0.70,
        )
        results = _classify(s.url, pngs).json()["results"]
        want = ckpt.catalog.router("learned", 0.5).first(images, h).tolist()
        assert [(x["depth"], x["depth_reason"], x["escalated"]) for x in results] == [
            (d, "learned", False) for d in want
        ]
        assert s.metric("puppet_router_info", router="learned", budget="0.5") == 1
    finally:
        s.stop()


@pytest.mark.integration
def test_a_checkpoint_without_routers_serves_its_depth_table(data, tmp_path):
    _, h, pngs = data
    policy = policy_for(h)
    ckpt = save_routed_checkpoint(tmp_path / "table-only.safetensors", policy, None)
    s = LiveServer(checkpoint=ckpt.path, backend="torch")
    try:
        info = httpx.get(s.url + "/v1/model").json()["router"]
        assert (info["name"], info["available"], info["val_accuracy"], info["val_macs"]) == (
            "entropy",
            ["entropy"],
            None,
            None,
        )
        assert info["settings"] == {"edges": list(policy.edges), "depths": list(policy.depths)}
        results = _classify(s.url, pngs).json()["results"]
        assert [(x["depth"], x["depth_reason"]) for x in results] == [(d, "entropy") for d in policy.auto(h).tolist()]
    finally:
        s.stop()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"router": "deep"}, "invalid setting router: Input should be '', 'entropy', 'learned' or 'cascade'"),
        ({"router_budget": "0"}, "invalid setting router_budget: Input should be greater than 0"),
        ({"router": "cascade"}, "router 'cascade' (PUPPET_ROUTER) is not calibrated in checkpoint"),
    ],
)
def test_a_bad_router_setting_stops_the_start_up_with_a_clear_message(data, tmp_path, settings, message):
    _, h, _ = data
    table_only = save_routed_checkpoint(tmp_path / "table-only.safetensors", policy_for(h), None)
    with pytest.raises(RuntimeError, match="server exited with 2") as e:
        LiveServer(checkpoint=table_only.path, backend="torch", **settings)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("budget", [0, -0.5, 1.0001, 1.5, float("nan"), float("inf")])
def test_a_budget_outside_zero_to_one_is_refused(budget):
    with pytest.raises(ValidationError, match="router_budget"):
        Settings(router_budget=budget)
    assert Settings(router_budget=1).router_budget == 1.0 and Settings().router_budget is None
    assert Settings(router_budget="").router_budget is None  # PUPPET_ROUTER_BUDGET= : the checkpoint's default
