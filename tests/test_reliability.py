"""The service when things go wrong: overload, a long run, faults in the model, SIGTERM under load, bad checkpoints.

Every test runs a real `puppet-cnn serve` process on loopback with the production environment (one torch thread,
glibc settings of the Dockerfile). The long versions are marked `slow` (`make test-slow`); `make test` runs short
ones that check the same properties.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import threading
import time
import uuid
from typing import NamedTuple

import httpx
import pytest
from safetensors.torch import load_file, save_file

from benchmarks.server_process import SERVER_ENV, wait_ready
from model import load_dataset
from model.checkpoint import read_metadata
from model.data import encode_png
from model.routers import ROUTERS
from service.errors import DRAINING_MESSAGE
from support.live_server import SHIPPED, SHIPPED_DEADLINE_MS, LiveServer, answer_or_cut, hung_teardown
from support.load import capacity, open_loop, p50_latency

pytestmark = pytest.mark.integration  # every test here starts a server or another process

IMAGES_PER_REQUEST = 8


@pytest.fixture(scope="module")
def pngs():
    data = load_dataset("fashion-mnist", "test").subset(slice(0, 64))
    return [encode_png(img) for img in data.images]


def _server(**settings) -> LiveServer:
    return LiveServer(env=SERVER_ENV, **settings)


def _log_lines(output: str) -> list[dict]:
    lines = []
    for line in output.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


# -- overload -------------------------------------------------------------------------------------------------
def _overload(pngs, seconds: float, *, bounds: bool, late_allowed: bool = True) -> None:
    """3x the measured capacity: admission by time refuses (429 with Retry-After, a 504 counted), every answer is
    one of those or a 200 at full or degraded depth, and the queue empties after. With `bounds` (make test-slow,
    they depend on the machine's speed): what it accepts is answered within the deadline by the server's clock; a
    miss (a 504, or a 200 that reached the client late) is rare; the lone-request latency recovers. Without
    `late_allowed`, no 200 may reach the client after the deadline (its clock, not the server's)."""
    # the default deadline (2 s) and degrade under load; the bound of 256 queued images raised, so that on a fast
    # machine too it is admission by time that refuses (on a slow one it binds first anyway)
    deadline_ms = SHIPPED_DEADLINE_MS
    s = _server(max_queue=4096, request_deadline_ms=deadline_ms)
    try:
        before = p50_latency(s.url, pngs[0])
        cap = capacity(s.url, pngs, images_per_request=IMAGES_PER_REQUEST, seconds=4)
        overflows = _listen_overflows()
        outcomes = open_loop(s.url, pngs, rate=3 * cap, seconds=seconds, images_per_request=IMAGES_PER_REQUEST)
        statuses = [o.status for o in outcomes]
        counts = {code: statuses.count(code) for code in set(statuses)}
        errors = {o.error for o in outcomes if o.status == 0}
        ok = [o for o in outcomes if o.status == 200]
        worst = max((o.body["timings_ms"]["total"] for o in ok), default=0)
        summary = (
            f"capacity {cap:.1f} req/s x {IMAGES_PER_REQUEST} images, sent {len(outcomes)} at 3x: {counts} "
            f"{errors or ''}; slowest 200: {worst:.0f} ms in the server, {1000 * max(o.seconds for o in ok):.0f} ms "
            f"at the client, whose own event loop woke up to {1000 * outcomes.client_lag_s:.0f} ms late; the kernel "
            f"dropped {_listen_overflows() - overflows} connections meanwhile for a full accept queue (the client "
            "retries those after 1, 3, 7, 15 s: time no server clock can see)"
        )
        assert set(counts) <= {200, 429, 504}, summary  # no other 5xx, no dropped connection
        assert counts.get(429, 0) > 0, f"3x capacity should be refused in part: {summary}"
        assert len(ok) > 0, summary
        # A deadline missed: a 504, or a 200 that reached the client after the deadline. The server adds the time
        # a request waited unread in the socket (its event loop's lag, service/loop_lag.py) to the time it has
        # spent; the client's own loop lateness is not the server's to see.
        late = [o for o in ok if o.seconds > deadline_ms / 1000]
        assert s.metric("puppet_rejections_total", reason="deadline") == counts.get(504, 0)
        for o in outcomes:
            if o.status == 429:
                assert int(o.headers["retry-after"]) >= 1 and o.body["error"]["code"] == "queue_full"
            elif o.status == 200:  # accepted: at full or degraded depth
                assert {r["depth_reason"] for r in o.body["results"]} <= {*ROUTERS, "degraded"}
        if not bounds:
            assert _queue_empties(s), "images left queued after the load"
            print(summary)
            return
        if not late_allowed:
            assert not late, f"{len(late)} 200s reached the client after the deadline: {summary}"
        accepted = len(ok) + counts.get(504, 0)
        missed = counts.get(504, 0) + len(late)
        assert missed <= 0.005 * accepted, (
            f"over 0.5% of accepted requests missed the deadline ({len(late)} late 200s): {summary}"
        )
        for o in ok:  # within the deadline by the server's clock
            assert o.body["timings_ms"]["total"] <= deadline_ms, summary
        # and it recovers: the lone-request latency comes back within seconds
        t_end = time.monotonic()
        after = p50_latency(s.url, pngs[0])
        while after > max(2 * before, before + 0.005) and time.monotonic() - t_end < 10:
            after = p50_latency(s.url, pngs[0])
        recovered_s = time.monotonic() - t_end
        print(f"{summary}; p50 {before * 1000:.1f} ms before, {after * 1000:.1f} ms {recovered_s:.1f} s after")
        assert after <= max(2 * before, before + 0.005), (
            f"not recovered after {recovered_s:.1f} s: {after * 1000:.1f} ms"
        )
        assert s.metric("puppet_queue_length_images") == 0
    finally:
        s.stop()


def _queue_empties(s: LiveServer) -> bool:
    """Whether the queue empties once the load stops: every accepted image was run or refused, none left behind."""
    for _ in range(100):
        if s.metric("puppet_queue_length_images") == 0:
            return True
        time.sleep(0.1)
    return False


def _listen_overflows() -> int:
    """The kernel's count of connections dropped for a full accept queue, all sockets (TcpExt ListenOverflows)."""
    lines = [line.split() for line in open("/proc/net/netstat") if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True)).get("ListenOverflows", 0))


