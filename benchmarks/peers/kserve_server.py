"""The shipped checkpoint behind KServe's Python model server (`kserve.ModelServer`), as its documentation sets it up.

A `kserve.Model` subclass whose `load` builds the Engine (the model loaded and warmed before the server serves,
as KServe's custom-predictor guide recommends) and whose `predict` classifies one image per request: the KServe
Python server has no in-server batching (its batcher is the Go model-agent sidecar that KServe injects into an
InferenceService pod for `spec.predictor.batcher`, not part of `kserve.ModelServer`). KServe's v1 protocol hands
`predict` the decoded JSON body unchanged, so the body is the same {"image": ...} as every other peer's.

Settings for this 2-core machine, measured side by side with wrk (see --help): `--workers 2`, KServe's own
multi-processing (two spawned uvicorn REST processes on one socket, each loading the model, one intra-op thread
each); `--predict-in thread-pool`, an `async def predict` that hands the work to the event loop's default
executor (a plain `def predict` runs on the event loop, one request at a time per process: `event-loop`); gRPC
off (the harness gives one port; two instances must run at once); no per-request logging (uvicorn's access log,
KServe's latency log and its timing middleware's lines, as the service runs uvicorn without an access log).

    python -m benchmarks.peers.kserve_server --port 8003 --backend onnx --onnx-dir DIR

POST /v1/models/puppet:predict with JSON {"image": "<base64 png>"} answers Engine.classify's output for that
image: {"predictions": [{"label", "class_id", "probability"} x 5], "depth": d, "complexity": h}.
GET /v1/models/puppet answers 200 {"name": "puppet", "ready": true} once every worker process has loaded and
warmed the model (503 before). KServe binds 0.0.0.0 (not configurable in 0.21). --max-batch-size is accepted
and unused. Run from the repository root in .venv-peers/kserve (benchmarks/peers/requirements-kserve.txt).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import multiprocessing
import threading

# Only KServe at import time: with --workers > 1 KServe spawns its REST processes, which import this module
# (as __mp_main__) before they answer the parent's liveness pings (kserve/protocol/rest/multiprocess/server.py);
# torch and the model code are imported by `load`, in a background thread of each worker.
# kserve.model_server parses sys.argv when it is imported (parse_known_args): none of this module's options may be
# a prefix of one of KServe's (argparse abbreviations), hence --predict-in and --model-name.
import kserve
from kserve import logging as kserve_logging
from kserve import model_server
from kserve.protocol.rest.multiprocess import server as multiprocess_server

MODEL_NAME = "puppet"

# KServe's default logging configuration with the per-request lines off: uvicorn's access log (no handler, no
# propagation: what uvicorn's own access_log=False does) and the kserve.trace logger (the latency line per request
# and the TimingMiddleware's timings). KServe documents passing such a dict to kserve.logging.configure_logging.
LOG_CONFIG = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
LOG_CONFIG["loggers"]["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}
LOG_CONFIG["loggers"]["kserve.trace"]["level"] = "WARNING"
if __name__ in ("__main__", "__mp_main__"):
    # Also in each spawned worker (which imports this module as __mp_main__): KServe configures a worker's logging
    # from --log_config_file only for the workers it starts first; one it respawns (a worker that missed the
    # liveness ping) gets the default configuration unless logging is configured already.
    kserve_logging.configure_logging(LOG_CONFIG)


def warm_request_path(engine) -> None:
    """One request's work on a generated PNG: the Engine warms the model, but the complexity tables
    (model/complexity.py, cached on first use, about 0.4 s) and the decoder are built by the first request, and
    concurrent first requests in KServe's thread pool would each build them (seconds, after readiness)."""
    from PIL import Image

    pre = engine.ckpt.preprocessing
    image = Image.linear_gradient("L").convert("L" if pre.channels == 1 else "RGB").resize((2 * pre.image_size,) * 2)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    engine.classify(engine.decode_b64(base64.b64encode(buf.getvalue())).unsqueeze(0))


