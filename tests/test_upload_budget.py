"""The pixel budget against a real server (issue 12): the worst uploads the limits allow may not stall the
event loop or grow the worker's memory, and anything over the limits is refused from its headers.

One server per environment: `puppet-cnn serve` as it serves (one worker), in the environment it gives itself
(service/process_env.py: glibc keeps up to 256 MB at the top of each heap there), and the same with glibc's
allocator defaults. While the worst allowed images are classified, alone and several at
once, two threads poll /health/live and /health/ready on their own connections and a third samples the
server's resident memory (/proc/<pid>/status):

- every health answer within 100 ms;
- resident memory under 1 GB throughout, and back within 10% of its warm baseline afterwards;
- over the limits: 413 `too_many_pixels`, naming the image(s) and the numbers, in the time it takes to read
  the headers (no decode: memory does not move).

The worst allowed images, at the default limits (16 M pixels per image, 25 M per request): a 16-bit RGBA PNG
as tall as allowed (245 x 65,304; 8 bytes a pixel, one row each 245 pixels), the same 4000 x 4000, a 16-bit
greyscale PNG (the 6324 x 6324 attack, at the limit), a palette PNG with transparency (expanded to RGBA), a
lossless WebP (libwebp decodes into two full-size canvases), a 4000 x 4000 progressive JPEG of noise whose
largest scan is repeated up to the scan limit (libjpeg passes over the image once per scan), and a request of
two PNGs holding the per-request maximum, in base64 JSON.
Figures are printed per environment (pytest -s).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from model import load_dataset
from model.data import encode_png
from service.imaging import MAX_JPEG_SCANS, MAX_SIDE, MAX_WEBP_PIXELS
from service.settings import Settings
from support.crafted_images import zero_png
from support.live_server import LiveServer

pytestmark = pytest.mark.integration  # every test here starts a server or another process

MAX_PIXELS = Settings.model_fields["max_pixels"].default
MAX_REQUEST_PIXELS = Settings.model_fields["max_request_pixels"].default
HEALTH_BOUND_S = 0.100  # while any single allowed upload is processed
# while all seven worst are, at once: this, or STALL_RATIO times the slowest answer with one at a time, whichever
# is larger (the stalls are decoding chunks that hold the interpreter lock, so they scale with the CPU's speed;
# on the 2-core Xeon, quiet: 13-21 ms against 10-15 ms alone, 53-107 ms against 32 ms in make serve's environment)
CONCURRENT_HEALTH_BOUND_S = 0.250
STALL_RATIO = 5
RSS_BOUND = 1_000_000_000
RSS_RETURN = 1.10  # within 10% of the warm baseline


# `puppet-cnn serve` as it serves (it gives itself service/process_env.py's environment), and the same command run
# with glibc's allocator defaults: main(["serve"]) serves in the process as started, without re-executing.
GLIBC_DEFAULTS = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(['serve']))"]
ENVIRONMENTS = {"glibc-defaults": GLIBC_DEFAULTS, "served": None}


def _scans(jpeg: bytes) -> list[tuple[int, int]]:
    """Where each scan of a JPEG lies (its SOS segment and entropy-coded data)."""
    at, out = 2, []
    while at < len(jpeg) and jpeg[at + 1] != 0xD9:
        end = at + 2 + struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
        if jpeg[at + 1] == 0xDA:  # entropy-coded data runs to the next marker other than RSTn or a stuffed 0xFF
            while jpeg[(end := jpeg.index(b"\xff", end)) + 1] == 0 or 0xD0 <= jpeg[end + 1] <= 0xD7:
                end += 2
            out.append((at, end))
        at = end
    return out


def worst_jpeg(side: int) -> bytes:
    """The most expensive JPEG found within the limits: progressive, of noise, one of its scans repeated up to
    MAX_JPEG_SCANS scans or the byte limit (libjpeg makes a pass over the image per scan)."""
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", progressive=True, quality=30)
    scans, room = _scans(data), Settings.model_fields["max_upload_bytes"].default * 0.95 - len(data)

    def copies(scan: tuple[int, int]) -> int:
        return int(min(MAX_JPEG_SCANS - len(scans), room // (scan[1] - scan[0])))

    # the scan whose copies fill the most bytes: of each scan repeated, this decoded slowest (0.5 s, 2 cores)
    start, end = max(scans, key=lambda scan: copies(scan) * (scan[1] - scan[0]))
    return data[: scans[-1][1]] + data[start:end] * copies((start, end)) + data[scans[-1][1] :]


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


class Upload:
    def __init__(self, name: str, body: bytes, content_type: str, pixels: int, dimensions: str = ""):
        self.name, self.body, self.content_type, self.pixels = name, body, content_type, pixels
        self.dimensions = dimensions


def _json(name: str, images: list[bytes], pixels: int) -> Upload:
    body = json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()
    return Upload(name, body, "application/json", pixels)


@pytest.fixture(scope="module")
def worst() -> list[Upload]:
    """The worst uploads the default limits allow, each at (or, for two, summing to) the pixel limits."""
    tall_w = -(-MAX_PIXELS // MAX_SIDE)  # the narrowest image at the pixel limit within the side limit
    tall_h = MAX_PIXELS // tall_w
    side = int(MAX_PIXELS**0.5)
    webp_side = int(min(MAX_PIXELS, MAX_WEBP_PIXELS) ** 0.5)  # WebP has a lower limit (service/imaging.py)
    rest = MAX_REQUEST_PIXELS - tall_w * tall_h  # a second image filling the request's budget
    rest_w = -(-rest // MAX_SIDE)
    uploads = [
        Upload("png-rgba16-tall", zero_png(tall_w, tall_h, 6, 16), "image/png", tall_w * tall_h, f"{tall_w}x{tall_h}"),
        Upload("png-rgba16-square", zero_png(side, side, 6, 16), "image/png", side * side),
        Upload("png-grey16-square", zero_png(side, side, 0, 16), "image/png", side * side),
        Upload("png-palette-transparent", zero_png(side, side, 3, 8), "image/png", side * side),
        Upload(
            "webp-lossless-rgba",
            _encode(Image.new("RGBA", (webp_side, webp_side), (9, 99, 199, 5)), "WEBP", lossless=True),
            "image/webp",
            webp_side * webp_side,
        ),
        Upload(f"jpeg-{MAX_JPEG_SCANS}-scans", worst_jpeg(side), "image/jpeg", side * side),
        _json(
            "json-request-maximum",
            [zero_png(tall_w, tall_h, 6, 16), zero_png(rest_w, rest // rest_w, 6, 8)],
            tall_w * tall_h + rest_w * (rest // rest_w),
        ),
    ]
    assert all(u.pixels <= MAX_REQUEST_PIXELS for u in uploads)
    assert max(u.pixels for u in uploads) > 0.99 * MAX_REQUEST_PIXELS
    assert all(len(u.body) < Settings.model_fields["max_upload_bytes"].default for u in uploads)
    return uploads


@pytest.fixture(scope="module")
def sample_png() -> bytes:
    return encode_png(load_dataset("fashion-mnist", "test").images[0])


@pytest.fixture(scope="module", params=list(ENVIRONMENTS), ids=list(ENVIRONMENTS))
def server(request, sample_png):
    # The request deadline raised from 2 s: every worst upload must be decoded, for its stall and its memory to
    # be measured. At 2 s, admission refuses (429) what is left with under 40% of the deadline once decoded,
    # which on a slower or busier CPU the worst JPEG reaches alone (0.5 s on the 2-core Xeon when quiet; a run
    # with training on both cores got 429 for it). Admission by time has its own tests (test_reliability.py,
    # test_service_load.py).
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    s = LiveServer(command=ENVIRONMENTS[request.param], base_env=base, request_deadline_ms=60_000)
    s.env_name = request.param
    # warm: every format's plugin imported, the decoding threads started, a batch run
    for body, kind in [
        (sample_png, "image/png"),
        (_encode(Image.new("RGB", (1024, 1024), (1, 2, 3)), "JPEG"), "image/jpeg"),
        (_encode(Image.new("RGBA", (600, 600), (1, 2, 3, 4)), "WEBP"), "image/webp"),
        (zero_png(1024, 1024, 6, 16), "image/png"),
    ] * 2:
        r = httpx.post(s.url + "/classify", content=body, headers={"Content-Type": kind}, timeout=30)
        assert r.status_code == 200, r.text
    yield s
    s.stop()


# The health probes run in a process of their own, as a kubelet's do: the test's own threads (uploading tens of
# MB) would otherwise hold this interpreter's lock and slow the probes' own bookkeeping, not the server's answers.
PROBE = """
import sys, threading, time, json, httpx
url, stop, out = sys.argv[1], threading.Event(), {"live": [], "ready": [], "failures": []}
def poll(which):
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status = client.get(f"{url}/health/{which}").status_code
            except httpx.TransportError as e:
                status = type(e).__name__
            out[which].append(time.perf_counter() - t0)
            if status != 200:
                out["failures"].append([which, status])
            stop.wait(0.01)