def test_overload_at_three_times_capacity_sheds_load(pngs):
    _overload(pngs, seconds=8, bounds=False)


@pytest.mark.slow
def test_overload_for_a_minute(pngs):
    _overload(pngs, seconds=60, bounds=True)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(20))
def test_overload_every_200_within_the_deadline_by_the_clients_clock(pngs, run):
    _overload(pngs, seconds=20, bounds=True, late_allowed=False)


def _settled_stats(s: LiveServer) -> dict[str, int]:
    """The server's process stats once its descriptor count has stopped changing for 0.3 s: connections a client
    has closed (readiness polls included) are closed by the server a moment later, not at once."""
    last, since = s.process_stats()["fds"], time.monotonic()
    deadline = since + 10
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = s.process_stats()["fds"]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            return s.process_stats()
    raise AssertionError(f"descriptor count still changing after 10 s (last {last})")


# -- soak -----------------------------------------------------------------------------------------------------
def _soak(pngs, seconds: float, warmup_s: float, *, every_200: bool) -> None:
    """70% of the measured capacity: memory, descriptors and threads do not grow. With `every_200` (the long run,
    make test-slow) every request is answered 200; the short run allows a few 429s, since a stall of the machine
    leaves requests waiting unread long enough to be refused (the way in counts, service/loop_lag.py)."""
    s = _server(request_deadline_ms=SHIPPED_DEADLINE_MS)
    try:
        cap = capacity(s.url, pngs, images_per_request=IMAGES_PER_REQUEST, seconds=6)
        rate = 0.7 * cap
        warm = open_loop(
            s.url, pngs, rate=rate, seconds=warmup_s, images_per_request=IMAGES_PER_REQUEST, keep_bodies=False
        )
        start = _settled_stats(s)  # closed connections gone
        outcomes = open_loop(
            s.url, pngs, rate=rate, seconds=seconds, images_per_request=IMAGES_PER_REQUEST, keep_bodies=False
        )
        end = _settled_stats(s)
        answered = warm + outcomes
        bad = [o for o in answered if o.status != 200 and (every_200 or o.status != 429)]
        refused = [o for o in answered if o.status == 429]
        growth = end["rss"] / start["rss"] - 1
        print(
            f"soak {seconds:.0f} s at {rate:.1f} req/s ({IMAGES_PER_REQUEST} images each, 70% of {cap:.1f}): "
            f"{len(outcomes)} requests, rss {start['rss'] / 2**20:.1f} -> {end['rss'] / 2**20:.1f} MiB ({100 * growth:+.2f}%), "
            f"fds {start['fds']} -> {end['fds']}, threads {start['threads']} -> {end['threads']}"
        )
        assert not bad, f"{len(bad)} failed requests, first {bad[:3]}"
        assert len(refused) <= 0.05 * len(answered), f"{len(refused)} of {len(answered)} refused at 70% of capacity"
        assert growth < 0.05
        assert end["fds"] <= start["fds"] and end["threads"] <= start["threads"]
    finally:
        s.stop()


