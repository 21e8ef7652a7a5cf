"""Hostile and odd requests against a real server: every case gets a clear 4xx (or is closed), and none may
stall the worker, raise a 5xx anywhere (answer or metrics), log a traceback or break the one-JSON-line log.

One module-scoped server (read timeout 1 s so the slow cases are quick) runs the corpus; a thread polls
/health/live throughout, and the server's RSS is sampled. The figures go to docs/reliability.md.
"""

from __future__ import annotations

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
from live_server import LiveServer
from PIL import Image

from model import load_dataset
from model.data import encode_png

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
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if (
            line.startswith("puppet_requests_total{")
            and 'route="/health/live"' not in line
            and 'route="/metrics"' not in line
        ):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0) + float(line.rpartition(" ")[2])
    return out


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What puppet_requests_total moved by between two scrapes."""
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
    return {k: v for k, v in diff.items() if v}


def exif_flood_png(tags: int = 20000) -> bytes:
    """A 28x28 PNG whose EXIF block declares `tags` entries, each pointing past the data: Pillow warns once per
    tag (17,600 warnings for this one)."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, "PNG")
    png = buf.getvalue()
    entries = b"".join(struct.pack("<HHII", 1000 + i, 7, 100, 8) for i in range(tags))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", tags) + entries + struct.pack("<I", 0)
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_a_slow_request_head_gets_408_and_is_closed(server):
    before = _requests_total(server)
    with _connect(server) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")  # and nothing more
        status, headers, body, elapsed = _read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT_S * 0.9 < elapsed < READ_TIMEOUT_S + 2
    assert _moved(before, _requests_total(server)) == {"408": 1}


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    before = _requests_total(server)
    with _connect(server) as sock:
        status, _, _, elapsed = _read_response(sock)
    assert status is None and READ_TIMEOUT_S * 0.9 < elapsed < READ_TIMEOUT_S + 2
    assert _moved(before, _requests_total(server)) == {}  # no request was made, none is counted


def test_a_kept_alive_connection_gets_the_same_head_deadline(server, png):
    with _connect(server) as sock:
        request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHo")  # the second request's head never completes
        status, _, _, elapsed = _read_response(sock)
    assert status == 408 and elapsed < READ_TIMEOUT_S + 2


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
        status, headers, body, elapsed = _read_response(sock)
    assert status == 408 and headers["connection"] == "close", body
    assert json.loads(body)["error"] == {
        "code": "request_timeout",
        "message": f"the request body did not arrive within {READ_TIMEOUT_S:g} s",
    }
    assert elapsed < READ_TIMEOUT_S + 2


def test_a_body_dripping_byte_by_byte_is_cut_at_the_deadline(server, png):
    """An idle timeout would never fire on a client that sends a byte every 100 ms; the deadline is on the whole body."""
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
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": f"the request body did not arrive within {READ_TIMEOUT_S:g} s"
    }  # /v2 answers in the Open Inference Protocol's error shape
    assert time.perf_counter() - t0 < READ_TIMEOUT_S + 2


def test_many_slow_heads_are_all_closed(server):
    socks = [_connect(server) for _ in range(100)]
    try:
        for sock in socks:
            sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n")
        t0 = time.perf_counter()
        statuses = [_read_response(sock)[0] for sock in socks]
        elapsed = time.perf_counter() - t0
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [408] * len(socks) and elapsed < READ_TIMEOUT_S + 3


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
    line = next(json.loads(x) for x in server.output().splitlines() if '"request_id":"abort-me"' in x)
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
    for _ in range(3):
        r = httpx.post(server.url + "/classify", content=data, headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
    time.sleep(0.2)
    records = [json.loads(line) for line in server.output()[mark:].splitlines()]
    assert [x["logger"] for x in records] == ["puppet.access"] * 3


def test_every_log_line_is_json_and_nothing_was_a_server_error(server):
    """Runs last in this module: the whole corpus above left no 5xx and no traceback."""
    for line in server.output().splitlines():
        record = json.loads(line)
        assert "exception" not in record, record
    counts = _requests_total(server)
    assert not {k: v for k, v in counts.items() if k.startswith("5")}, counts
