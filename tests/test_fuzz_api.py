"""Fuzzing the live service against its own OpenAPI spec (schemathesis).

The spec is the app's own (`create_app().openapi()`, built without loading the model: the same document
the server publishes at /openapi.json, which a test here checks), so pytest gets one test per operation at
collection time; the requests go to a real `puppet-cnn serve` on loopback. Every operation is called with
valid and invalid requests (bounded: a few dozen examples each, plus the spec's examples and schemathesis'
boundary cases). Every answer must be no 5xx, carry a documented status, the documented content type and
headers, and a body that matches the documented schema for that status.

(`schemathesis.pytest.from_fixture`, which would load the spec from the live server, fails on pytest 9.2
with schemathesis 4.32: it sets `Function._nodeid`, which pytest no longer has.)
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.settings import Settings
from support.live_server import LiveServer

pytestmark = pytest.mark.integration  # every test here starts a server or another process

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]
CONFIG = {
    "seed": 6,  # the same cases on every run (CI): a failure reproduces
    "generation": {"mode": "all", "database": "none"},  # valid and invalid requests
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "request-timeout": 30,
}
# Per operation in the fuzzing phase (the examples and coverage phases add their own cases); CI runs the default,
# a longer hunt sets FUZZ_MAX_EXAMPLES.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "50"))


@pytest.fixture(scope="module")
def server():
    s = LiveServer(max_batch_size=8)
    yield s
    s.stop()


# Raw image bodies are bytes on the wire; schemathesis knows image/png, jpeg, gif and webp, not bmp.
schemathesis.serializer.alias("image/bmp", "application/octet-stream")

SPEC = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(SPEC, config=schemathesis.Config.from_dict(CONFIG))


def test_the_server_publishes_this_spec(server):
    assert httpx.get(server.url + "/openapi.json", timeout=10).json() == SPEC


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_openapi_spec(case, server):
    case.call_and_validate(base_url=server.url, timeout=30)


# Inputs schemathesis does not generate (they are not valid JSON per RFC 8259, or not UTF-8), found by probing:
# each was a 500 before. Bad input gets a clear 4xx in the endpoint's error shape.
INFER = "/v2/models/puppet-cnn/infer"
BYTES_INPUT = '{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}'


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/classify", b'{"image": "\xe9"}', 400),  # not UTF-8
        ("/classify", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),  # nested too deep to parse
        ("/classify", b'{"image": "AAAA", "depth": Infinity}', 422),
        (INFER, b'{"inputs": [' + BYTES_INPUT.encode() + b'], "parameters": {"depth": Infinity}}', 422),
        (INFER, b'{"inputs": [' + BYTES_INPUT.encode() + b'], "parameters": {"depth": -Infinity}}', 422),
        (
            INFER,
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 100_000 + b"]}]}",
            400,
        ),
        (INFER, b"\xff\xfe{", 400),
    ],
)
def test_malformed_json_is_a_client_error(server, path, body, status):
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v2/"):
        assert isinstance(error, str) and error  # the Open Inference Protocol's shape
    else:
        assert error["code"] and error["message"]


def test_too_many_bytes_inputs_is_413(server):
    n = 65  # one over the default PUPPET_MAX_IMAGES_PER_REQUEST, as for FP32 inputs and /classify
    tensor = {"name": "image_bytes", "shape": [n], "datatype": "BYTES", "data": ["AAAA"] * n}
    r = httpx.post(server.url + INFER, json={"inputs": [tensor]}, timeout=30)
    assert r.status_code == 413 and "limit is 64" in r.json()["error"]
