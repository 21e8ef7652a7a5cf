"""One serving process: the app under uvicorn with a graceful drain on SIGTERM/SIGINT. `service.cli` hands
`run_server` to `service.supervisor.serve`, which runs it here or in each worker process; nothing else in the
service imports this module.

On the first signal: readiness turns false, new requests get 503, and the server keeps running until
in-flight requests finish (or the drain timeout passes); then uvicorn shuts down as usual. A second
SIGINT exits at once.

The process ends by the drain timeout plus `EXIT_GRACE_S`, whatever the rest of the shutdown waits on: uvicorn's
graceful shutdown gets only what is left of the drain timeout (its own timeout would add a whole drain timeout
again), and a watchdog ends a process still there at the limit, logging every thread's stack first so the cause
is visible. A rolling update or the supervisor can count on that limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import sys
import threading
import time
import traceback

import uvicorn

from service.app import create_app
from service.connections import timed_protocol
from service.settings import Settings
from service.supervisor import EXIT_GRACE_S, exit_drained

log = logging.getLogger("puppet.server")
DRAIN_LINGER_S = 0.2


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout_s: float):
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self._drain_started = False
        self._exit_by = math.inf  # the signal's time plus the drain timeout plus EXIT_GRACE_S
        self._left_in_flight = 0
        self._signalled = threading.Event()
        threading.Thread(target=self._drain, name="puppet-drain", daemon=True).start()

    def handle_exit(self, sig, frame) -> None:
        """A signal handler runs between two bytecodes of the main thread, which may hold a lock at that
        moment (a metric's, the log handler's): taking one here can deadlock the process for good (a worker
        once ignored SIGTERM that way). So it only flags the drain and wakes the thread that runs it."""
        if self._drain_started:  # a second SIGINT exits at once; a repeated SIGTERM changes nothing
            return super().handle_exit(sig, frame) if sig == signal.SIGINT else None
        self._drain_started = True
        self.state.draining = True  # new requests get 503 from here on
        self._signal = sig
        self._signalled.set()  # this event's lock is only ever taken here and by the waiting drain thread

    def _drain(self) -> None:
        self._signalled.wait()
        self._exit_by = time.monotonic() + self.drain_timeout_s + EXIT_GRACE_S
        self.state.set_ready(False)
        log.info(
            "signal %s: draining %d in-flight requests (up to %.1f s)",
            self._signal,
            self.state.in_flight,
            self.drain_timeout_s,
        )
        deadline = time.monotonic() + self.drain_timeout_s
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self._left_in_flight = self.state.in_flight  # requests the drain timeout cut short
        # a connection already on its way is accepted and answered 503 rather than reset
        time.sleep(min(DRAIN_LINGER_S, max(0.0, deadline - time.monotonic())))
        # set directly rather than through handle_exit, which would re-raise the signal at exit
        # and end a clean drain with status -15 instead of 0
        self.should_exit = True
        time.sleep(max(0.0, self._exit_by - time.monotonic()))
        self._cut_short()

    def _cut_short(self) -> None:
        """The watchdog: the shutdown has outlived the drain timeout plus EXIT_GRACE_S. Log where every thread is,
        then end the process: 0 if the drain finished every request (only the teardown hung), else 1."""
        stacks = "\n".join(
            f"thread {ident}:\n{''.join(traceback.format_stack(frame))}"
            for ident, frame in sys._current_frames().items()
        )
        left = max(self._left_in_flight, self.state.in_flight)
        log.error(
            "still running %.1f s after the drain timeout with %d requests in flight at its end; exiting. Threads:\n%s",
            EXIT_GRACE_S,
            left,
            stacks,
        )
        exit_drained(0 if left == 0 else 1)

    async def shutdown(self, sockets=None) -> None:
        """Stop accepting first, then give requests already read off accepted connections a moment to be
        answered (uvicorn would otherwise close every connection that has no response under way)."""
        for server in self.servers:
            server.close()
        await asyncio.sleep(DRAIN_LINGER_S)
        # the drain has already waited for requests in flight: uvicorn gets what is left of its timeout, not another
        self.config.timeout_graceful_shutdown = max(0.1, self._exit_by - EXIT_GRACE_S - time.monotonic())
        await super().shutdown(sockets=sockets)


def run_server(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve the app until it has drained: on `sockets` (a worker's, bound by service/supervisor.py), or on the
    settings' address."""
    if settings.api_keys_file is not None:  # SIGHUP rereads the keys (service/api_keys.py); until then it is ignored
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through our handler (service/logs.py)
        access_log=False,  # one structured line per request comes from the service itself
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
        http=timed_protocol(settings.read_timeout_s),  # httptools, with a deadline on each request's head
    )
    DrainingServer(config, app.state.service, settings.drain_timeout_s).run(sockets=sockets)
