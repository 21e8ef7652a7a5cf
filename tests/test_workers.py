"""Several serving processes on one port (service/workers.py): shared metrics, restarts, drain, failed starts."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx
import pytest

from model import load_dataset
from model.data import encode_png
from support.live_server import LiveServer, answer_or_cut, hung_teardown

pytestmark = pytest.mark.integration  # every test here starts a server or another process


@pytest.fixture(scope="module")
def pngs():
    data = load_dataset("fashion-mnist", "test").subset(slice(0, 32))
    return [encode_png(img) for img in data.images]


def _children(pid: int) -> set[int]:
    """The serving worker processes of the supervisor `pid` (not multiprocessing's resource tracker)."""
    pids = set()
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        try:
            if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
                pids.add(int(child))
        except FileNotFoundError:
            pass
    return pids


def _post(url, png, **params):
    return httpx.post(url + "/classify", content=png, headers={"Content-Type": "image/png"}, params=params, timeout=60)


def _access_pids(output: str) -> set[int]:
    pids = set()
    for line in output.splitlines():
        if line.startswith("{") and '"puppet.access"' in line:
            record = json.loads(line)
            if record["path"] == "/classify":
                pids.add(record["pid"])
    return pids


def _wait_until_loaded(s: LiveServer, n: int) -> None:
    """Readiness answers once one worker is up; wait until `n` have logged that their model is loaded and listen
    (a worker logs 'loaded' before it starts its gRPC service, then listens for HTTP)."""
    deadline = time.monotonic() + 60
    while True:
        pids = {int(line.split('"pid":')[1].split(",")[0]) for line in s.output().splitlines() if "loaded on" in line}
        if len(pids) >= n and all(_listens(pid, s.port) for pid in pids):
            return
        assert time.monotonic() < deadline, "the workers did not all start"
        time.sleep(0.1)


def test_two_workers_share_the_port_and_their_metrics_add_up(pngs):
    s = LiveServer(workers=2, log_level="info", max_batch_size=4)
    try:
        _wait_until_loaded(s, 2)  # else the first requests all go to the one that is listening
        assert len(_children(s.proc.pid)) == 2
        single = [_post(s.url, png).json()["results"][0] for png in pngs[:4]]
        with cf.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: _post(s.url, pngs[i % len(pngs)]), range(96)))
        assert [r.status_code for r in answers] == [200] * 96
        for i in range(4):  # the same answer from whichever worker
            got = answers[i].json()["results"][0]
            assert (got["depth"], got["predictions"][0]["label"]) == (
                single[i]["depth"],
                single[i]["predictions"][0]["label"],
            )
        # /metrics from either worker counts every request of both
        for _ in range(4):
            assert s.metric("puppet_requests_total", route="/classify", status="200") == 100
            assert s.metric("puppet_batch_size_images_sum") == 100
            assert s.metric("puppet_ready") == 1
            assert s.metric("puppet_max_depth") == 4
    finally:
        output = s.stop()
    assert s.proc.returncode == 0
    assert len(_access_pids(output)) == 2, "both processes should have served requests"


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (/proc/<pid>/fd against /proc/net/tcp)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except (FileNotFoundError, ProcessLookupError):
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A" and f"socket:[{inode}]" in inodes:
                return True
    return False


def _post_outcome(url, png) -> tuple[int | str, float]:
    """The status, or the name of the error when no answer came (a reset, a refused connection); and seconds."""
    t0 = time.monotonic()
    try:
        status = _post(url, png).status_code
    except httpx.TransportError as e:
        status = type(e).__name__
    return status, time.monotonic() - t0


