"""Hostile and odd requests against a real server: every case gets a clear 4xx (or is closed), and none may
stall the worker, raise a 5xx anywhere (answer or metrics), log a traceback or break the one-JSON-line log.

One module-scoped server (read timeout 1 s so the slow cases are quick) runs the corpus; a thread polls
/health/live throughout, and the server's RSS is sampled. The figures go to docs/reliability.md.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

from model import load_dataset
from model.data import encode_png
from support.crafted_images import chunk, exif_flood_png, zero_png
from support.live_server import LiveServer

pytestmark = pytest.mark.integration  # every test here starts a server or another process

READ_TIMEOUT_S = 1.0
CLIENT_CLOSED = 499


@pytest.fixture(scope="module")
def server():
    s = LiveServer(read_timeout_s=READ_TIMEOUT_S, log_level="info", max_batch_size=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def png():
    return encode_png(load_dataset("fashion-mnist", "test").images[0])


HEALTH_BOUND_S = 0.5  # every case; tests/test_upload_budget.py holds the worst allowed upload to 100 ms
FIGURES: dict[str, dict] = {}  # per case: slowest health answer, peak RSS; printed at the end (docs/reliability.md)


class HealthProbe:
    """Polls /health/live every 20 ms on its own connection, and samples the server's RSS; the slowest answer,
    any failure and the peak RSS are kept."""

    def __init__(self, server: LiveServer):
        self.server, self.slowest, self.failures, self.peak_rss = server, 0.0, [], 0
        self._stop, self._sampled = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.server.url + "/health/live").status_code == 200
                except httpx.TransportError as e:
                    ok = f"{type(e).__name__}"
                self.slowest = max(self.slowest, time.perf_counter() - t0)
                if ok is not True:
                    self.failures.append(ok)
                self.peak_rss = max(self.peak_rss, self.server.process_stats()["rss"])
                self._sampled.set()
                self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._sampled.wait(5)  # at least one answer, however quick the case
        self._stop.set()
        self._thread.join()


@pytest.fixture(autouse=True)
def health_during_case(server, request):
    """Every case runs with /health/live polled: it must keep answering, quickly."""
    with HealthProbe(server) as probe:
        yield probe
    FIGURES[request.node.name] = {"health_max_ms": round(probe.slowest * 1000, 1), "peak_rss_mb": probe.peak_rss >> 20}
    assert not probe.failures and probe.slowest < HEALTH_BOUND_S, (probe.failures, probe.slowest)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if FIGURES:
        print(f"\n{'case':<90} health max ms  peak RSS MB")
        for name, f in FIGURES.items():
            print(f"{name:<90} {f['health_max_ms']:>13} {f['peak_rss_mb']:>12}")
        if path := os.environ.get("HOSTILE_REPORT"):
            with open(path, "w") as out:
                json.dump(FIGURES, out, indent=1)


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int | None, dict, bytes, float]:
    """(status, headers, body, seconds) of the one response on `sock`, read until the server closes; status
    None when it closed without answering."""
    t0 = time.perf_counter()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    elapsed = time.perf_counter() - t0
    if not data:
        return None, {}, b"", elapsed
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body, elapsed


def _requests_total(server) -> dict[str, float]:
    """puppet_requests_total summed by status, less the health probe's and the scrapes' own requests."""
    out: dict[str, float] = {}
    for (name, labels), value in server.metrics().items():
        labels = dict(labels)
        if name == "puppet_requests_total" and labels.get("route") not in ("/health/live", "/metrics"):
            out[labels["status"]] = out.get(labels["status"], 0) + value
    return out


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What puppet_requests_total moved by between two scrapes."""
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
    return {k: v for k, v in diff.items() if v}


def test_a_slow_request_head_gets_408_and_is_closed(server):
    before = _requests_total(server)
    with _connect(server) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")  # and nothing more
        status, headers, body, elapsed = _read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert elapsed > READ_TIMEOUT_S * 0.9  # it waited the timeout (how much longer is the machine's speed)
    assert _moved(before, _requests_total(server)) == {"408": 1}


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    before = _requests_total(server)
    with _connect(server) as sock:
        status, _, _, elapsed = _read_response(sock)
    assert status is None and elapsed > READ_TIMEOUT_S * 0.9
    assert _moved(before, _requests_total(server)) == {}  # no request was made, none is counted


