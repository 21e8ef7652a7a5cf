"""Stock Open Inference Protocol (KServe v2) clients, unchanged, against a real server: tritonclient.http (JSON and
binary tensor data), tritonclient.grpc, and kserve's REST and gRPC clients. Their answers must be /classify's for
the same real images; their errors the documented statuses and gRPC codes; gRPC calls count in the metrics, are
served by every worker process on one port, and are drained on SIGTERM. Also: service/oip_proto/ is current and
is KServe's protocol.

kserve runs in a child process: its messages and tritonclient.grpc's both take the `inference.*` names in
protobuf's default pool, and one process cannot import both.
"""

from __future__ import annotations

import ast
import base64
import filecmp
import gzip
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import REPO
from model import load_checkpoint, load_dataset
from model.data import encode_png
from support.live_server import SHIPPED, LiveServer

pytestmark = pytest.mark.integration  # every test here starts a server or another process


N = 6  # real test images per request
MAX_IMAGES = 8
MAX_UPLOAD = 256 * 1024
MODEL = "puppet-cnn"
INFER = f"/v2/models/{MODEL}/infer"
GRPC_ROUTE = "/inference.GRPCInferenceService/"
PROTO = Path(REPO, "service", "oip_proto")
KSERVE_PB2 = "kserve/protocol/grpc/grpc_predict_v2_pb2.py"


@pytest.fixture(scope="module")
def images():
    data = load_dataset("fashion-mnist", "test").subset(slice(0, N))
    return data.images, [encode_png(img) for img in data.images]


@pytest.fixture(scope="module")
def server():
    s = LiveServer(max_images_per_request=MAX_IMAGES, max_upload_bytes=MAX_UPLOAD)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(server, images):
    """/classify's answer for the images, in one request (so in one batch, as each client's request is): labels,
    depths and every class's probability (rounded to 7 decimals there), at depth auto and 2."""
    out = {}
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(images[1])]
    for depth in ("auto", 2):
        r = httpx.post(server.url + "/classify", files=files, params={"top_k": 10, "depth": depth}, timeout=30)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        probs = np.zeros((N, 10))
        for i, result in enumerate(results):
            for p in result["predictions"]:
                probs[i, p["class_id"]] = p["probability"]
        out[depth] = {
            "labels": [x["predictions"][0]["label"] for x in results],
            "depths": [x["depth"] for x in results],
            "escalated": [x["escalated"] for x in results],
            "probabilities": probs,
        }
    assert out["auto"]["depths"] != out[2]["depths"], "the images should not all be routed to depth 2"
    return out


def assert_matches(expected: dict, labels, depths, probabilities) -> None:
    labels = [x.decode() if isinstance(x, bytes) else x for x in np.asarray(labels).tolist()]
    assert labels == expected["labels"]
    assert np.asarray(depths).tolist() == expected["depths"]
    probabilities = np.asarray(probabilities)
    assert probabilities.shape == (N, 10)
    # float32 values against /classify's, which rounds to 7 decimals
    np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=0, atol=6e-8)


# -- the clients ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", ["auto", 2])
def test_tritonclient_http_json(server, images, expected, depth):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = thttp.InferInput("image_bytes", [N], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(p) for p in images[1]], dtype=object), binary_data=False)
    outputs = [thttp.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "depth", "label")]
    result = client.infer(MODEL, [tensor], outputs=outputs, parameters={"depth": depth}, request_id="r-1")
    response = result.get_response()
    assert response["id"] == "r-1" and all("data" in o for o in response["outputs"])  # JSON both ways
    assert_matches(
        expected[depth], result.as_numpy("label"), result.as_numpy("depth"), result.as_numpy("probabilities")
    )


@pytest.mark.parametrize("depth", ["auto", 2])
def test_tritonclient_http_binary(server, images, expected, depth):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = thttp.InferInput("image_bytes", [N], "BYTES")
    tensor.set_data_from_numpy(np.array(images[1], dtype=object))  # raw image bytes after the JSON header
    result = client.infer(MODEL, [tensor], parameters={"depth": depth})  # no outputs named: all, raw
    assert result.get_output("probabilities")["parameters"] == {"binary_data_size": 4 * N * 10}
    assert result.get_output("escalated")["parameters"] == {"binary_data_size": N}  # BOOL: a byte each
    assert_matches(
        expected[depth], result.as_numpy("label"), result.as_numpy("depth"), result.as_numpy("probabilities")
    )
    assert result.as_numpy("escalated").tolist() == expected[depth]["escalated"]