def test_a_worker_process_that_dies_is_replaced(pngs):
    """Every request sent after the victim is gone is answered: by the survivor while the replacement loads
    (it listens only once it can serve), then by both."""
    s = LiveServer(workers=2, worker_restart_backoff_s=0.2, log_level="info")
    try:
        _wait_until_loaded(s, 2)
        first = _children(s.proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # Gone means reaped (no /proc entry left), not merely missing from _children: a dying process loses its
        # command line when its memory is released, before its files (the listening socket) are closed, and what
        # connects in between is queued on the dying socket and reset with it (tcp_migrate_req moves it instead:
        # docs/reliability.md). Freeing a large address space on a busy machine makes that window long.
        while os.path.exists(f"/proc/{victim}"):
            time.sleep(0.01)
        replaced = threading.Event()

        def client(k: int) -> list:  # a new connection per request, until the replacement has served a while
            outcomes, i = [], k
            while not replaced.is_set():
                outcomes.append(_post_outcome(s.url, pngs[i % len(pngs)]))
                i += 4
            return outcomes

        with cf.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, k) for k in range(4)]
            deadline = time.monotonic() + 60
            new, early = None, []
            while new is None:
                assert time.monotonic() < deadline, f"no replacement: {_children(s.proc.pid)}"
                for pid in _children(s.proc.pid) - first:
                    listening = _listens(pid, s.port)  # read before the log: it logs 'loaded' before it listens
                    if f'"pid":{pid},"message":"model' in s.output():  # it has loaded the model
                        new = pid
                    elif listening:
                        early.append(pid)
                time.sleep(0.01)
            while new not in _access_pids(s.output()) and time.monotonic() < deadline:
                time.sleep(0.05)  # the replacement is in the rotation: it answers too
            time.sleep(0.5)
            replaced.set()
            outcomes = [o for c in clients for o in c.result()]
        assert new in _access_pids(s.output()), "the replacement never answered a request"
        bad = [status for status, _ in outcomes if status != 200]
        assert outcomes and not bad, f"{len(bad)} of {len(outcomes)} requests failed: {sorted(set(map(str, bad)))}"
        # none could wait on the loading replacement: the kernel gives connections only to listening sockets
        assert not early, "the replacement listened on the port before its model was loaded"
        print(f"{len(outcomes)} requests while the worker was replaced, slowest {max(t for _, t in outcomes):.3f} s")
        assert httpx.get(s.url + "/health/ready").status_code == 200 and s.metric("puppet_ready") == 1
    finally:
        output = s.stop()
    assert f"worker process {victim} exited with -9" in output
    assert s.proc.returncode == 0, [line for line in output.splitlines() if "supervisor" in line]
    assert not hung_teardown(output)


def test_sigterm_drains_every_worker(pngs):
    n = 12  # requests of 64 images, one image per model call: each is in flight for a good while
    s = LiveServer(workers=2, max_batch_size=1, max_queue=n * 64, drain_timeout_s=20, request_deadline_ms=60000)
    files = [("files", (f"{j}.png", pngs[j % len(pngs)], "image/png")) for j in range(64)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    with cf.ThreadPoolExecutor(n) as pool, httpx.Client(timeout=60, limits=limits) as client:
        # one client for all: they start together (a client each would stagger them by its set-up time)
        in_flight = [pool.submit(client.post, s.url + "/classify", files=files, params={"depth": 4}) for _ in range(n)]
        deadline = time.monotonic() + 10
        while s.metric("puppet_in_flight_requests") < n // 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        accepted = s.metric("puppet_in_flight_requests") - 1  # less this scrape
        assert accepted >= 2, "requests should be in flight at the signal"
        t0 = time.monotonic()
        s.terminate()
        time.sleep(0.05)
        late = httpx.post(s.url + "/classify", content=pngs[0], headers={"Content-Type": "image/png"})
        answers = [answer_or_cut(f) for f in in_flight]
    rc = s.proc.wait(30)
    # what the service had accepted finishes; what reached it after the signal is refused, nothing is dropped
    # a request still on its way at the signal may race the listener's close (no answer at all); never more
    # of them than were not yet accepted
    cut = [r for r in answers if isinstance(r, str)]
    assert len(cut) <= len(answers) - accepted, cut
    answers = [r for r in answers if not isinstance(r, str)]
    ok = [r for r in answers if r.status_code == 200]
    assert len(ok) >= accepted and all(len(r.json()["results"]) == 64 for r in ok)
    assert all(r.json()["error"]["code"] == "draining" for r in answers if r.status_code != 200)
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert rc == 0 and time.monotonic() - t0 < 20
    assert not hung_teardown(s.output())


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RuntimeError, match=r"server exited with 3") as e:
        LiveServer(workers=2, env={"PUPPET_CHECKPOINT": str(bad)})
    assert str(bad) in str(e.value) and "Traceback" not in str(e.value)


def test_workers_starting_together_make_one_onnx_export(tmp_path, pngs):
    cache = tmp_path / "onnx-cache"  # empty: both workers want to export at once
    s = LiveServer(workers=2, backend="onnx", onnx_cache_dir=cache)
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _post(s.url, pngs[i % len(pngs)]), range(32)))
        assert [r.status_code for r in answers] == [200] * 32
        assert {r.json()["backend"]["name"] for r in answers} == {"onnx"}
    finally:
        s.stop()
    assert s.proc.returncode == 0
    exports = [p for p in cache.iterdir() if p.is_dir()]
    assert len(exports) == 1 and (exports[0] / "manifest.json").is_file()
