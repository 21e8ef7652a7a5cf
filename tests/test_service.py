"""The service end to end: a real uvicorn on loopback, real Fashion-MNIST images, the shipped checkpoint.

The server routes with the checkpoint's entropy router (its complexity table), which never escalates, so every
image has one depth; tests/test_routing.py covers the learned and cascade routers."""

import base64
import concurrent.futures as cf
import io
import os
import re

import httpx
import pytest
import torch
from PIL import Image

from model import complexity, load_checkpoint, load_dataset
from model.data import encode_png
from support.live_server import SHIPPED, LiveServer

pytestmark = pytest.mark.integration  # every test here starts a server or another process

N_IMAGES = 24
FIRST = {"pass": "first"}  # the depth metrics' label of an image's first (here its only) pass
# The entropy router at a budget whose table mixes depths 1 and 2 on the shipped checkpoint (at the default budget,
# 0.281, the table is depth 1 everywhere, and nothing could be capped)
ENTROPY_BUDGET = 0.5


@pytest.fixture(scope="module")
def server():
    s = LiveServer(max_batch_size=16, router="entropy", router_budget=ENTROPY_BUDGET)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline():
    return load_checkpoint(SHIPPED)


@pytest.fixture(scope="module")
def router(offline):
    """The router the server runs: the catalog's entropy router at ENTROPY_BUDGET."""
    return offline.catalog.router("entropy", ENTROPY_BUDGET)


@pytest.fixture(scope="module")
def test_images():
    data = load_dataset("fashion-mnist", "test").subset(slice(0, N_IMAGES))
    return data, [encode_png(img) for img in data.images]


def _classify_png(url, png, **params):
    return httpx.post(url + "/classify", content=png, headers={"Content-Type": "image/png"}, params=params, timeout=30)


def test_predictions_equal_the_offline_model(server, offline, router, test_images):
    data, pngs = test_images
    h = complexity(data.images)
    depths = router.first(data.images, h)
    with torch.no_grad():
        x = offline.preprocessing.normalise(data.images)
        probs = torch.stack(
            [torch.softmax(offline.model(x[i : i + 1], int(depths[i])), -1)[0] for i in range(N_IMAGES)]
        )
    for i, png in enumerate(pngs):
        r = _classify_png(server.url, png, top_k=10)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["depth"] == int(depths[i]) and result["depth_reason"] == "entropy"
        assert result["escalated"] is False and result["depths_run"] == [int(depths[i])]
        assert result["complexity"] == pytest.approx(float(h[i]), abs=1e-4)
        top = result["predictions"][0]
        assert top["class_id"] == int(probs[i].argmax()) and top["label"] == offline.classes[top["class_id"]]
        served = torch.zeros(10)
        for p in result["predictions"]:
            served[p["class_id"]] = p["probability"]
        torch.testing.assert_close(served, probs[i], atol=1e-5, rtol=0)


