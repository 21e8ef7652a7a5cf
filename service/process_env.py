"""The environment `puppet-cnn serve` runs in, whoever starts it (make serve, the image, a test, a benchmark).

glibc's allocator and OpenMP read these only when a process starts, so the command re-executes itself once with
the values that are missing; the operator's own values are kept. Why these values: docs/design.md ("Figures
behind the code's limits and choices").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SERVING_ENV = {
    "OMP_NUM_THREADS": "1",  # one torch thread: the other cores run HTTP and decoding
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),  # activation buffers stay mapped between batches
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "MALLOC_TOP_PAD_": str(64 << 20),
}


def missing(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """SERVING_ENV's values that `environ` does not set."""
    return {k: v for k, v in SERVING_ENV.items() if k not in environ}


def ensure_serving_env() -> None:
    """Re-execute this command line with the missing values added; return at once when none is missing."""
    extra = missing()
    if not extra:
        return
    os.environ.update(extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
