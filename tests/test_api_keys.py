"""API keys (service/api_keys.py): the file, the check, reloading; then every route of a real server, over HTTP and
gRPC, with the stock clients (tritonclient's and kserve's), a key revoked under load, and SIGHUP.

Keys here are made up for the tests; none is a secret anywhere.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from model import load_dataset
from model.data import encode_png
from service.api_keys import INVALID, MALFORMED, MISSING, ApiKeys, ApiKeysError, check_credentials, parse_keys
from support.live_server import LiveServer

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef-x"
KEYS = f"# test keys\n{ALICE} alice\n\n{BOB}   bob\n"
MODEL = "puppet-cnn"


# -- the file and the check, in this process ---------------------------------------------------------------------
def test_a_keys_file_gives_each_key_its_name_or_a_digest_name():
    keys = parse_keys(f"{KEYS}carol-0123456789abcdef\n", "keys")
    assert [k.name for k in keys][:2] == ["alice", "bob"]
    assert keys[2].name.startswith("key-") and len(keys[2].name) == 12


@pytest.mark.parametrize(
    "text, line",
    [
        ("short bob\n", 1),
        (f"# ok\n{ALICE}\n{'x' * 257}\n", 3),
        (f"{ALICE} a\n{ALICE} b\n", 2),
        ("caf\u00e9-0123456789abcdef\n", 1),
    ],
)
def test_a_bad_key_is_refused_naming_its_line_and_never_the_key(text, line):
    with pytest.raises(ApiKeysError, match=f"keys, line {line}:") as refused:
        parse_keys(text, "keys")
    assert "short" not in str(refused.value) and ALICE not in str(refused.value)


def test_credentials_are_a_bearer_token_or_an_x_api_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    keys = ApiKeys(path)
    assert check_credentials(keys, f"Bearer {ALICE}", None) == "alice"
    assert check_credentials(keys, f"bearer  {BOB} ", None) == "bob"  # the scheme is case-insensitive
    assert check_credentials(keys, None, BOB) == "bob"
    assert check_credentials(keys, None, None) is MISSING
    assert check_credentials(keys, f"Basic {ALICE}", None) is MALFORMED
    assert check_credentials(keys, "Bearer", ALICE) is MALFORMED  # a bad Authorization is not saved by X-API-Key
    assert check_credentials(keys, f"Bearer {ALICE[:-1]}", None) is INVALID
    assert check_credentials(keys, None, ALICE + "x") is INVALID
    assert INVALID.challenge == 'Bearer realm="puppet-cnn", error="invalid_token"'
    assert MISSING.challenge == 'Bearer realm="puppet-cnn"'


def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_keys_in_force(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    keys = ApiKeys(path)
    assert not keys.reload_if_changed()  # unchanged
    path.write_text(f"{ALICE} alice\n")
    assert keys.reload_if_changed()
    assert keys.authenticate(BOB) is None and keys.authenticate(ALICE) == "alice"
    path.write_text(f"{ALICE} alice\nshort\n")
    assert not keys.reload_if_changed()  # refused: the keys in force stay
    assert keys.authenticate(ALICE) == "alice" and "line 2" in caplog.text and "short" not in caplog.text
    path.unlink()
    assert not keys.reload_if_changed() and keys.authenticate(ALICE) == "alice"


def test_an_unreadable_keys_file_stops_the_start(tmp_path):
    with pytest.raises(ApiKeysError, match="cannot read the API keys file"):
        ApiKeys(tmp_path / "absent")


# -- a real server -------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_bad_keys_file_stops_the_server_saying_which_line(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{ALICE} alice\nshort\n")
    with pytest.raises(RuntimeError, match=r"server exited with \d+: .*cannot start: .*keys, line 2") as failed:
        LiveServer(api_keys_file=str(path))
    assert ALICE not in str(failed.value) and "short" not in str(failed.value)


@pytest.fixture(scope="module")
def pngs():
    return [encode_png(img) for img in load_dataset("fashion-mnist", "test").subset(slice(0, 4)).images]


def _keyed_server(keys_file: Path, **settings) -> LiveServer:
    return LiveServer(api_keys_file=str(keys_file), log_level="info", **settings)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(KEYS)
    s = _keyed_server(path)
    yield s
    s.stop()


def _oip_body(pngs) -> dict:
    data = [base64.b64encode(p).decode() for p in pngs]
    return {"inputs": [{"name": "image_bytes", "shape": [len(data)], "datatype": "BYTES", "data": data}]}


def _protected(pngs) -> list[tuple[str, str, dict]]:
    """Every route that needs a key: (method, path, httpx keyword arguments)."""
    png = {"content": pngs[0], "headers": {"Content-Type": "image/png"}}
    return [
        ("POST", "/classify", png),
        ("POST", f"/v2/models/{MODEL}/infer", {"json": _oip_body(pngs)}),
        ("GET", f"/v2/models/{MODEL}", {}),
        ("GET", "/v2", {}),
        ("GET", "/v1/model", {}),
    ]


def _send(url: str, method: str, path: str, kwargs: dict, auth: dict[str, str]) -> httpx.Response:
    kw = {**kwargs, "headers": {**kwargs.get("headers", {}), **auth}}
    return httpx.request(method, url + path, timeout=30, **kw)


def _failures(s: LiveServer) -> dict[str, float]:
    return {r: s.metric("puppet_auth_failures_total", reason=r) for r in ("missing", "malformed", "invalid")}


def test_every_inference_route_needs_a_key_and_takes_either_header(keyed, pngs):
    before = _failures(keyed)
    refused = {
        "missing": {},
        "malformed": {"Authorization": f"Basic {ALICE}"},
        "invalid": {"Authorization": f"Bearer {ALICE[:-1]}x"},
    }
    routes = _protected(pngs)
    for method, path, kw in routes:
        for reason, auth in refused.items():
            r = _send(keyed.url, method, path, kw, auth)
            assert r.status_code == 401, (path, reason, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="puppet-cnn"')
            message = r.json()["error"] if path.startswith("/v2") else r.json()["error"]["message"]
            assert message == {"missing": MISSING, "malformed": MALFORMED, "invalid": INVALID}[reason].message
            if not path.startswith("/v2"):
                assert r.json()["error"]["code"] == "unauthorized"
        for auth in ({"Authorization": f"Bearer {ALICE}"}, {"X-API-Key": BOB}):
            r = _send(keyed.url, method, path, kw, auth)
            assert r.status_code == 200, (path, r.text)
    after = _failures(keyed)
    assert {k: after[k] - before[k] for k in after} == {k: len(routes) for k in refused}


def test_probes_the_api_description_and_metrics_stay_open(keyed):
    for path in (
        "/health/live",
        "/health/ready",
        "/v2/health/live",
        "/v2/health/ready",
        f"/v2/models/{MODEL}/ready",
        "/metrics",
        "/docs",
        "/openapi.json",
    ):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path


def test_the_access_log_names_the_key_and_never_holds_one(keyed, pngs):
    for key in (ALICE, BOB):
        r = httpx.post(
            keyed.url + "/classify",
            content=pngs[0],
            headers={"X-API-Key": key, "X-Request-Id": f"k-{key[0]}", "Content-Type": "image/png"},
        )
        assert r.status_code == 200
    output = keyed.output_with('"request_id":"k-a"', '"request_id":"k-b"')
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    names = {x.get("request_id"): x.get("key_name") for x in lines}
    assert names["k-a"] == "alice" and names["k-b"] == "bob"
    assert ALICE not in keyed.output() and BOB not in keyed.output()


def test_grpc_needs_the_key_for_metadata_and_inference_with_tritonclient(keyed, pngs):
    client = tgrpc.InferenceServerClient(keyed.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)  # probes: open
    tensor = tgrpc.InferInput("image_bytes", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object))
    calls = {
        "ServerMetadata": lambda h: client.get_server_metadata(headers=h),
        "ModelMetadata": lambda h: client.get_model_metadata(MODEL, headers=h),
        "ModelInfer": lambda h: client.infer(MODEL, [tensor], headers=h),
    }
    before = _failures(keyed)
    for name, call in calls.items():
        for headers in (None, {"authorization": f"Bearer {BOB}x"}, {"authorization": BOB}):
            with pytest.raises(InferenceServerException) as refused:
                call(headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED", name
        assert call({"authorization": f"Bearer {ALICE}"}) is not None, name
    after = _failures(keyed)
    assert {k: after[k] - before[k] for k in after} == {"missing": 3, "invalid": 3, "malformed": 3}
    infer = client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {ALICE}"})
    assert infer.as_numpy("probabilities").shape == (len(pngs), 10)


def test_tritonclient_http_sends_the_key_in_its_headers(keyed, pngs):
    client = thttp.InferenceServerClient(keyed.url.removeprefix("http://"))
    tensor = thttp.InferInput("image_bytes", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object))
    with pytest.raises(InferenceServerException, match="API key is required"):
        client.infer(MODEL, [tensor])
    result = client.infer(MODEL, [tensor], headers={"Authorization": f"Bearer {BOB}"})
    assert result.as_numpy("probabilities").shape == (len(pngs), 10)


KSERVE = r"""
import asyncio, base64, json, sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