def test_a_kept_alive_connection_gets_the_same_head_deadline(server, png):
    with _connect(server) as sock:
        request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHo")  # the second request's head never completes
        status, _, _, _ = _read_response(sock)
    assert status == 408


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * (8 << 20) + b"\r\n",  # one 8 MB header line
        b"".join(b"X-%d: y\r\n" % i for i in range(100_000)),  # 100,000 headers
    ],
    ids=["8MB-line", "100k-headers"],
)
def test_an_oversized_request_head_gets_431_and_is_closed(server, head):
    before = _requests_total(server)
    with _connect(server) as sock:
        try:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: the answer is already in our receive buffer
        status, headers, body, _ = _read_response(sock)
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "header_too_large"
    assert _moved(before, _requests_total(server)) == {"431": 1}


def test_a_body_shorter_than_its_content_length_gets_408(server, png):
    with _connect(server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(png)
            + png[:100]
        )
        status, headers, body, _ = _read_response(sock)
    assert status == 408 and headers["connection"] == "close", body
    assert json.loads(body)["error"] == {
        "code": "request_timeout",
        "message": f"no byte of the request body arrived for {READ_TIMEOUT_S:g} s",
    }


def test_a_body_dripping_byte_by_byte_is_cut_for_its_rate(server, png):
    """The pause limit would never fire on a client that sends a byte every 100 ms: once the body has taken longer
    than the read timeout, its rate is below the minimum (service/body_pace.py)."""
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v2/models/puppet-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        t0 = time.perf_counter()
        sock.settimeout(0.1)
        answer = b""
        while time.perf_counter() - t0 < READ_TIMEOUT_S + 3:
            try:
                sock.sendall(b" ")
                answer += sock.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(5)
        while answer and (more := sock.recv(65536)):  # the rest of the answer, until the server closes
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]  # /v2: the Open Inference Protocol's shape
    assert error.startswith("the request body arrived at ") and "must keep at least 16,384 bytes/s" in error, error


def test_many_slow_heads_are_all_closed(server):
    socks = [_connect(server) for _ in range(100)]
    try:
        for sock in socks:
            sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n")
        statuses = [_read_response(sock)[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [408] * len(socks)


def test_a_client_that_aborts_its_upload_is_logged_as_client_closed_not_as_an_error(server, png):
    before = _requests_total(server)
    with _connect(server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n"
            b"X-Request-Id: abort-me\r\n\r\n" + png
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while _requests_total(server).get(str(CLIENT_CLOSED), 0) == before.get(str(CLIENT_CLOSED), 0):
        assert time.monotonic() < deadline, "the abort was never counted"
        time.sleep(0.05)
    after = _requests_total(server)
    assert after.get(str(CLIENT_CLOSED), 0) - before.get(str(CLIENT_CLOSED), 0) == 1
    assert not any(k.startswith("5") and after[k] != before.get(k, 0) for k in after)
    output = server.output_with('"request_id":"abort-me"')
    line = next(json.loads(x) for x in output.splitlines() if '"request_id":"abort-me"' in x)
    assert line["status"] == CLIENT_CLOSED and line["error"] == "client_closed" and line["level"] == "info"
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity", b"chunked, chunked", b"compress"])
def test_transfer_codings_other_than_chunked_are_refused(server, png, coding):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(png), png)
    with _connect(server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: %s\r\n\r\n" % coding
            + chunked
        )
        status, headers, body, _ = _read_response(sock)
    assert status == 400 and headers["connection"] == "close", (status, body)
    if headers.get("content-type") == "application/json":  # else httptools refused the framing itself
        assert json.loads(body)["error"]["code"] == "unsupported_transfer_coding"


def test_plain_chunked_uploads_still_work(server, png):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(png), png)
    with _connect(server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunked
        )
        status, _, body, _ = _read_response(sock)
    assert status == 200, body


def test_an_exif_flood_costs_nothing_and_logs_nothing(server, png):
    """Pillow's full EXIF parse took 60 ms and raised 17,600 warnings for this 240 KB upload; only the orientation
    is read now, with bounded work (service/exif.py), so its only log line is its access line."""
    data = exif_flood_png()
    mark = len(server.output())
    ids = [f"exif-flood-{i}" for i in range(3)]
    for request_id in ids:
        headers = {"Content-Type": "image/png", "X-Request-Id": request_id}
        r = httpx.post(server.url + "/classify", content=data, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    server.output_with(*(f'"request_id":"{i}"' for i in ids))
    time.sleep(0.2)  # and anything else it would log about them
    records = [json.loads(line) for line in server.output()[mark:].splitlines()]
    assert [x["logger"] for x in records] == ["puppet.access"] * 3


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _many_frames_gif(frames: int) -> bytes:
    first, *rest = [Image.new("L", (64, 64), i % 256) for i in range(frames)]
    return _encoded(first, "GIF", save_all=True, append_images=rest)


def _declared(fmt: str, width: int, height: int) -> bytes:
    """A tiny file whose header declares a huge bitmap."""
    if fmt == "BMP":
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + bytes(16)
    if fmt == "GIF":
        return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x2c" + bytes(9) + b"\x02\x02D\x01\x00;"
    raise ValueError(fmt)


def _png_with_text_bomb() -> bytes:
    """A PNG with a compressed text chunk that inflates to 64 MB (Pillow stops at 1 MB of text)."""
    png = zero_png(28, 28, 0, 8)
    bomb = chunk(b"zTXt", b"comment\0\0" + zlib.compress(bytes(64 << 20), 9))
    return png[:33] + bomb + png[33:]


def _json(payload) -> tuple[dict, bytes]:
    return {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _raw(content_type: str, body: bytes) -> tuple[dict, bytes]:
    return {"Content-Type": content_type}, body


def _v2(datatype: str, shape: list, data: list, **params) -> tuple[dict, bytes]:
    return _json({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}], "parameters": params})


def _multipart(parts: int, png: bytes) -> tuple[dict, bytes]:
    boundary = "hostile"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
        for i in range(parts)
    )
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body + f"--{boundary}--\r\n".encode()