threads = [threading.Thread(target=poll, args=(w,)) for w in ("live", "ready")]
for t in threads:
    t.start()
print("polling", flush=True)
sys.stdin.read()  # until the test closes it
stop.set()
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""


class Monitor:
    """Polls /health/live and /health/ready concurrently (a process of its own, one connection each, every
    10 ms) and samples the server's RSS every 10 ms; keeps every latency, failure and sample."""

    def __init__(self, server: LiveServer):
        self.server, self.latency, self.failures, self.rss = server, {}, [], []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.rss.append(self.server.process_stats()["rss"])
            self._stop.wait(0.01)

    @property
    def slowest(self) -> float:
        return max(max(t) for t in self.latency.values())

    @property
    def answers(self) -> int:
        return sum(map(len, self.latency.values()))

    def __enter__(self):
        self._probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, self.server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._probe.stdout.readline().strip() == "polling"
        self._sampler.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)
        self._stop.set()
        self._sampler.join()
        out, _ = self._probe.communicate("", timeout=30)
        result = json.loads(out)
        self.failures = result.pop("failures")
        self.latency = result


def _rss(server: LiveServer) -> int:
    return server.process_stats()["rss"]


def _baseline(server: LiveServer) -> int:
    samples = []
    for _ in range(5):
        samples.append(_rss(server))
        time.sleep(0.05)
    return int(statistics.median(samples))