args = json.load(sys.stdin)
pngs = [base64.b64decode(p) for p in args["pngs"]]


def request():
    tensor = InferInput("image_bytes", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object), binary_data=True)
    return InferRequest("puppet-cnn", [tensor])


async def outcome(call):
    try:
        response = await call()
        return list(response.outputs[0].as_numpy().shape)
    except Exception as e:
        return type(e).__name__ + ": " + str(e)[:200]


async def main():
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    grpc_client = InferenceGRPCClient(args["grpc_target"], timeout=60)
    bearer = "Bearer " + args["key"]
    got = {
        "rest-none": await outcome(lambda: rest.infer(args["url"], request(), model_name="puppet-cnn")),
        "rest-key": await outcome(
            lambda: rest.infer(args["url"], request(), model_name="puppet-cnn", headers={"Authorization": bearer})
        ),
        "grpc-none": await outcome(lambda: grpc_client.infer(request())),
        "grpc-key": await outcome(lambda: grpc_client.infer(request(), headers=(("authorization", bearer),))),
    }
    await rest.close()
    await grpc_client.close()
    print(json.dumps(got))


asyncio.run(main())
"""


def test_kserves_clients_send_the_key(keyed, pngs):
    args = {
        "url": keyed.url,
        "grpc_target": keyed.grpc_target,
        "key": ALICE,
        "pngs": [base64.b64encode(p).decode() for p in pngs],
    }
    r = subprocess.run(
        [sys.executable, "-c", KSERVE], input=json.dumps(args), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rest-key"] == got["grpc-key"] == [len(pngs), 10], got
    assert "401" in got["rest-none"] or "API key is required" in got["rest-none"], got
    assert "UNAUTHENTICATED" in got["grpc-none"] or "API key is required" in got["grpc-none"], got


# -- revoking a key ------------------------------------------------------------------------------------------------
class _Caller(threading.Thread):
    """Sends /classify with one key, one request after another on fresh connections, until stopped: (sent, status)."""

    def __init__(self, url: str, key: str, png: bytes):
        super().__init__(daemon=True)
        self.url, self.key, self.png = url, key, png
        self.outcomes: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            r = httpx.post(
                self.url + "/classify", content=self.png, headers={"X-API-Key": self.key, "Content-Type": "image/png"}
            )
            self.outcomes.append((sent, r.status_code))


def _revoke_under_load(s: LiveServer, path: Path, png: bytes, rewrite) -> float:
    """Bob's key revoked by `rewrite` while both keys are in use: every request with Alice's key is answered 200
    throughout, Bob's are 200 until the first 401 and 401 after it. Returns the seconds from the change to the
    first request refused."""
    callers = [_Caller(s.url, key, png) for key in (ALICE, BOB, ALICE, BOB)]
    for c in callers:
        c.start()
    time.sleep(1.0)
    changed = time.monotonic()
    rewrite(path)
    deadline = changed + 20
    while time.monotonic() < deadline and not any(st == 401 for c in callers[1::2] for _, st in c.outcomes):
        time.sleep(0.05)
    time.sleep(1.0)
    for c in callers:
        c.stopping.set()
    for c in callers:
        c.join(30)
    for c in callers[0::2]:
        assert {st for _, st in c.outcomes} == {200}, "a request with a key in force was refused"
    firsts = []
    for c in callers[1::2]:
        statuses = [st for _, st in c.outcomes]
        assert 401 in statuses, "the revoked key was still accepted"
        k = statuses.index(401)
        assert set(statuses[:k]) == {200} and set(statuses[k:]) == {401}, statuses
        firsts.append(c.outcomes[k][0])
    return max(0.0, min(firsts) - changed)


def _replace_file(path: Path) -> None:
    """As Kubernetes updates a mounted Secret: a new file moved over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(f"{ALICE} alice\n")
    os.replace(tmp, path)