def test_requested_outputs_only_in_their_order_and_compressed_requests(server, images, expected):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = thttp.InferInput("image_bytes", [N], "BYTES")
    tensor.set_data_from_numpy(np.array(images[1], dtype=object))
    for compression in (None, "gzip", "deflate"):
        result = client.infer(
            MODEL,
            [tensor],
            outputs=[thttp.InferRequestedOutput("label"), thttp.InferRequestedOutput("depth", binary_data=False)],
            request_compression_algorithm=compression,
        )
        outputs = result.get_response()["outputs"]
        assert [o["name"] for o in outputs] == ["label", "depth"]
        assert "parameters" in outputs[0] and outputs[1]["data"] == expected["auto"]["depths"]
        assert [x.decode() for x in result.as_numpy("label")] == expected["auto"]["labels"]


def test_fp32_binary_input(server, images, expected):
    """The normalised tensor, raw: the same classes and depths (probabilities within float error of the round trip
    through normalisation)."""
    x = load_checkpoint(SHIPPED).preprocessing.normalise(images[0]).numpy().astype(np.float32)
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = thttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(MODEL, [tensor])
    assert [v.decode() for v in result.as_numpy("label")] == expected["auto"]["labels"]
    assert result.as_numpy("depth").tolist() == expected["auto"]["depths"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["auto"]["probabilities"], atol=1e-5)
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        tensor = tgrpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor])
    assert result.as_numpy("depth").tolist() == expected["auto"]["depths"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["auto"]["probabilities"], atol=1e-5)


@pytest.mark.parametrize("depth", ["auto", 2])
def test_tritonclient_grpc(server, images, expected, depth):
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL, as_json=True)
        names = ["probabilities", "depth", "label", "escalated"]
        assert meta["name"] == MODEL and [o["name"] for o in meta["outputs"]] == names
        assert client.get_server_metadata(as_json=True)["extensions"] == ["binary_tensor_data"]
        tensor = tgrpc.InferInput("image_bytes", [N], "BYTES")
        tensor.set_data_from_numpy(np.array(images[1], dtype=object))
        result = client.infer(MODEL, [tensor], parameters={"depth": depth}, request_id="g-1")
        assert result.get_response().id == "g-1"
        assert_matches(
            expected[depth], result.as_numpy("label"), result.as_numpy("depth"), result.as_numpy("probabilities")
        )
        assert result.as_numpy("escalated").tolist() == expected[depth]["escalated"]
        subset = client.infer(MODEL, [tensor], outputs=[tgrpc.InferRequestedOutput("depth")])
        assert [o.name for o in subset.get_response().outputs] == ["depth"]
        assert subset.as_numpy("depth").tolist() == expected["auto"]["depths"]


KSERVE_CLIENTS = r"""
import asyncio, base64, json, sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

args = json.load(sys.stdin)
pngs = [base64.b64decode(p) for p in args["pngs"]]


def request(binary: bool) -> InferRequest:
    tensor = InferInput("image_bytes", [len(pngs)], "BYTES")
    values = pngs if binary else [base64.b64encode(p) for p in pngs]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    names = ("probabilities", "depth", "label", "escalated")
    outputs = [RequestedOutput(n, {"binary_data": binary}) for n in names]
    return InferRequest("puppet-cnn", [tensor], parameters={"depth": args["depth"]}, request_outputs=outputs)


def answer(response) -> dict:
    out = {o.name: o.as_numpy() for o in response.outputs}
    labels = [x.decode() if isinstance(x, bytes) else x for x in out["label"].tolist()]
    return {
        "labels": labels,
        "depths": out["depth"].tolist(),
        "probabilities": out["probabilities"].tolist(),
        "escalated": [bool(x) for x in out["escalated"].tolist()],
    }


async def main():
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    got = {}
    for binary in (False, True):
        headers = {}
        response = await rest.infer(args["url"], request(binary), model_name="puppet-cnn", response_headers=headers)
        assert ("inference-header-content-length" in headers) == binary, headers  # raw outputs when asked
        got["rest-binary" if binary else "rest-json"] = answer(response)
    await rest.close()
    grpc_client = InferenceGRPCClient(args["grpc_target"], timeout=60)
    got["grpc-raw"] = answer(await grpc_client.infer(request(True)))  # raw_input_contents
    contents = InferInput("image_bytes", [len(pngs)], "BYTES", data=pngs)  # InferTensorContents.bytes_contents
    got["grpc-contents"] = answer(
        await grpc_client.infer(InferRequest("puppet-cnn", [contents], parameters={"depth": args["depth"]}))
    )
    await grpc_client.close()
    print(json.dumps(got))


asyncio.run(main())
"""