def test_many_images_in_one_request_equal_single_requests(server, test_images):
    _, pngs = test_images
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:8])]
    together = httpx.post(server.url + "/classify", files=files, params={"top_k": 3}, timeout=30)
    assert together.status_code == 200, together.text
    results = together.json()["results"]
    assert len(results) == 8
    for i, png in enumerate(pngs[:8]):
        alone = _classify_png(server.url, png, top_k=3).json()["results"][0]
        assert results[i]["depth"] == alone["depth"]
        assert [p["class_id"] for p in results[i]["predictions"]] == [p["class_id"] for p in alone["predictions"]]
        for a, b in zip(results[i]["predictions"], alone["predictions"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_json_base64_and_options(server, test_images):
    _, pngs = test_images
    body = {"images": [base64.b64encode(p).decode() for p in pngs[:3]], "top_k": 2, "depth": 3}
    r = httpx.post(server.url + "/classify", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [len(x["predictions"]) for x in out["results"]] == [2, 2, 2]
    assert {x["depth"] for x in out["results"]} == {3} and {x["depth_reason"] for x in out["results"]} == {"requested"}
    assert set(out["timings_ms"]) == {"receive", "queue", "preprocess", "inference", "escalation", "total"}
    assert out["timings_ms"]["escalation"] == 0  # a requested depth never runs a second pass
    assert "inference;dur=" in r.headers["server-timing"] and "escalation;dur=0.000" in r.headers["server-timing"]


def test_request_id_is_echoed_or_made(server, test_images):
    _, pngs = test_images
    r = httpx.post(
        server.url + "/classify", content=pngs[0], headers={"Content-Type": "image/png", "X-Request-ID": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    made = [_classify_png(server.url, pngs[0]).headers["x-request-id"] for _ in range(3)]
    assert len(set(made)) == 3 and all(len(i) >= 14 for i in made), made  # fresh and distinct
    # an unusable id (too long, or not printable ASCII) is replaced, never echoed or logged
    r = httpx.post(
        server.url + "/classify", content=pngs[0], headers={"Content-Type": "image/png", "X-Request-ID": "x" * 200}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] != "x" * 200


def test_max_depth_caps_and_metrics_move_exactly(server, test_images, router):
    data, pngs = test_images
    auto = router.first(data.images, complexity(data.images))
    deep = [i for i in range(N_IMAGES) if auto[i] > 1]
    assert deep, "the test slice should hold images routed deeper than 1"
    before = {
        "capped": server.metric("puppet_depth_chosen_total", depth="1", reason="capped", **FIRST),
        "requested": server.metric("puppet_depth_chosen_total", depth="4", reason="requested", **FIRST),
        "ok": server.metric("puppet_requests_total", route="/classify", status="200"),
        "bad": server.metric("puppet_requests_total", route="/classify", status="415"),
    }
    for i in deep:
        r = _classify_png(server.url, pngs[i], max_depth=1).json()["results"][0]
        assert (r["depth"], r["depth_reason"]) == (1, "capped")
    for png in pngs[:5]:
        assert _classify_png(server.url, png, depth=4).json()["results"][0]["depth"] == 4
    httpx.post(server.url + "/classify", content=b"hello", headers={"Content-Type": "text/plain"})
    assert server.metric("puppet_depth_chosen_total", depth="1", reason="capped", **FIRST) - before["capped"] == len(
        deep
    )
    assert server.metric("puppet_depth_chosen_total", depth="4", reason="requested", **FIRST) - before["requested"] == 5
    assert server.metric("puppet_requests_total", route="/classify", status="200") - before["ok"] == len(deep) + 5
    assert server.metric("puppet_requests_total", route="/classify", status="415") - before["bad"] == 1


def test_concurrent_requests_are_batched_with_unchanged_answers(server, test_images):
    _, pngs = test_images
    alone = [_classify_png(server.url, p).json()["results"][0] for p in pngs]
    batches_before = server.metric("puppet_batch_size_images_count")
    images_before = server.metric("puppet_batch_size_images_sum")
    with httpx.Client(timeout=30) as client, cf.ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(
                client.post, server.url + "/classify", content=pngs[i % N_IMAGES], headers={"Content-Type": "image/png"}
            )
            for i in range(96)
        ]
        answers = [f.result() for f in futures]
    for i, r in enumerate(answers):
        assert r.status_code == 200
        got = r.json()["results"][0]
        assert got["depth"] == alone[i % N_IMAGES]["depth"]
        assert got["predictions"][0]["class_id"] == alone[i % N_IMAGES]["predictions"][0]["class_id"]
        assert got["predictions"][0]["probability"] == pytest.approx(
            alone[i % N_IMAGES]["predictions"][0]["probability"], abs=1e-5
        )
    batches = server.metric("puppet_batch_size_images_count") - batches_before
    images = server.metric("puppet_batch_size_images_sum") - images_before
    assert images == 96
    assert batches < 96, "16 concurrent clients should share batches"


def _png(size=(28, 28), mode="L"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "empty_image"),
        (b"definitely not an image", "image/png", 400, "invalid_image"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"hello", "", 415, "unsupported_media_type"),
        ("TRUNCATED", "image/png", 400, "invalid_image"),
        ("TIFF", "image/png", 415, "unsupported_image_type"),
        ("BOMB", "image/png", 413, "too_many_pixels"),
        (b"{not json", "application/json", 400, "invalid_json"),
        (b'{"image": "%%%"}', "application/json", 400, "invalid_base64"),
        (b'{"top_k": 3}', "application/json", 400, "no_image"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_service_keeps_answering(
    server, test_images, body, content_type, status, code
):
    if body == "TRUNCATED":
        body = test_images[1][0][:60]
    elif body == "TIFF":
        buf = io.BytesIO()
        Image.new("L", (8, 8)).save(buf, format="TIFF")
        body = buf.getvalue()
    elif body == "BOMB":
        body = _png(size=(10_000, 10_000), mode="1")  # 100 Mpx in a few kB
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(server.url + "/classify", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert _classify_png(server.url, test_images[1][0]).status_code == 200


@pytest.mark.parametrize(
    "params",
    [{"top_k": 0}, {"top_k": 11}, {"top_k": "x"}, {"depth": 0}, {"depth": 5}, {"depth": "deep"}, {"max_depth": 9}],
)
def test_invalid_options_are_422(server, test_images, params):
    r = _classify_png(server.url, test_images[1][0], **params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_option"


def test_upload_over_the_byte_limit_is_413(test_images):
    s = LiveServer(max_upload_bytes=2048)
    try:
        r = httpx.post(s.url + "/classify", content=b"\x89PNG" + b"\0" * 5000, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # chunked, no Content-Length: refused while streaming
        r = httpx.post(s.url + "/classify", content=iter([b"\0" * 1024] * 8), headers={"Content-Type": "image/png"})
        assert r.status_code == 413
        assert _classify_png(s.url, test_images[1][0]).status_code == 200
    finally:
        s.stop()


def test_model_description(server, offline, router):
    info = httpx.get(server.url + "/v1/model").json()
    assert info["classes"] == list(offline.classes)
    assert info["preprocessing"] == {
        "input_size": [28, 28],
        "channels": 1,
        "mean": list(offline.preprocessing.mean),
        "std": list(offline.preprocessing.std),
    }
    assert info["depth_table"]["depths"] == list(offline.policy.depths)
    assert info["router"]["name"] == "entropy" and info["router"]["settings"] == router.settings()
    assert info["router"]["available"] == list(offline.catalog.names)
    assert info["router"]["budget"] == ENTROPY_BUDGET
    assert info["stored_parameters"] == offline.model.stored_parameters()
    # the default backend on the CPU is onnxruntime (PUPPET_BACKEND=auto), where it measured faster
    assert info["backend"] == "onnx" and info["provider"] == "CPUExecutionProvider"
    assert info["device"] == "cpu" and info["checkpoint_sha256"] == offline.sha256


def test_health_and_docs(server):
    assert httpx.get(server.url + "/health/live").status_code == 200
    assert httpx.get(server.url + "/health/ready").status_code == 200
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/classify" in spec["paths"] and "/v2/models/{name}/infer" in spec["paths"]


def test_the_api_page_needs_no_internet(server):
    """/docs loads Swagger UI from the service itself (service/api_docs.py), byte for byte the package's files."""
    from swagger_ui_bundle import swagger_ui_path

    page = httpx.get(server.url + "/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = httpx.get(f"{server.url}/docs/assets/{name}")
        assert r.status_code == 200 and r.content == open(os.path.join(swagger_ui_path, name), "rb").read()


def test_oip_v2_matches_classify(server, test_images, offline):
    data, pngs = test_images
    classify = [_classify_png(server.url, p, top_k=10).json()["results"][0] for p in pngs[:4]]
    x = offline.preprocessing.normalise(data.images[:4])
    fp32 = {"inputs": [{"name": "input", "shape": [4, 1, 28, 28], "datatype": "FP32", "data": x.flatten().tolist()}]}
    as_bytes = {
        "inputs": [
            {
                "name": "image_bytes",
                "shape": [4],
                "datatype": "BYTES",
                "data": [base64.b64encode(p).decode() for p in pngs[:4]],
            }
        ]
    }
    for body in (fp32, as_bytes):
        r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert outputs["probabilities"]["shape"] == [4, 10]
        probs = torch.tensor(outputs["probabilities"]["data"]).view(4, 10)
        for i in range(4):
            assert outputs["depth"]["data"][i] == classify[i]["depth"]
            assert int(probs[i].argmax()) == classify[i]["predictions"][0]["class_id"]
            assert float(probs[i].max()) == pytest.approx(classify[i]["predictions"][0]["probability"], abs=1e-5)
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json={**fp32, "parameters": {"depth": 2}})
    assert {o["name"]: o for o in r.json()["outputs"]}["depth"]["data"] == [2, 2, 2, 2]
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/v2/models/puppet-cnn/ready").status_code == 200
    meta = httpx.get(server.url + "/v2/models/puppet-cnn").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]


def test_oip_fp32_reaches_the_model_as_sent(server, test_images, offline):
    """FP32 input is the model's input, normalised by the client: it is not turned back into intensities and
    clamped to [0, 1] on the way (which would change values no image can produce). Depth requested, so the
    complexity score (read from intensities recovered from the tensor) does not enter; a mixed batch also holds
    uploads."""
    data, pngs = test_images
    x = offline.preprocessing.normalise(data.images[:2])
    x[:, :, 10:18, 10:18] = torch.linspace(-6.0, 6.0, 64).view(8, 8)  # outside what intensities in [0, 1] give
    with torch.inference_mode():
        want = torch.softmax(offline.model(x, torch.full((2,), 3)), dim=-1)
    body = {
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.flatten().tolist()}],
        "parameters": {"depth": 3},
    }
    with cf.ThreadPoolExecutor(4) as pool:  # with uploads alongside, some batches mix uint8 and FP32 items
        uploads = [pool.submit(_classify_png, server.url, pngs[i % len(pngs)], depth=3) for i in range(6)]
        answers = [pool.submit(httpx.post, server.url + "/v2/models/puppet-cnn/infer", json=body) for _ in range(3)]
        assert all(u.result().status_code == 200 for u in uploads)
        for answer in answers:
            r = answer.result()
            assert r.status_code == 200, r.text
            got = torch.tensor({o["name"]: o for o in r.json()["outputs"]}["probabilities"]["data"]).view(2, 10)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "input", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0.0] * (3 * 784)},
        {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 10},
        {"name": "input", "shape": [1, 1, 28, 28], "datatype": "INT8", "data": [0] * 784},
        {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"] * 784},
        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["***"]},
    ],
)
def test_oip_bad_tensors_are_400(server, tensor):
    r = httpx.post(server.url + "/v2/models/puppet-cnn/infer", json={"inputs": [tensor]})
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)
    assert httpx.post(server.url + "/v2/models/other/infer", json={"inputs": [tensor]}).status_code == 404