def _tall() -> bytes:
    return zero_png(1, 40_000_000, 0, 8)  # the attack: 80 KB, 40 M pixels


def _wrapped(png: bytes) -> str:
    return base64.encodebytes(png).decode()  # coreutils' line breaks every 76 characters


def _corpus():
    """(case, path, the request as a function of a real PNG -> (headers, body), the statuses allowed), one request
    each: decompression shapes, odd encodings, floods in one request. Each must get one of its statuses; none a
    5xx. Bodies are made when their case runs."""
    cls, v2 = "/classify", "/v2/models/puppet-cnn/infer"
    return [
        # decompression shapes: refused from the header, or decoded within the budget
        ("png-1x40M", cls, lambda png: _raw("image/png", _tall()), {413}),
        ("json-4x-png-1x40M", cls, lambda png: _json({"images": [_b64(_tall())] * 4}), {413}),
        ("png-16bit-6324x6324", cls, lambda png: _raw("image/png", zero_png(6324, 6324, 0, 16)), {413}),
        ("png-rgba-4000x4000-zeros", cls, lambda png: _raw("image/png", zero_png(4000, 4000, 6, 8)), {200}),
        ("png-ztxt-inflating-to-64MB", cls, lambda png: _raw("image/png", _png_with_text_bomb()), {200, 400}),
        ("bmp-declaring-60000x60000", cls, lambda png: _raw("image/bmp", _declared("BMP", 60000, 60000)), {413}),
        ("gif-declaring-65535x65535", cls, lambda png: _raw("image/gif", _declared("GIF", 65535, 65535)), {413}),
        ("gif-2000-frames", cls, lambda png: _raw("image/gif", _many_frames_gif(2000)), {200}),
        ("v2-bytes-png-1x40M", v2, lambda png: _v2("BYTES", [1], [_b64(_tall())]), {413}),
        # odd encodings
        ("base64-line-wrapped", cls, lambda png: _json({"image": _wrapped(png)}), {200}),
        ("base64-crlf-wrapped", cls, lambda png: _json({"image": _wrapped(png).replace("\n", "\r\n")}), {200}),
        (
            "base64-url-safe-unpadded",
            cls,
            lambda png: _json({"image": base64.urlsafe_b64encode(png).decode().rstrip("=")}),
            {200},
        ),
        ("base64-data-uri", cls, lambda png: _json({"image": "data:image/png;base64," + _b64(png)}), {200}),
        ("base64-garbage", cls, lambda png: _json({"image": "!!!not base64!!!"}), {400}),
        ("depth-full-width-digit", cls + "?depth=%EF%BC%92", lambda png: _raw("image/png", png), {422}),
        ("depth-float-json", cls, lambda png: _json({"image": _b64(png), "depth": 2.7}), {422}),
        ("depth-plus-sign", cls + "?depth=%2B2", lambda png: _raw("image/png", png), {422}),
        ("top-k-exponent", cls + "?top_k=1e3", lambda png: _raw("image/png", png), {422}),
        ("v2-depth-float", v2, lambda png: _v2("BYTES", [1], [_b64(png)], depth=2.7), {422}),
        ("v2-depth-full-width", v2, lambda png: _v2("BYTES", [1], [_b64(png)], depth="２"), {422}),
        (
            "v2-fp32-nan",
            v2,
            lambda png: _json(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": ["NaN"] * 784}]}
            ),
            {400, 422},
        ),
        ("v2-shape-overflow", v2, lambda png: _v2("FP32", [2**62, 1, 28, 28], [0.0]), {400, 413}),
        (
            "v2-binary-header-longer-than-body",
            v2,
            lambda png: ({"Inference-Header-Content-Length": "100000"}, b"{}"),
            {400},
        ),
        ("json-not-utf8", cls, lambda png: _raw("application/json", b'{"image": "\xff\xfe"}'), {400}),
        ("json-nested-100k", cls, lambda png: _raw("application/json", b"[" * 100_000 + b"]" * 100_000), {400, 422}),
        (
            "json-huge-number",
            cls,
            lambda png: _raw("application/json", b'{"image": "x", "top_k": 1' + b"0" * 5000 + b"}"),
            {400, 422},
        ),
        ("content-type-text", cls, lambda png: _raw("text/plain", png), {415}),
        ("content-type-missing", cls, lambda png: ({}, png), {415}),
        ("multipart-no-boundary", cls, lambda png: _raw("multipart/form-data", png), {400}),
        ("body-over-limit", cls, lambda png: _raw("image/png", bytes(11 << 20)), {413}),
        ("v2-body-over-limit", v2, lambda png: _raw("application/json", b" " * (11 << 20)), {413}),
        # floods within one request
        ("multipart-64-images", cls, lambda png: _multipart(64, png), {200}),
        ("multipart-65-images", cls, lambda png: _multipart(65, png), {400, 413}),
        ("multipart-10000-parts", cls, lambda png: _multipart(10_000, b"x"), {400, 413}),
        ("json-65-images", cls, lambda png: _json({"images": [_b64(png)] * 65}), {413}),
        ("v2-65-images", v2, lambda png: _v2("BYTES", [65], [_b64(png)] * 65), {413}),
    ]