def test_a_run_of_requests_leaves_no_descriptor_or_thread_behind(pngs):
    """Closed-loop load (every answer 200, support/load.py) after a warm-up: the settled counts do not grow."""
    s = _server()
    try:
        capacity(s.url, pngs, images_per_request=IMAGES_PER_REQUEST, seconds=2)  # pools and threads as in service
        start = _settled_stats(s)
        capacity(s.url, pngs, images_per_request=IMAGES_PER_REQUEST, seconds=4)
        end = _settled_stats(s)
        assert end["fds"] <= start["fds"] and end["threads"] <= start["threads"], (start, end)
    finally:
        s.stop()


@pytest.mark.slow
def test_soak_short(pngs):
    _soak(pngs, seconds=20, warmup_s=5, every_200=False)


@pytest.mark.slow
def test_soak_ten_minutes(pngs):
    _soak(pngs, seconds=600, warmup_s=30, every_200=True)


# -- faults ---------------------------------------------------------------------------------------------------
@pytest.fixture
def faulty(tmp_path):
    """A server whose model call fails on demand (tests/support/fault_server.py), logging at info level."""
    s = LiveServer(
        command=[sys.executable, "-m", "support.fault_server"],
        env={**SERVER_ENV, "PUPPET_FAULT_DIR": str(tmp_path)},
        max_batch_size=8,
        log_level="info",
        worker_restart_backoff_s=1.5,
    )
    s.fault_dir = tmp_path
    yield s
    s.stop()


def _post(url, png, request_id=None):
    headers = {"Content-Type": "image/png", **({"X-Request-Id": request_id} if request_id else {})}
    return httpx.post(url + "/classify", content=png, headers=headers, timeout=30)


def test_an_exception_in_the_model_fails_only_that_batch(faulty, pngs):
    assert _post(faulty.url, pngs[0]).status_code == 200
    (faulty.fault_dir / "fail").touch()
    ids = [f"req-{i}" for i in range(64)]
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _post(faulty.url, pngs[i % len(pngs)], ids[i]), range(64)))
    failed = [r for r in answers if r.status_code != 200]
    taken = int((faulty.fault_dir / "fail.taken").read_text())  # images in the batch that took the fault
    assert len(failed) == taken >= 1, [r.status_code for r in answers]
    assert {r.status_code for r in failed} == {500}
    assert {r.json()["error"]["code"] for r in failed} == {"inference_failed"}
    error_ids = {r.headers["x-error-id"] for r in failed}
    assert len(error_ids) == 1, "one batch, one error id"
    error_id = error_ids.pop()
    assert all(error_id in r.json()["error"]["message"] for r in failed)
    # the worker keeps serving, and never restarted: it did not die
    assert all(_post(faulty.url, png).status_code == 200 for png in pngs[:8])
    assert faulty.metric("puppet_worker_restarts_total") == 0
    # the error id is in the log: the worker's traceback, and each failed request's access line
    lines = _log_lines(faulty.stop())
    worker = [r for r in lines if r.get("error_id") == error_id and r["logger"] == "puppet.worker"]
    assert len(worker) == 1 and "injected fault in the model" in worker[0]["exception"]
    access = {r["request_id"]: r for r in lines if r["logger"] == "puppet.access" and r["path"] == "/classify"}
    failed_ids = {r.headers["x-request-id"] for r in failed}
    assert {i for i, r in access.items() if r["status"] == 500 and r.get("error_id") == error_id} == failed_ids
    assert all(access[i]["status"] == 200 for i in ids if i not in failed_ids)


