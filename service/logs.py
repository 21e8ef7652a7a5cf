"""Logging: one JSON object per line on stderr (or plain text for people at a terminal).

Every record carries `ts`, `level`, `logger`, `pid` and `message`; structured fields travel in `extra={"fields": {...}}`
and become top-level keys. The access log (`puppet.access`) writes one line per request: request id, route,
status, images, depths and why, timings, and for failures the error code and error id. Image bytes never
appear in a log line: handlers record sizes and decisions, not payloads.

Whatever the input, the output stays one JSON object per line: Python warnings (Pillow warned once per bad EXIF
entry: 40,000 plain-text lines for one crafted upload) are logged as records of `py.warnings`, and repeats of
one message (one warning site, or one log call) are rate-limited below error level: at most `RATE_LIMIT` a
minute each, the next one that passes saying how many were dropped. The access log is never limited.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
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


RATE_LIMIT, RATE_WINDOW_S = 10, 60.0
WARNINGS = logging.getLogger("py.warnings")


class RateLimit(logging.Filter):
    """At most `limit` records per `window_s` for each message (logger, level and the call's format string);
    the first record let through after some were dropped carries `suppressed`, how many. Thread-safe:
    decoding threads log and warn too."""

    def __init__(self, limit: int = RATE_LIMIT, window_s: float = RATE_WINDOW_S, exempt: tuple[str, ...] = ()):
        super().__init__()
        self.limit, self.window_s, self.exempt = limit, window_s, exempt
        self._seen: dict[tuple, list] = {}  # key -> [window start, records in window, dropped]
        self._lock = threading.RLock()  # re-entered if a signal handler logs while the main thread is in here

    def admit(self, key: tuple, now: float) -> int | None:
        """None when this one is over the limit; else how many like it were dropped since the last one let through."""
        with self._lock:
            if len(self._seen) > 10_000:  # bounded whatever the variety of messages
                self._seen.clear()
            entry = self._seen.setdefault(key, [now, 0, 0])
            if now - entry[0] >= self.window_s:
                entry[0], entry[1] = now, 0
            entry[1] += 1
            if entry[1] > self.limit:
                entry[2] += 1
                return None
            dropped, entry[2] = entry[2], 0
            return dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name in self.exempt:  # errors carry ids people quote
            return True
        dropped = self.admit((record.name, record.levelno, str(record.msg)), record.created)
        if dropped is None:
            return False
        if dropped:
            record.fields = {**(getattr(record, "fields", None) or {}), "suppressed": dropped}
        return True


_WARNING_LIMIT = RateLimit()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: a warning becomes one log record, rate-limited by where it was raised (one
    site's messages differ only in their numbers). Checked before the record is made: a crafted upload
    raises thousands."""
    site = f"{filename}:{lineno}"
    dropped = _WARNING_LIMIT.admit((category, site), time.time())
    if dropped is None:
        return
    fields = {"category": category.__name__, "warning_site": site, **({"suppressed": dropped} if dropped else {})}
    WARNINGS.warning("%s: %s", category.__name__, message, extra={"fields": fields})


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a thread's uncaught exception is one record (with its traceback), not plain text."""
    if args.exc_type is SystemExit:
        return
    logging.getLogger("puppet.threads").error(
        "thread %s died: %s",
        getattr(args.thread, "name", "?"),
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RateLimit(exempt=(ACCESS.name, WARNINGS.name)))  # warnings: _log_warning
    warnings.showwarning = _log_warning
    threading.excepthook = _log_thread_death
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