def _revoked_in_place_unseen(path: Path) -> None:
    """Bob's key replaced by another of the same length in the same file, its size and times kept: a change that
    only SIGHUP makes the server see."""
    st = path.stat()
    with open(path, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace(BOB, BOB[::-1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.integration
@pytest.mark.parametrize("bounds", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_revoked_key_is_refused_without_a_restart_while_others_keep_working(tmp_path, pngs, bounds):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    s = _keyed_server(path, metrics_require_key=True)
    try:
        assert httpx.get(s.url + "/metrics").status_code == 401  # on its own setting
        assert httpx.get(s.url + "/metrics", headers={"X-API-Key": ALICE}).status_code == 200
        seconds = _revoke_under_load(s, path, pngs[0], _replace_file)
        print(f"revoked key first refused {seconds * 1000:.0f} ms after the file changed")
        if bounds:
            assert seconds <= 1.0
    finally:
        s.stop()


@pytest.mark.integration
def test_sighup_rereads_the_keys_in_every_worker_process(tmp_path, pngs):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    s = _keyed_server(path, workers=2)
    try:

        def hang_up(p: Path) -> None:
            _revoked_in_place_unseen(p)
            time.sleep(1.0)  # several polls: none sees it
            os.kill(s.proc.pid, signal.SIGHUP)

        _revoke_under_load(s, path, pngs[0], hang_up)
        statuses = {
            httpx.post(s.url + "/classify", content=pngs[0], headers={"X-API-Key": BOB}).status_code for _ in range(20)
        }
        assert statuses == {401}  # on new connections, whichever worker takes them
        assert s.proc.poll() is None  # SIGHUP does not end the supervisor
    finally:
        s.stop()


@pytest.mark.integration
def test_a_grpc_call_with_a_revoked_key_is_refused(tmp_path, pngs):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    s = _keyed_server(path)
    try:
        channel = grpc.insecure_channel(s.grpc_target)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata")
        metadata = (("authorization", f"Bearer {BOB}"),)
        assert live(b"", metadata=metadata) is not None
        _replace_file(path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                live(b"", metadata=metadata)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the revoked key was still accepted over gRPC")
    finally:
        s.stop()