def _post(server: LiveServer, upload: Upload, client: httpx.Client | None = None) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = (client or httpx).post(
        server.url + "/classify", content=upload.body, headers={"Content-Type": upload.content_type}, timeout=60
    )
    return r, time.perf_counter() - t0


def _settle(server: LiveServer, target: int, within_s: float = 5.0) -> int:
    """The RSS once it is at or below `target`, or after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while (rss := _rss(server)) > target and time.monotonic() < deadline:
        time.sleep(0.05)
    return rss


def test_worst_allowed_uploads_are_all_served_with_health_answering(server, worst):
    """Each worst upload alone, then all at once: every one 200, and every health check meanwhile answered."""
    _worst_uploads(server, worst, bounds=False)


@pytest.mark.slow
def test_worst_allowed_uploads_keep_health_fast_and_memory_bounded(server, worst):
    """Each worst upload alone: health within 100 ms (the target: any single allowed upload). All of them at
    once (past the target's case: seven of the worst uploads in flight on 2 cores): health within
    CONCURRENT_HEALTH_BOUND_S (or STALL_RATIO times the slowest alone), reported. Memory bounded throughout and
    returned after."""
    _worst_uploads(server, worst, bounds=True)


def _worst_uploads(server, worst, *, bounds: bool) -> None:
    mb = 1 << 20
    baseline = _baseline(server)
    figures = []
    with Monitor(server) as alone:
        for upload in worst:  # one at a time
            start = len(alone.rss)
            r, elapsed = _post(server, upload)
            assert r.status_code == 200, (upload.name, r.text)
            assert len(r.json()["results"]) == (2 if upload.content_type == "application/json" else 1)
            figures.append((upload.name, elapsed, max(alone.rss[start:] or [0]), _rss(server)))
    with Monitor(server) as together:
        with cf.ThreadPoolExecutor(len(worst)) as pool:  # all at once
            answers = list(pool.map(lambda u: _post(server, u), worst))
        assert all(r.status_code == 200 for r, _ in answers), [r.text for r, _ in answers]
    after = _settle(server, int(baseline * RSS_RETURN))
    peak = max(alone.rss + together.rss)
    print(f"\n[{server.env_name}] warm RSS {baseline / mb:.0f} MB")
    for name, elapsed, peak_one, rss in figures:
        print(f"  {name:<26} {elapsed * 1000:6.0f} ms  peak RSS {peak_one / mb:5.0f} MB  after {rss / mb:5.0f} MB")
    statuses = [r.status_code for r, _ in answers]
    print(
        f"  all {len(worst)} at once: {statuses}, {max(e for _, e in answers) * 1000:.0f} ms, "
        f"peak RSS {max(together.rss) / mb:.0f} MB"
    )
    print(
        f"  health: slowest {alone.slowest * 1000:.1f} ms one at a time ({alone.answers} answers), "
        f"{together.slowest * 1000:.1f} ms all at once ({together.answers}); RSS peak {peak / mb:.0f} MB, "
        f"settled {after / mb:.0f} MB"
    )
    assert not alone.failures and not together.failures, (alone.failures + together.failures)[:5]
    if not bounds:  # bounds on time and memory depend on the machine's speed: make test-slow
        return
    assert alone.slowest < HEALTH_BOUND_S, f"a health check took {alone.slowest * 1000:.0f} ms"
    bound = max(CONCURRENT_HEALTH_BOUND_S, STALL_RATIO * alone.slowest)
    assert together.slowest < bound, f"all at once: {together.slowest * 1000:.0f} ms, bound {bound * 1000:.0f} ms"
    assert peak < RSS_BOUND, f"RSS peaked at {peak / mb:.0f} MB"
    assert after <= baseline * RSS_RETURN, f"RSS {after / mb:.0f} MB after, against {baseline / mb:.0f} MB warm"


def test_over_the_limits_is_413_from_the_headers(server, worst):
    """Every upload over a limit is refused 413 with what is over, and nothing of it is decoded."""
    _over_the_limits(server, worst, bounds=False)


@pytest.mark.slow
def test_over_the_limits_is_413_fast_and_keeps_health_fast(server, worst):
    """The same, refused within a quarter second (and half the time an allowed image of that size takes to
    decode), with health checks within their bound meanwhile."""
    _over_the_limits(server, worst, bounds=True)


def _over_the_limits(server, worst, *, bounds: bool) -> None:
    side = int(MAX_PIXELS**0.5)
    tall = zero_png(1, 40_000_000, 0, 8)  # the attack: four of these in one 415 KB JSON request
    dims, pixels = worst[0].dimensions, worst[0].pixels
    over_request = [f"image 0: {dims}", f"image 1: {dims}", f"{2 * pixels:,}", f"{MAX_REQUEST_PIXELS:,}"]
    progressive = _encode(Image.new("RGB", (side, side), (9, 99, 199)), "JPEG", progressive=True)
    last_scan, end = _scans(progressive)[-1]
    scan_bomb = progressive[:end] + progressive[last_scan:end] * 20_000 + progressive[end:]  # 199 s to decode
    cases = [
        (Upload("one-pixel-over", zero_png(side + 1, MAX_PIXELS // side, 0, 8), "image/png", 0), None),
        (_json("attack-4x-1x40M", [tall] * 4, 0), ["image 0:", "1x40000000", "40,000,000", f"{MAX_PIXELS:,}"]),
        (_json("request-over", [worst[0].body, worst[0].body], 0), over_request),
        (Upload("side-over", zero_png(1, MAX_SIDE + 1, 0, 8), "image/png", 0), [f"1x{MAX_SIDE + 1}", f"{MAX_SIDE:,}"]),
        (Upload("jpeg-scan-bomb", scan_bomb, "image/jpeg", 0), [f"{len(_scans(scan_bomb)):,} scans"]),
    ]
    allowed = _post(server, worst[1])[1]  # the time to decode an allowed image of this size
    baseline = _baseline(server)
    mb = 1 << 20
    with Monitor(server) as monitor, httpx.Client() as client:
        for upload, words in cases:
            r, elapsed = _post(server, upload, client)
            assert r.status_code == 413, (upload.name, r.text)
            error = r.json()["error"]
            assert error["code"] == ("too_many_scans" if "scan" in upload.name else "too_many_pixels"), error
            for word in words or [f"{(side + 1) * (MAX_PIXELS // side):,}", f"{MAX_PIXELS:,}"]:
                assert word in error["message"], (word, error["message"])
            print(f"\n[{server.env_name}] {upload.name}: 413 in {elapsed * 1000:.0f} ms ({len(upload.body):,} bytes)")
            if bounds:
                assert elapsed < min(0.25, allowed / 2), (upload.name, elapsed, allowed)
    if bounds:
        assert monitor.slowest < HEALTH_BOUND_S
    assert max(monitor.rss, default=_rss(server)) < baseline + 40 * mb, "nothing was decoded"