class PuppetModel(kserve.Model):
    """The checkpoint behind the Engine; `predict` is a plain def, which KServe runs on the event loop."""

    def __init__(self, name: str, checkpoint: str, backend: str, onnx_dir: str | None, workers: int = 1):
        super().__init__(name)
        self.spec = (checkpoint, backend, onnx_dir)
        self.workers = workers
        # Warm worker processes, counted across the spawned REST processes (multiprocessing shares the counter
        # with each when KServe pickles the model into it); the model is ready once all of them are.
        self.warm = multiprocessing.get_context("spawn").Value("i", 0) if workers > 1 else None
        self.puppet = None  # the Engine; not `engine`: kserve.Model uses that name for a flag of its own
        self._lock = threading.Lock()

    def load(self) -> bool:
        """Build and warm the Engine (one intra-op thread); KServe also calls this for a request that reaches a
        worker before its model is ready, which then waits for the background load."""
        with self._lock:
            if self.puppet is None:
                from benchmarks.peers.common import Engine

                self.puppet = Engine(*self.spec)
                warm_request_path(self.puppet)
                if self.warm is not None:
                    with self.warm.get_lock():
                        self.warm.value += 1
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        """The model's readiness (GET /v1/models/<name>): loaded here, and in every worker process."""
        return self.ready and (self.warm is None or self.warm.value >= self.workers)

    # With --workers > 1 KServe spawns the REST processes and pickles the model registry into each. The Engine's
    # onnxruntime sessions do not pickle: each worker process loads and warms its own, in a background thread
    # started as the model arrives, while the process starts its server and answers KServe's liveness ping.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(puppet=None, ready=False, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        threading.Thread(target=self.load, name="puppet-load", daemon=True).start()

    def classify(self, payload: dict) -> dict:
        return self.puppet.classify(self.puppet.decode_b64(payload["image"]).unsqueeze(0))[0]

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        return self.classify(payload)


class PuppetModelThreaded(PuppetModel):
    """`predict` is async and runs the work in the event loop's default executor (KServe's asyncio thread pool),
    so requests overlap within one process (decode, H(x) and the model release the GIL in parts)."""

    async def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.classify, payload)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.peers.common import Engine, arguments

    p = arguments(__doc__.splitlines()[0])
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="kserve.ModelServer(workers=N): uvicorn worker processes, each with the model and one intra-op thread",
    )
    p.add_argument(
        "--predict-in",
        choices=["event-loop", "thread-pool"],
        default="thread-pool",
        help="event-loop: a def predict, run on the event loop; thread-pool: an async predict handing the work "
        "to the loop's default executor",
    )
    p.add_argument("--model-name", default=MODEL_NAME, help="the <name> in /v1/models/<name>:predict")
    p.add_argument(
        "--liveness-timeout",
        type=float,
        default=60.0,
        help="seconds KServe's parent waits for a worker's answer to its liveness ping before it kills and "
        "respawns the worker (KServe's own: 5, which a worker still importing kserve misses on a busy machine)",
    )
    args = p.parse_args(argv)

    # the worker processes configure their logging from KServe's --log_config_file argument (a path, or this dict)
    model_server.args.log_config_file = LOG_CONFIG

    cls = PuppetModelThreaded if args.predict_in == "thread-pool" else PuppetModel
    onnx_dir = str(args.onnx_dir) if args.onnx_dir else None
    model = cls(args.model_name, str(args.checkpoint), args.backend, onnx_dir, workers=args.workers)
    if args.workers > 1:
        # KServe's parent pings each worker every 0.5 s and gives it 5 s to answer (is_alive's default), from the
        # moment it is spawned: a worker that needs longer to import kserve (5-10 s on a loaded 2-core machine,
        # pandas most of it) is killed and respawned, over and over. The same check with a longer wait:
        multiprocess_server.RESTServerProcess.is_alive.__defaults__ = (args.liveness_timeout,)
        # The worker processes load the model; this one only supervises them (and fails fast on a bad checkpoint
        # or ONNX directory before any worker starts).
        Engine(*model.spec)
        model.ready = True  # KServe registers only ready models
    else:
        model.load()
    server = kserve.ModelServer(
        http_port=args.port,
        workers=args.workers,
        enable_grpc=False,
        enable_latency_logging=False,
        enable_docs_url=False,
    )
    server.start([model])


if __name__ == "__main__":
    main()
