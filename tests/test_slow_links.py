"""Clients on slow links, over real shaped links: the server in a network namespace of the test's own, the clients
here, each link rate-limited by the kernel (tests/support/shaped_links.py), never by sleeps in the client.

A slow upload is served: its transfer is the client's time, and the request's deadline starts once the body is in
(service/body_pace.py). A body that drips is cut with 408. A normal request on an unshaped link is answered
alongside. `make test` asserts the answers and what the link makes certain (an upload cannot arrive faster than its
link), on a server whose upload limits are scaled down so that a 2 MB body outlasts them; `make test-slow` runs the
shipped limits with a 10 MiB upload too, and the bounds on time and memory, which depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from benchmarks.server_process import SERVER_ENV
from support.crafted_images import phone_photo
from support.live_server import LiveServer
from support.shaped_links import ShapedHost, shaped_host_or_skip

pytestmark = pytest.mark.integration  # every test here starts a server or another process

MB, KB = 1_000_000, 1_000
RATES = {"fast": None, "1MB/s": 1 * MB, "250KB/s": 250 * KB, "200KB/s": 200 * KB, "200x50KB/s": 200 * 50 * KB}
CROWD = 200  # concurrent slow uploads
CROWD_UPLOAD = 256_000  # bytes each: about 5 s at 50 KB/s
QUICK_LIMIT_S = 3  # quick_server's pause limit and rate window (the defaults are 10 s)


@pytest.fixture(scope="module")
def host():
    with shaped_host_or_skip(RATES, "no shaped links here") as h:
        yield h


def _server(host: ShapedHost, **env: str) -> LiveServer:
    return LiveServer(
        command=host.server_command(),
        address=host.address["fast"],
        env=SERVER_ENV | env,
        host="0.0.0.0",
        grpc_port=0,
    )


@pytest.fixture(scope="module")
def server(host):
    """The shipped defaults."""
    s = _server(host)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def quick_server(host):
    """The upload limits scaled down to QUICK_LIMIT_S, so that make test sees a body outlast them in seconds."""
    s = _server(host, PUPPET_READ_TIMEOUT_S=str(QUICK_LIMIT_S), PUPPET_UPLOAD_RATE_WINDOW_S=str(QUICK_LIMIT_S))
    yield s
    s.stop()


@dataclass
class Upload:
    status: int
    seconds: float  # at the client, from the first byte sent to the answer
    body: dict


def _upload(server: LiveServer, host: ShapedHost, link: str, data: bytes) -> Upload:
    url = f"http://{host.address[link]}:{server.port}/classify"
    t0 = time.monotonic()
    r = httpx.post(url, content=data, headers={"Content-Type": "image/jpeg"}, timeout=180)
    return Upload(r.status_code, time.monotonic() - t0, r.json())


def _drip(server: LiveServer, host: ShapedHost, link: str) -> Upload:
    """A PNG's worth of Content-Length, then one byte a second until the server answers."""
    with socket.create_connection((host.address[link], server.port), timeout=30) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        sock.settimeout(1.0)
        answer = b""
        while time.monotonic() - t0 < 60 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"x")
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # closed after the answer
                break
        seconds = time.monotonic() - t0
        sock.settimeout(5)
        try:
            while more := sock.recv(65536):
                answer += more
        except OSError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return Upload(status, seconds, httpx.Response(status, content=body).json() if body else {})


def _normal_requests(server: LiveServer, host: ShapedHost, png: bytes, stop: threading.Event) -> list[tuple]:
    """One small request at a time on the unshaped link until `stop`: (status, seconds) each."""
    outcomes = []
    with httpx.Client(timeout=30) as client:
        url = f"http://{host.address['fast']}:{server.port}/classify"
        while not stop.is_set():
            t0 = time.monotonic()
            status = client.post(url, content=png, headers={"Content-Type": "image/png"}).status_code
            outcomes.append((status, time.monotonic() - t0))
            stop.wait(0.05)
    return outcomes


@pytest.fixture(scope="module")
def png():
    from conftest import REPO

    return open(f"{REPO}/samples/fashion-mnist/test-00001-pullover.png", "rb").read()


def _phone_uploads(server, host, png, large: bool = True) -> tuple[dict[str, Upload], list[tuple]]:
    """Every slow case at once, each on its own link, and normal requests on the unshaped one meanwhile; `large`
    adds the 10 MiB upload (about 52 s)."""
    photo = phone_photo(2 * MB)
    cases = {
        "2MB at 1MB/s": lambda: _upload(server, host, "1MB/s", photo),
        "2MB at 250KB/s": lambda: _upload(server, host, "250KB/s", photo),
        "drip of 1 byte/s": lambda: _drip(server, host, "1MB/s"),
    }
    if large:
        cases["10MiB at 200KB/s"] = lambda: _upload(server, host, "200KB/s", phone_photo(10 * 1024 * 1024))
    stop = threading.Event()
    with cf.ThreadPoolExecutor(len(cases) + 1) as pool:
        normal = pool.submit(_normal_requests, server, host, png, stop)
        futures = {name: pool.submit(case) for name, case in cases.items()}
        outcomes = {name: f.result() for name, f in futures.items()}
        stop.set()
        return outcomes, normal.result()


