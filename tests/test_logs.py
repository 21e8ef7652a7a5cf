"""The log stays one JSON object per line whatever happens: warnings and thread deaths become records, and
repeats are rate-limited with a count of what was dropped (service/logs.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.logs import RateLimit

SCRIPT = """
import logging, threading, warnings
from service.logs import configure_logging
configure_logging("info")
for i in range(5000):  # one warning site, a different message each time (as Pillow's per EXIF entry)
    warnings.warn(f"Skipping tag {i}")
log = logging.getLogger("puppet.test")
for i in range(50):
    log.warning("queue of %d", i)  # one call, many values: limited
for i in range(3):
    log.error("error %d", i)  # errors carry ids people quote: never limited
logging.getLogger("puppet.access").info("GET /x 200")  # the access log: never limited
t = threading.Thread(target=lambda: 1 / 0, name="doomed")
t.start(); t.join()
print("plain text on stdout is not the log", flush=True)
"""


@pytest.mark.integration
def test_warnings_and_repeats_become_few_json_lines():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in r.stderr.splitlines()]  # every line on stderr is one JSON object
    warned = [x for x in records if x["logger"] == "py.warnings"]
    assert len(warned) == 10 and warned[0]["message"] == "UserWarning: Skipping tag 0"
    assert warned[0]["category"] == "UserWarning" and warned[0]["warning_site"].endswith(":6")
    assert len([x for x in records if x["logger"] == "puppet.test" and x["level"] == "warning"]) == 10
    assert len([x for x in records if x["level"] == "error" and x["logger"] == "puppet.test"]) == 3
    assert len([x for x in records if x["logger"] == "puppet.access"]) == 1
    (death,) = [x for x in records if x["logger"] == "puppet.threads"]
    assert death["message"] == "thread doomed died: division by zero" and "ZeroDivisionError" in death["exception"]


def test_the_first_one_let_through_after_a_window_says_how_many_were_dropped():
    limit = RateLimit(limit=3, window_s=60)
    key = ("py.warnings", 30, "site")
    assert [limit.admit(key, t) for t in (0, 1, 2)] == [0, 0, 0]
    assert [limit.admit(key, t) for t in (3, 4, 59)] == [None, None, None]
    assert limit.admit(("another", 30, "message"), 59) == 0  # counted per message
    assert limit.admit(key, 60) == 3  # a new window: the three dropped are reported once
    assert limit.admit(key, 61) == 0
