"""The BentoML Service definitions behind `benchmarks.peers.bentoml_server` (BentoML 1.4, the `@bentoml.service`
API): what `bentoml serve benchmarks.peers.bentoml_service:<Class>` loads, in the server process and again in
each worker process.

- `PuppetCNN` (route POST /classify): the model behind BentoML's adaptive batching, as its documentation writes
  a batchable endpoint: one parameter that holds a batch (`images: list[str]`, base64 PNGs), a list back, one
  answer per image. A request is itself a (small) batch: body `{"images": ["<base64 png>"]}`, answer
  `[{"predictions": [...], "depth": d, "complexity": h}]`. BentoML's dispatcher concatenates the lists of the
  requests queued in a worker (up to max_batch_size images), calls the method once in the worker's thread and
  splits the answer back.
- `PuppetCNNSingle` (route POST /classify): the same contract as every other peer, `{"image": "<base64 png>"}` in,
  one answer dict out, through the documentation's wrapper pattern for single-item requests: a second Service
  that calls `PuppetCNN.classify([image])` (`bentoml.depends`), which BentoML runs as its own worker processes
  behind a Unix socket; the batches form there.

Settings come from Bento arguments (`bentoml serve ... --arg key=value`, `bentoml.use_arguments`), which BentoML
hands to every worker; `bentoml_server` sets them from its command line. Nothing heavy is imported here at module
level: the server process that only reads the definitions never loads torch; each worker builds its `Engine` in
`__init__` (the model loaded and warmed before the worker serves); GET /readyz is 200 once every worker has.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "puppet-cnn-fmnist.safetensors"


class Arguments(BaseModel):
    checkpoint: str = str(SHIPPED_CHECKPOINT)
    backend: str = "onnx"
    onnx_dir: str | None = None
    max_batch_size: int = 32
    max_latency_ms: int = 60000  # BentoML's default
    workers: int | str = "cpu_count"  # model workers: a number, or BentoML's "cpu_count"
    front_workers: int = 1  # workers of PuppetCNNSingle (the wrapper), when it is served
    access_log: bool = False
    metrics: bool = True


ARGS = bentoml.use_arguments(Arguments)
SERVICE_CONFIG: dict[str, Any] = {
    "threads": 1,  # one batch at a time per worker: the model runs one intra-op thread; the GIL does the rest
    "traffic": {"timeout": 60},
    "logging": {"access": {"enabled": ARGS.access_log}},
    "metrics": {"enabled": ARGS.metrics},
    # The client that PuppetCNNSingle calls PuppetCNN through (bentoml.depends) replaces its aiohttp session every
    # max_requests calls (default 100) or max_age seconds (300) by closing the old one, and the calls still in
    # flight on it fail ("Cannot write to closing transport", a 500; BentoML issue #5540): never replace it.
    "runner_connection": {"max_requests": 2**62, "max_age": 1e12},
}


def _workers(value: int | str) -> int | str:
    return value if value == "cpu_count" else int(value)


def worker_count(value: int | str) -> int:
    """How many worker processes BentoML starts for `workers=value` (its allocator's rule for "cpu_count")."""
    if value != "cpu_count":
        return int(value)
    from bentoml._internal.resource import CpuResource

    return int(CpuResource.from_system()) or 1


def ready_dir() -> Path:
    """Where the workers of this server mark their model warm: one folder per process manager (their parent)."""
    return Path(os.environ.get("BENTOML_HOME") or tempfile.gettempdir()) / f"puppet-ready-{os.getppid()}"


def die_with_parent() -> None:
    """BentoML's process manager (circus) starts each worker in a session of its own (os.setsid), out of reach of
    a signal to the server's process group; a worker whose manager is killed (SIGKILL) would live on. Linux's
    PR_SET_PDEATHSIG ends it with its manager."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


@bentoml.service(name="puppet_cnn", workers=_workers(ARGS.workers), **SERVICE_CONFIG)
class PuppetCNN:
    def __init__(self) -> None:
        die_with_parent()
        from benchmarks.peers.common import Engine

        # one torch / onnxruntime intra-op thread in this worker; loaded and warmed before the worker serves
        self.engine = Engine(ARGS.checkpoint, ARGS.backend, ARGS.onnx_dir)
        ready_dir().mkdir(parents=True, exist_ok=True)
        (ready_dir() / str(bentoml.server_context.worker_index)).touch()

    def __is_ready__(self) -> bool:
        """BentoML's readiness hook (GET /readyz): a worker answers once its own model is warm, and the workers
        share one socket, so ready only once every worker has its model warm (a marker each in ready_dir())."""
        try:
            return len(list(ready_dir().iterdir())) >= worker_count(ARGS.workers)
        except OSError:
            return False

    @bentoml.api(
        route="/classify",
        batchable=True,
        batch_dim=0,
        max_batch_size=ARGS.max_batch_size,
        max_latency_ms=ARGS.max_latency_ms,
    )
    def classify(self, images: list[str]) -> list[dict[str, Any]]:
        return self.engine.classify_b64(images)


@bentoml.service(name="puppet_cnn_single", workers=ARGS.front_workers, **SERVICE_CONFIG)
class PuppetCNNSingle:
    model = bentoml.depends(PuppetCNN)

    def __init__(self) -> None:
        die_with_parent()

    @bentoml.api(route="/classify")
    async def classify(self, image: str) -> dict[str, Any]:
        # async: the wrapper only waits on the model service, so one worker holds every request in flight
        return (await self.model.to_async.classify([image]))[0]
