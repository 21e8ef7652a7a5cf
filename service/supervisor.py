"""`serve()`: one serving process, or several on one port under a supervisor that binds the socket, starts the
workers and keeps them. What runs in a serving process (uvicorn with a drain, service/server.py) is handed in by
the caller, so nothing here imports it.

Why processes: one process is bound by its interpreter lock, which the event loop (HTTP, decoding) and the
inference thread share; two processes on two cores served far more requests than one (docs/benchmarks.md).
Each worker is a whole service (event loop, batcher, model) with its own listening socket on the port
(SO_REUSEPORT), which listens only once its model is loaded and warm; the kernel spreads connections between
them. Prometheus metrics are aggregated across workers through `PROMETHEUS_MULTIPROC_DIR` (a fresh directory
per start), so /metrics from any worker tells the whole story.

The supervisor restarts a worker process that dies (after `worker_restart_backoff_s`); a worker that fails
to start (bad checkpoint, stale export) stops everything with its exit status. SIGTERM/SIGINT go to every
worker, each drains its in-flight requests, and the supervisor exits 0 once all have exited cleanly.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from uvicorn.config import STARTUP_FAILURE

from service.logs import configure_logging
from service.settings import Settings

log = logging.getLogger("puppet.supervisor")

EXIT_GRACE_S = 1.0  # after the drain timeout: a serving process ends by then (service/server.py), whatever hangs

# Serves the app until it drains: on the sockets given (a worker's), or on the settings' address when None
RunServer = Callable[[Settings, list[socket.socket] | None], None]


def serve(settings: Settings, run_server: RunServer) -> int:
    """Serve until SIGTERM/SIGINT: in this process, or in several. Returns the exit status."""
    configure_logging(settings.log_level, settings.log_format)
    workers = worker_count(settings)
    if workers == 1:
        run_server(settings, None)
        return 0
    return Supervisor(settings, workers, run_server).run()


def exit_drained(code: int) -> NoReturn:
    """End a serving process whose server has drained and whose lifespan has shut down, without the
    interpreter's finalization: tearing down torch's and onnxruntime's modules took seconds more after the
    last answer under load (docs/reliability.md), time a rolling update or the supervisor waits for and nothing
    needs. The logs are flushed first; nothing else is left to do."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def worker_count(settings: Settings) -> int:
    """`workers`, or for 0 (auto): one per usable CPU core on the CPU, one on a GPU (it batches there)."""
    if settings.workers:
        return settings.workers
    if settings.device != "cpu":
        import torch

        if settings.device.startswith("cuda") or torch.cuda.is_available():
            return 1
    return max(1, len(os.sched_getaffinity(0)))


def _bind(settings: Settings) -> socket.socket:
    """A socket on the service's address with SO_REUSEPORT: every worker has its own, and the kernel spreads
    new connections evenly between them (one shared socket let whichever worker woke first take a whole
    burst of connections, and throughput swung widely between runs: docs/benchmarks.md).

    The kernel hands connections only to sockets that listen. A worker binds before it loads the model but
    listens only once it can serve (asyncio's create_server calls listen(), and uvicorn creates the server
    after the lifespan has loaded the model and warmed every depth): a worker that is starting, or that
    replaces a dead one, never holds connections it cannot answer."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    return sock


def _worker(settings: Settings, run_server: RunServer) -> None:
    """A worker process's life: its own socket on the port, then the server (`run_server`, picklable by name)."""
    configure_logging(settings.log_level, settings.log_format)
    # SIGUSR1 writes every thread's stack to a file the supervisor reads when this worker will not stop
    faulthandler.register(signal.SIGUSR1, file=open(_stacks_file(os.getpid()), "w"), all_threads=True)
    try:  # bound, not listening: uvicorn's start-up loads the model and warms every depth, then listens
        sock = _bind(settings)
    except OSError as e:
        log.critical("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        raise SystemExit(STARTUP_FAILURE) from None
    run_server(settings, [sock])
    exit_drained(0)


class Supervisor:
    def __init__(self, settings: Settings, workers: int, run_server: RunServer):
        self.settings, self.n, self.run_server = settings, workers, run_server
        self.signals = 0
        self.procs: list[multiprocessing.Process] = []
        self._wake = threading.Event()
        self.context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked

    def _on_signal(self, sig, frame) -> None:
        """The first signal wakes the main loop, which starts every worker's drain at once (it used to notice
        only at its next poll, so a request just after the signal could still get 200: docs/design.md); a second
        signal stops them now."""
        self.signals += 1
        self._wake.set()
        if self.signals > 1:
            for p in self.procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)

    def _forward(self, sig, frame) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    def _spawn(self) -> multiprocessing.Process:
        p = self.context.Process(target=_worker, args=(self.settings, self.run_server), name="puppet-serve-worker")
        p.start()
        return p

    def run(self) -> int:
        s = self.settings
        metrics_dir = tempfile.mkdtemp(prefix="puppet-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by every worker
        try:  # bound, not listening: holds the port for the workers and fails early if it is taken
            sock = _bind(s)
        except OSError as e:
            log.critical("cannot listen on %s:%d: %s", s.host, s.port, e)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            return 2
        self.settings = s = s.model_copy(update={"port": sock.getsockname()[1]})  # port 0: the one it got
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if s.api_keys_file is not None:  # every worker rereads its keys (service/api_keys.py)
            signal.signal(signal.SIGHUP, self._forward)
        log.info("serving on %s:%d with %d worker processes", s.host, s.port, self.n)
        self.procs = [self._spawn() for _ in range(self.n)]
        try:
            while not self.signals:
                self._wake.wait(0.1)
                for i, p in enumerate(self.procs):
                    if p.is_alive() or self.signals:
                        continue
                    if p.exitcode == STARTUP_FAILURE:  # it said why; restarting would only say it again
                        log.critical("a worker could not start (exit %d); stopping", p.exitcode)
                        self.signals = 1
                        self._stop()
                        return STARTUP_FAILURE
                    log.error(
                        "worker process %d exited with %s; restarting it in %.1f s",
                        p.pid,
                        p.exitcode,
                        s.worker_restart_backoff_s,
                    )
                    _mark_dead(p.pid)
                    time.sleep(s.worker_restart_backoff_s)
                    if not self.signals:
                        self.procs[i] = self._spawn()
            return self._stop()
        finally:
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _stop(self) -> int:
        """Every worker drains (SIGTERM) and ends by the drain timeout plus EXIT_GRACE_S (its own watchdog). One still
        running half a second after that has its threads' stacks logged, then it is killed."""
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        start = time.monotonic()
        for p in self.procs:
            p.join(max(0.0, start + self.settings.drain_timeout_s + EXIT_GRACE_S + 0.5 - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                log.error(
                    "worker process %d has not stopped %.1f s after SIGTERM; killing it. Its threads: %s",
                    p.pid,
                    time.monotonic() - start,
                    _stacks(p.pid),
                )
                p.kill()
                p.join()
        codes = [p.exitcode for p in self.procs]
        log.info("all workers stopped (exit codes %s)", codes)
        # -SIGTERM: a worker still importing when the signal came (uvicorn's handlers were not installed yet)
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


def _stacks_file(pid: int) -> str:
    return os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"stacks-{pid}.txt")


def _stacks(pid: int) -> str:
    """A worker's threads' stacks, as faulthandler writes them on SIGUSR1 (see `_worker`)."""
    try:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        with open(_stacks_file(pid)) as f:
            return f.read().strip() or "(none written)"
    except OSError as e:
        return f"(not available: {e})"


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
