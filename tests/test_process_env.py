"""The serving process's environment (service/process_env.py): `puppet-cnn serve` gives itself the values that are
missing, keeps the operator's, and is the one place they are written."""

import os
import pathlib

import pytest

from conftest import REPO
from service.process_env import SERVING_ENV, missing
from support.live_server import LiveServer


def test_only_the_values_not_set_are_missing():
    assert missing({}) == SERVING_ENV
    assert missing({"OMP_NUM_THREADS": "4", "UNRELATED": "1"}) == {
        k: v for k, v in SERVING_ENV.items() if k != "OMP_NUM_THREADS"
    }
    assert missing(SERVING_ENV) == {}


def test_the_values_are_written_in_one_place():
    root = pathlib.Path(REPO)
    for path in ["Makefile", "Dockerfile", "docker-compose.yml", *root.glob("deploy/**/*.yaml")]:
        text = (root / path).read_text()
        assert not [k for k in SERVING_ENV if k.startswith("MALLOC_") and k in text], path


@pytest.mark.integration
def test_serve_re_executes_itself_with_what_is_missing_and_keeps_what_is_set():
    base = {k: v for k, v in os.environ.items() if k not in SERVING_ENV}
    s = LiveServer(base_env=base, env={"MALLOC_TOP_PAD_": "1048576"})  # the operator's own value
    try:
        raw = pathlib.Path(f"/proc/{s.proc.pid}/environ").read_bytes()  # the pid we started: exec keeps it
        environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        assert {k: environ.get(k) for k in SERVING_ENV} == {**SERVING_ENV, "MALLOC_TOP_PAD_": "1048576"}
    finally:
        s.stop()