def _check_phone_uploads(outcomes: dict[str, Upload], normal: list[tuple]) -> None:
    shown = {name: (o.status, round(o.seconds, 1), o.body.get("error")) for name, o in outcomes.items()}
    print(f"slow links: {shown}; {len(normal)} normal requests alongside, slowest {max(t for _, t in normal):.3f} s")
    sizes = {"2MB at 250KB/s": (2 * MB, 250 * KB), "10MiB at 200KB/s": (10 * 1024 * 1024, 200 * KB)}
    for name in outcomes.keys() - {"drip of 1 byte/s"}:
        assert outcomes[name].status == 200, shown
    drip = outcomes["drip of 1 byte/s"]
    assert drip.status == 408 and drip.body["error"]["code"] == "upload_too_slow", shown
    assert normal and {status for status, _ in normal} == {200}, normal
    # the link, not the client, set the pace: no upload arrived faster than its link carries it (less the
    # bucket and the socket buffers' head start)
    for name in outcomes.keys() & sizes.keys():
        size, rate = sizes[name]
        assert outcomes[name].body["timings_ms"]["receive"] / 1000 > 0.7 * size / rate, shown


def test_slow_uploads_are_served_and_a_drip_is_cut(quick_server, host, png):
    """The 2 MB upload at 250 KB/s takes about 8 s, past quick_server's pause limit: its rate is checked and kept."""
    outcomes, normal = _phone_uploads(quick_server, host, png, large=False)
    _check_phone_uploads(outcomes, normal)
    assert outcomes["2MB at 250KB/s"].body["timings_ms"]["receive"] / 1000 > QUICK_LIMIT_S
    assert quick_server.metric("puppet_rejections_total", reason="upload_too_slow") == 1
    assert quick_server.metric("puppet_rejections_total", reason="queue_full") == 0


@pytest.mark.slow
def test_slow_uploads_within_their_bounds(server, host, png):
    outcomes, normal = _phone_uploads(server, host, png)
    _check_phone_uploads(outcomes, normal)
    assert outcomes["drip of 1 byte/s"].seconds < 15
    assert max(t for _, t in normal) < 0.1, sorted(t for _, t in normal)[-5:]


async def _crowd(address: str, port: int, body: bytes, n: int) -> list[int]:
    """`n` uploads at once on raw connections; the status of each."""

    async def one() -> int:
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body)
            )
            writer.write(body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n")
            return int(head.split()[1])
        except (OSError, asyncio.IncompleteReadError):
            return 0
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(n)))


def _crowd_run(server, host, png) -> tuple[list[int], list[tuple], int]:
    """CROWD uploads sharing a link of CROWD x 50 KB/s; meanwhile normal requests on the unshaped link, and the
    worker's resident memory sampled. Returns the crowd's statuses, the normal requests, the peak RSS in bytes."""
    body = phone_photo(CROWD_UPLOAD, width=280, height=280)
    stop = threading.Event()
    peak = [0]

    def rss() -> None:
        while not stop.is_set():
            status = open(f"/proc/{server.proc.pid}/status").read()
            peak[0] = max(peak[0], int(status.split("VmRSS:")[1].split()[0]) * 1024)
            stop.wait(0.05)

    with cf.ThreadPoolExecutor(2) as pool:
        normal = pool.submit(_normal_requests, server, host, png, stop)
        sampler = pool.submit(rss)
        statuses = asyncio.run(_crowd(host.address["200x50KB/s"], server.port, body, CROWD))
        stop.set()
        sampler.result()
        return statuses, normal.result(), peak[0]


def test_two_hundred_slow_uploads_at_once_are_all_served(server, host, png):
    statuses, normal, peak = _crowd_run(server, host, png)
    print(
        f"{CROWD} uploads of {CROWD_UPLOAD:,} bytes sharing {CROWD} x 50 KB/s: {sorted(set(statuses))}; "
        f"{len(normal)} normal requests, slowest {max(t for _, t in normal):.3f} s; worker peak RSS {peak / 2**20:.0f} MiB"
    )
    assert statuses == [200] * CROWD
    assert normal and {status for status, _ in normal} == {200}


@pytest.mark.slow
def test_two_hundred_slow_uploads_keep_latency_and_memory_bounded(server, host, png):
    statuses, normal, peak = _crowd_run(server, host, png)
    assert statuses == [200] * CROWD
    slowest = max(t for _, t in normal)
    print(f"normal requests: {len(normal)}, slowest {slowest * 1000:.0f} ms; worker peak RSS {peak / 2**20:.0f} MiB")
    assert slowest < 0.1 and peak < 2**30