@pytest.mark.parametrize("depth", ["auto", 2])
def test_kserve_clients(server, images, expected, depth):
    args = {
        "url": server.url,
        "grpc_target": server.grpc_target,
        "depth": depth,
        "pngs": [base64.b64encode(p).decode() for p in images[1]],
    }
    r = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENTS], input=json.dumps(args), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answers = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(answers) == {"rest-json", "rest-binary", "grpc-raw", "grpc-contents"}
    for got in answers.values():
        assert_matches(expected[depth], got["labels"], got["depths"], got["probabilities"])
        assert got["escalated"] == expected[depth]["escalated"]


# -- errors --------------------------------------------------------------------------------------------------------
def _http_error(server, tensor, **kwargs) -> InferenceServerException:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as e:
        client.infer(kwargs.pop("model", MODEL), [tensor], **kwargs)
    return e.value


def _grpc_error(server, tensor, **kwargs) -> InferenceServerException:
    with tgrpc.InferenceServerClient(server.grpc_target) as client, pytest.raises(InferenceServerException) as e:
        client.infer(kwargs.pop("model", MODEL), [tensor], **kwargs)
    return e.value


def _bytes_input(module, pngs):
    tensor = module.InferInput("image_bytes", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object))
    return tensor


def test_unknown_model(server, images):
    e = _http_error(server, _bytes_input(thttp, images[1][:1]), model="resnet50")
    assert e.status() == "404" and "'resnet50' is not served here" in e.message()
    e = _grpc_error(server, _bytes_input(tgrpc, images[1][:1]), model="resnet50")
    assert e.status() == "StatusCode.NOT_FOUND" and "'resnet50' is not served here" in e.message()


@pytest.mark.parametrize("depth", [2.7, True, "２", 0, 5, "deep"])
def test_bad_depth_is_422_and_invalid_argument(server, images, depth):
    e = _http_error(server, _bytes_input(thttp, images[1][:1]), parameters={"depth": depth})
    assert e.status() == "422", e
    http_message = e.message()
    e = _grpc_error(server, _bytes_input(tgrpc, images[1][:1]), parameters={"depth": depth})
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and e.message() == http_message
    # an input's own parameter, too
    tensor = _bytes_input(thttp, images[1][:1])
    tensor._parameters["depth"] = depth
    assert _http_error(server, tensor).status() == "422"


