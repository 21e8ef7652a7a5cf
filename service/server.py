"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

On the first signal: readiness turns false, new requests get 503, and the server keeps running until
in-flight requests finish (or the drain timeout passes); then uvicorn shuts down as usual. A second
SIGINT exits at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from service.app import create_app
from service.settings import Settings

log = logging.getLogger("puppet.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout_s: float):
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:
        if self._drain_started:
            return super().handle_exit(sig, frame)
        self._drain_started = True
        self.state.draining = True
        self.state.set_ready(False)
        log.info(
            "signal %s: draining %d in-flight requests (up to %.1f s)", sig, self.state.in_flight, self.drain_timeout_s
        )

        def drain():
            deadline = time.monotonic() + self.drain_timeout_s
            while self.state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            # set directly rather than through handle_exit, which would re-raise the signal at exit
            # and end a clean drain with status -15 instead of 0
            self.should_exit = True

        threading.Thread(target=drain, name="puppet-drain", daemon=True).start()


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # one structured line per request comes from the service itself
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
    )
    DrainingServer(config, app.state.service, settings.drain_timeout_s).run()