def test_a_worker_that_dies_is_restarted_and_readiness_follows(faulty, pngs):
    assert faulty.metric("puppet_ready") == 1
    (faulty.fault_dir / "die").touch()
    died = _post(faulty.url, pngs[0])
    assert died.status_code == 500 and died.json()["error"]["code"] == "inference_failed"
    # down: not ready, and new requests are refused at once with a retry hint rather than queued
    ready = httpx.get(faulty.url + "/health/ready")
    refused = _post(faulty.url, pngs[1])
    assert ready.status_code == 503 and "worker restarting" in ready.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_restarting"
    assert int(refused.headers["retry-after"]) >= 1
    assert faulty.metric("puppet_ready") == 0
    # restarted after the back-off: ready again, counted, serving
    assert wait_ready(faulty.url + "/health/ready", 15, interval=0.05, request_timeout=5), (
        "the worker was not restarted"
    )
    assert faulty.metric("puppet_worker_restarts_total") == 1 and faulty.metric("puppet_ready") == 1
    assert all(_post(faulty.url, png).status_code == 200 for png in pngs[:8])


# -- SIGTERM under load ---------------------------------------------------------------------------------------
class _Sent(NamedTuple):
    request_id: str
    sent: float  # client clock when the call began (before it connects)
    done: float  # client clock when the answer, or the failure, came back
    status: int  # 0: never connected; -1: the connection was cut without an answer
    code: str  # the error's code, or the exception's name
    message: str


def test_sigterm_under_load_loses_no_accepted_request(pngs):
    """Accepted means past the door: the server's access log and the clients' answers agree on every request;
    every 503 is the door's refusal (never a request already taken); nothing answered before the signal
    failed; the server exits 0 within the drain timeout. (That the drain waits for requests certainly in flight
    is test_service_load.py's SIGTERM test: here the server is often idle at the signal, the clients being slow.)

    Every claim here is causal (what came back before the signal, what the server logged, which refusal it
    was), none a guess at how long a client takes to reach the server: with 16 client threads and the server on
    2 cores, a call begun 0.5 s before the signal can reach the door after it and rightly get 503 (CI once
    failed on such a guess; docs/reliability.md)."""
    drain_s = 10
    s = _server(drain_timeout_s=drain_s, log_level="info")
    results: list[_Sent] = []
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            rid = uuid.uuid4().hex
            t0 = time.monotonic()
            try:  # a new connection each time: nothing is reused across the shutdown
                r = httpx.post(
                    s.url + "/classify",
                    files=[("files", (f"{j}.png", pngs[(i + j) % len(pngs)], "image/png")) for j in range(4)],
                    headers={"X-Request-Id": rid},
                    timeout=30,
                )
                error = r.json()["error"] if r.status_code != 200 else {"code": "", "message": ""}
                results.append(_Sent(rid, t0, time.monotonic(), r.status_code, error["code"], error["message"]))
            except httpx.ConnectError:  # the listening socket is closed: never accepted
                results.append(_Sent(rid, t0, time.monotonic(), 0, "ConnectError", ""))
                if s.proc.poll() is not None:
                    return
                time.sleep(0.01)
            except httpx.HTTPError as e:
                results.append(_Sent(rid, t0, time.monotonic(), -1, type(e).__name__, str(e)))
            i += 16

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(3)
    t_signal = time.monotonic()
    s.terminate()
    try:
        rc = s.proc.wait(timeout=drain_s + 10)
    finally:
        exited = time.monotonic()
        stop.set()
        for t in threads:
            t.join(30)
    output = s.output()

    def shown(rs: list[_Sent]) -> list[tuple]:  # (id, sent and done relative to the signal, status, code)
        return [(r.request_id, round(r.sent - t_signal, 3), round(r.done - t_signal, 3), r.status, r.code) for r in rs]

    assert {r.status for r in results} <= {200, 503, 0, -1}, shown([r for r in results if r.status != 200])
    refused = [r for r in results if r.status == 503]
    assert refused, "requests after the signal should have been refused with 503"
    # the door's refusal, not the pipeline's "shutting down" for a request it had already taken
    taken = [r for r in refused if (r.code, r.message) != ("draining", DRAINING_MESSAGE)]
    assert not taken, f"accepted requests refused by the drain: {shown(taken)} {[r.message for r in taken]}"
    early = [r for r in results if r.done < t_signal and r.status != 200]
    assert not early, f"requests that failed before the signal was even sent: {shown(early)}"
    # what the server accepted (its access log) is exactly what the clients got back
    lines = _log_lines(output)
    logged = {
        r["request_id"]: r["status"] for r in lines if r["logger"] == "puppet.access" and r["path"] == "/classify"
    }
    answered = {r.request_id: r.status for r in results if r.status in (200, 503)}
    assert logged == answered
    # A connection cut without any answer: clients that keep opening connections race the listening socket's
    # close, and one still in the kernel's accept queue then is reset. Allowed only for a request the service
    # never took (not in its log): nothing accepted is lost.
    cut = [r for r in results if r.status == -1]
    assert not [r for r in cut if r.request_id in logged], f"accepted requests dropped: {shown(cut)}"
    assert rc == 0 and exited - t_signal < drain_s, f"exit {rc} after {exited - t_signal:.1f} s"
    assert not hung_teardown(output)
    print(
        f"{len(answered)} answered ({list(answered.values()).count(200)} ok, {len(refused)} refused at the door, "
        f"{len(cut)} cut); exit {exited - t_signal:.2f} s after SIGTERM"
    )


