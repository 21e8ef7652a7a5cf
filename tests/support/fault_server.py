"""`puppet-cnn serve` with faults that a test can arm, for the reliability tests; never part of the service.

A test arms a fault by creating a file in $PUPPET_FAULT_DIR; the next model call consumes it (one batch):
- `fail`: the call raises RuntimeError, an ordinary bug in one batch;
- `die`: the call raises an exception the worker thread cannot survive (BaseException), so the thread ends;
- `hang`: the call never returns (the worker thread is stuck for good).
The number of images in the batch that took the fault is written to `<name>.taken`.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from service.backends import OnnxBackend, TorchBackend
from service.cli import main

FAULT_DIR = Path(os.environ["PUPPET_FAULT_DIR"])


class WorkerKilled(BaseException):
    """Stands for what no per-batch handler catches (it is not an Exception)."""


def _hang() -> BaseException:
    threading.Event().wait()  # for ever
    raise AssertionError("unreachable")


FAULTS = {
    "fail": lambda: RuntimeError("injected fault in the model"),
    "die": lambda: WorkerKilled("injected"),
    "hang": _hang,
}


def _armed(cls: type) -> None:
    original = cls.predict

    def predict(self, images, depths):
        for name, make in FAULTS.items():
            try:
                (FAULT_DIR / name).unlink()  # consumed by exactly one batch
            except FileNotFoundError:
                continue
            (FAULT_DIR / f"{name}.taken").write_text(str(len(images)))
            raise make()
        return original(self, images, depths)

    cls.predict = predict


_armed(TorchBackend)
_armed(OnnxBackend)

if __name__ == "__main__":
    sys.exit(main(["serve"]))
