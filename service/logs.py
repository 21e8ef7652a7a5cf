"""Logging: one JSON object per line on stderr (or plain text for people at a terminal).

Every record carries `ts`, `level`, `logger`, `pid` and `message`; structured fields travel in `extra={"fields": {...}}`
and become top-level keys. The access log (`puppet.access`) writes one line per request: request id, route,
status, images, depths and why, timings, and for failures the error code and error id. Image bytes never
appear in a log line: handlers record sizes and decisions, not payloads.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

ACCESS = logging.getLogger("puppet.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _DropHandledStartupTraceback(logging.Filter):
    """uvicorn logs the lifespan's traceback on a failed start; ours already said what failed, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "StartupFailed" not in str(record.msg)


def configure_logging(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # theirs go through our handler
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.error").addFilter(_DropHandledStartupTraceback())


def access_line(fields: dict, *, quiet: bool) -> None:
    """One line per request; health checks and scrapes at debug level so they do not drown the rest."""
    level = logging.DEBUG if quiet else (logging.WARNING if fields.get("status", 0) >= 500 else logging.INFO)
    if ACCESS.isEnabledFor(level):
        ACCESS.log(
            level,
            "%s %s %s",
            fields.get("method"),
            fields.get("route"),
            fields.get("status"),
            extra={"fields": fields},
        )


# The current request's access-log fields: set by the middleware, filled in by handlers as they learn things.
REQUEST_FIELDS: ContextVar[dict | None] = ContextVar("puppet_request_fields", default=None)


def note(**fields) -> None:
    """Add fields to the current request's access-log line (no-op outside a request)."""
    current = REQUEST_FIELDS.get()
    if current is not None:
        current.update(fields)