def test_a_shutdown_that_hangs_ends_at_the_drain_timeout_with_the_stacks_logged(tmp_path, pngs):
    """The model call never returns: the drain cannot finish, and the lifespan's wait for the inference thread
    would hang. The watchdog (service/server.py) ends the process at the drain timeout plus EXIT_GRACE_S, with
    status 1 (a request was cut) and every thread's stack in the log, the stuck model call among them."""
    drain_s = 2.0
    s = LiveServer(
        command=[sys.executable, "-m", "support.fault_server"],
        env={**SERVER_ENV, "PUPPET_FAULT_DIR": str(tmp_path)},
        drain_timeout_s=drain_s,
        log_level="info",
    )
    try:
        (tmp_path / "hang").touch()
        with cf.ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(_post, s.url, pngs[0])
            while not (tmp_path / "hang.taken").exists():  # the model call has begun, and will never end
                time.sleep(0.01)
            t_signal = time.monotonic()
            s.terminate()
            rc = s.proc.wait(timeout=drain_s + 10)
            exited = time.monotonic() - t_signal
            assert isinstance(answer_or_cut(stuck), str) or stuck.result().status_code >= 500
    finally:
        output = s.stop()
    hung = hung_teardown(output)
    assert rc == 1 and len(hung) == 1, (rc, output[-3000:])
    assert "with 1 requests in flight at its end" in hung[0] and "in _hang" in hung[0]
    assert exited < drain_s + 2, f"exit {exited:.2f} s after SIGTERM"


# -- bad checkpoints ------------------------------------------------------------------------------------------
def _bad_checkpoint(kind: str, folder) -> tuple[str, str]:
    """A checkpoint file that must not be served, and what the message must say about it."""
    path = folder / f"{kind}.safetensors"
    if kind == "missing":
        return str(path), "does not exist"
    if kind == "truncated":
        data = open(SHIPPED, "rb").read()
        path.write_bytes(data[: len(data) // 2])
        return str(path), "truncated or corrupt"
    if kind == "not-a-puppet":  # a valid safetensors file, not written by save_checkpoint
        save_file(load_file(SHIPPED), str(path))
        return str(path), "no puppet-cnn metadata"
    assert kind == "mismatched"  # our metadata, but a tensor that does not fit the architecture
    tensors = load_file(SHIPPED)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].flatten()[:-1].clone()
    save_file(tensors, str(path), metadata={"puppet_cnn": json.dumps(read_metadata(SHIPPED))})
    return str(path), f"tensor {name} has shape"


@pytest.mark.parametrize("kind", ["missing", "truncated", "not-a-puppet", "mismatched"])
def test_a_bad_checkpoint_stops_the_start(kind, tmp_path):
    path, problem = _bad_checkpoint(kind, tmp_path)
    with pytest.raises(RuntimeError, match=r"server exited with [1-9]") as e:  # before it ever reported ready
        LiveServer(env={"PUPPET_CHECKPOINT": path})
    message = str(e.value)
    assert path in message and problem in message, message
    assert "Traceback" not in message


def test_stats_helpers_see_the_server(pngs):
    """The soak's measurements are real: a kept-alive connection shows up in the process's open descriptors, and
    is gone once the client closes it."""
    s = _server()
    try:
        idle = s.process_stats()
        assert idle["rss"] > 50 * 2**20 and idle["threads"] >= 2
        _settled_stats(s)
        with httpx.Client() as client:  # one kept-alive connection is one more descriptor
            assert (
                client.post(s.url + "/classify", content=pngs[0], headers={"Content-Type": "image/png"}).status_code
                == 200
            )
            busy = s.process_stats()["fds"]
        after = _settled_stats(s)["fds"]  # files the first request opened lazily (metric files) stay; the socket goes
        assert busy == after + 1, (busy, after)
    finally:
        s.stop()