def test_start_up_metrics(server, offline):
    assert server.metric("puppet_ready") == 1
    labels = {
        "version": offline.version,
        "backend": "onnx",  # the default on the CPU
        "provider": "CPUExecutionProvider",
        "device": "cpu",
        "max_depth": "4",
        "sha256": offline.sha256[:12],
    }
    assert server.metric("puppet_model_info", **labels) == 1
    assert server.metric("puppet_router_info", router="entropy", budget=f"{ENTROPY_BUDGET:g}") == 1
    assert server.metric("puppet_kernel_generation_seconds_count") == 1  # once, at start-up (onnx: folded at export)
    assert server.metric("puppet_model_load_seconds") > 0 and server.metric("puppet_warmup_seconds") > 0


def test_without_the_kernel_cache_answers_are_the_same_and_kernels_are_regenerated_per_batch(server, test_images):
    _, pngs = test_images
    s = LiveServer(kernel_cache="false", router="entropy", router_budget=ENTROPY_BUDGET)
    try:
        before = s.metric("puppet_kernel_generation_seconds_count")
        for png in pngs[:5]:
            ra, rb = _classify_png(s.url, png, top_k=3), _classify_png(server.url, png, top_k=3)
            assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
            a, b = ra.json()["results"][0], rb.json()["results"][0]
            assert a["depth"] == b["depth"]
            for x, y in zip(a["predictions"], b["predictions"], strict=True):
                assert x["class_id"] == y["class_id"] and x["probability"] == pytest.approx(y["probability"], abs=1e-5)
        assert s.metric("puppet_kernel_generation_seconds_count") - before == 5
    finally:
        s.stop()