def test_too_many_images(server, images):
    pngs = (images[1] * 2)[: MAX_IMAGES + 1]
    e = _http_error(server, _bytes_input(thttp, pngs))
    assert e.status() == "413" and f"the limit is {MAX_IMAGES}" in e.message()
    e = _grpc_error(server, _bytes_input(tgrpc, pngs))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED" and f"the limit is {MAX_IMAGES}" in e.message()


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server):
    too_big = b"{" + b"x" * MAX_UPLOAD  # not JSON: had it been parsed, the answer would be 400
    for content in (too_big, iter([too_big[i : i + 65536] for i in range(0, len(too_big), 65536)])):  # chunked too
        r = httpx.post(server.url + INFER, content=content, timeout=30)
        assert r.status_code == 413 and f"{MAX_UPLOAD:,}" in r.json()["error"], r.text
    # a gzip body is held to the limit once decompressed
    bomb = gzip.compress(b" " * (MAX_UPLOAD + 1))
    r = httpx.post(server.url + INFER, content=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 413 and len(bomb) < MAX_UPLOAD
    # gRPC: the message size limit is the same
    tensor = _bytes_input(tgrpc, [b"\0" * (MAX_UPLOAD + 1)])
    assert _grpc_error(server, tensor).status() == "StatusCode.RESOURCE_EXHAUSTED"


RAW_INPUT = {"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}
JSON_INPUT = {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}


@pytest.mark.parametrize(
    ("request_json", "binary", "fragment"),
    [  # binary None: no Inference-Header-Content-Length
        ({"inputs": [RAW_INPUT]}, None, "no Inference-Header-Content-Length"),
        ({"inputs": [RAW_INPUT]}, b"abc", "binary_data_size 5 is not a byte count within the 3 bytes"),
        ({"inputs": [JSON_INPUT]}, b"abc", "3 bytes of binary data belong to no input"),
        ({"inputs": [RAW_INPUT]}, b"\x09\0\0\0a", "raw BYTES element 0 claims 9 bytes"),
        ({"inputs": [JSON_INPUT], "outputs": [{"name": "logits"}]}, None, "'logits' does not exist"),
        ({"inputs": [JSON_INPUT], "parameters": {"binary_data_output": "yes"}}, None, "must be true or false"),
    ],
)
def test_malformed_binary_requests_are_400(server, request_json, binary, fragment):
    header = json.dumps(request_json).encode()
    headers = {} if binary is None else {"Inference-Header-Content-Length": str(len(header))}
    r = httpx.post(server.url + INFER, content=header + (binary or b""), headers=headers, timeout=30)
    assert r.status_code == 400 and fragment in r.json()["error"], r.text
    r = httpx.post(server.url + INFER, content=b"{}", headers={"Inference-Header-Content-Length": "10"}, timeout=30)
    assert r.status_code == 400 and "Inference-Header-Content-Length is 10" in r.json()["error"], r.text


# -- gRPC in the service: metrics, worker processes, drain ---------------------------------------------------------
def _grpc_requests(server) -> float:
    return sum(
        (
            value
            for (name, labels), value in server.metrics().items()
            if name == "puppet_requests_total" and dict(labels).get("route", "").startswith(GRPC_ROUTE)
        ),
        start=0.0,
    )


def test_every_grpc_call_counts_once(server, images):
    before = _grpc_requests(server)
    before_ok, before_not_found = (
        server.metric("puppet_requests_total", route=GRPC_ROUTE + "ModelInfer", status=status) for status in (200, 404)
    )
    calls = 0
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        for _ in range(3):
            client.infer(MODEL, [_bytes_input(tgrpc, images[1][:2])])
        assert client.is_server_ready() and client.get_model_metadata(MODEL).name == MODEL
        calls += 5
        for model in ("nope", "also-nope"):
            with pytest.raises(InferenceServerException):
                client.infer(model, [_bytes_input(tgrpc, images[1][:1])])
        calls += 2
    assert _grpc_requests(server) - before == calls
    assert server.metric("puppet_requests_total", route=GRPC_ROUTE + "ModelInfer", status="200") - before_ok == 3
    assert server.metric("puppet_requests_total", route=GRPC_ROUTE + "ModelInfer", status="404") - before_not_found == 2


def test_grpc_request_ids_and_refusals_in_the_trailing_metadata(server, images):
    """As X-Request-ID over HTTP: the caller's id when it is a sane token, else a fresh one; on errors too."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), metadata=[("x-request-id", "abc-123")])
        assert ("x-request-id", "abc-123") in call.trailing_metadata()
        fresh = [
            dict(stub.ServerReady.with_call(service_pb2.ServerReadyRequest())[1].trailing_metadata()) for _ in "ab"
        ]
        assert fresh[0]["x-request-id"] != fresh[1]["x-request-id"]
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name=MODEL), metadata=[("x-request-id", "x" * 200)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one input tensor" in e.value.details()
    assert dict(e.value.trailing_metadata())["x-request-id"] != "x" * 200  # unusable: replaced


def test_a_taken_grpc_port_stops_the_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            LiveServer(grpc_port=port)
    assert "exited with 3" in str(e.value) and f"cannot listen for gRPC on 127.0.0.1:{port}" in str(e.value)


def _served_by(output: str) -> set[int]:
    """The processes that logged a ModelInfer call."""
    return {
        record["pid"]
        for record in (
            json.loads(line) for line in output.splitlines() if line.startswith("{") and "ModelInfer" in line
        )
        if record.get("route") == GRPC_ROUTE + "ModelInfer" and record.get("status") == 200
    }


def test_worker_processes_share_the_grpc_port(images, expected):
    s = LiveServer(workers=2, log_level="info")
    try:
        deadline = time.monotonic() + 60
        while len(set(re.findall(r'"pid":(\d+),[^\n]*Open Inference Protocol gRPC service', s.output()))) < 2:
            assert time.monotonic() < deadline, "both workers should serve gRPC"
            time.sleep(0.1)
        for _ in range(16):  # a fresh connection each: the kernel spreads them between the workers' sockets
            with tgrpc.InferenceServerClient(s.grpc_target) as client:
                result = client.infer(MODEL, [_bytes_input(tgrpc, images[1])])
            assert result.as_numpy("depth").tolist() == expected["auto"]["depths"]
    finally:
        output = s.stop()
    assert s.proc.returncode == 0
    assert len(_served_by(output)) == 2, "both worker processes should have answered gRPC calls"


def test_sigterm_drains_grpc_calls(images):
    n, per_call = 8, 64  # at depth 4, one image per model call: each call is in flight for a good while
    s = LiveServer(max_batch_size=1, max_queue=n * per_call, drain_timeout_s=20, request_deadline_ms=60000)
    pngs = (images[1] * per_call)[:per_call]
    answers = []
    with tgrpc.InferenceServerClient(s.grpc_target) as client:
        for _ in range(n):  # together on one channel
            client.async_infer(
                MODEL,
                [_bytes_input(tgrpc, pngs)],
                lambda result, error: answers.append(error or result),
                parameters={"depth": 4},
            )
        deadline = time.monotonic() + 10
        while s.metric("puppet_in_flight_requests") < n // 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        accepted = s.metric("puppet_in_flight_requests") - 1  # less this scrape
        assert accepted >= 2, "the calls should still be in flight"
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [_bytes_input(tgrpc, pngs[:1])])
        assert client.is_server_ready() is False
        rc = s.proc.wait(timeout=30)
    assert refused.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in refused.value.message()
    assert len(answers) == n
    ok = [a for a in answers if not isinstance(a, InferenceServerException)]
    assert len(ok) >= accepted and all(a.as_numpy("depth").tolist() == [4] * per_call for a in ok), answers
    assert all(a.status() == "StatusCode.UNAVAILABLE" for a in answers if a not in ok)
    assert rc == 0, s.output()[-3000:]


# -- the protocol's definition -------------------------------------------------------------------------------------
def _serialized_file(pb2: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated *_pb2.py registers, read from its source (importing it would register it)."""
    calls = [
        n
        for n in ast.walk(ast.parse(pb2.read_text()))
        if getattr(getattr(n, "func", None), "attr", "") == "AddSerializedFile"
    ]
    proto = descriptor_pb2.FileDescriptorProto.FromString(calls[0].args[0].value)
    proto.ClearField("name")
    return proto


def test_the_proto_is_kserves():
    kserve_pb2 = Path(importlib.util.find_spec("kserve").origin).parent.parent / KSERVE_PB2  # found, not imported
    assert _serialized_file(PROTO / "grpc_predict_v2_pb2.py") == _serialized_file(kserve_pb2)


def test_the_generated_code_is_current(tmp_path):
    (tmp_path / "service" / "oip_proto").mkdir(parents=True)
    proto = "service/oip_proto/grpc_predict_v2.proto"
    (tmp_path / proto).write_text((Path(REPO) / proto).read_text())
    r = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--grpc_python_out=.", proto],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "service" / "oip_proto" / name, PROTO / name, shallow=False), (
            f"service/oip_proto/{name} is stale: regenerate it (the command is in {proto})"
        )