@pytest.mark.parametrize("case", _corpus(), ids=lambda case: case[0])
def test_corpus(server, png, case):
    name, path, make, allowed = case
    headers, body = make(png)
    r = httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    assert r.status_code in allowed, (name, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error if path.startswith("/v2") else error["message"], r.text  # a message says what is wrong


def test_a_burst_of_tiny_requests_gets_only_200_or_429(server, png):
    with cf.ThreadPoolExecutor(32) as pool, httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32)) as c:
        statuses = list(
            pool.map(
                lambda _: (
                    c.post(server.url + "/classify", content=png, headers={"Content-Type": "image/png"}).status_code
                ),
                range(500),
            )
        )
    assert set(statuses) <= {200, 429} and statuses.count(200) > 0


def test_pipelined_requests_are_all_answered_in_order(server, png):
    request = b"POST /classify?top_k=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s"
    with _connect(server) as sock:
        sock.sendall(
            b"".join(request % (len(png), png) for _ in range(50))
            + b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk_ := sock.recv(65536):
            data += chunk_
    assert data.count(b"HTTP/1.1 200 OK") == 51, data[:500]


def test_aborts_mid_multipart_and_mid_v2_are_client_closed(server, png):
    headers, body = _multipart(8, png)
    before = _requests_total(server)
    for path, head, payload in [
        ("/classify", headers, body),
        ("/v2/models/puppet-cnn/infer", *_v2("BYTES", [1], [_b64(png)])),
    ]:
        with _connect(server) as sock:
            lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{lines}Content-Length: {len(payload) * 2}\r\n\r\n".encode()
                + payload
            )
            time.sleep(0.2)
    deadline = time.monotonic() + 5
    while _moved(before, _requests_total(server)).get(str(CLIENT_CLOSED), 0) < 2:
        assert time.monotonic() < deadline, _moved(before, _requests_total(server))
        time.sleep(0.05)
    assert _moved(before, _requests_total(server)) == {str(CLIENT_CLOSED): 2}


def test_every_log_line_is_json_and_nothing_was_a_server_error(server):
    """Runs last in this module: the whole corpus above left no 5xx and no traceback, and the server still serves."""
    for line in server.output().splitlines():
        record = json.loads(line)
        assert "exception" not in record, record
    counts = _requests_total(server)
    assert not {k: v for k, v in counts.items() if k.startswith("5")}, counts
