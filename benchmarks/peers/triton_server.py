"""The shipped checkpoint served by NVIDIA Triton Inference Server through PyTriton, with Triton's dynamic batcher.

PyTriton (nvidia-pytriton) as its documentation sets it up: an inference callable decorated with `@batch`, bound
with `ModelConfig(max_batch_size=32, batcher=DynamicBatcher(...))`; Triton (the tritonserver binary shipped in the
wheel) serves HTTP, forms the batches and hands them through its Python backend stub processes to the callable,
which runs in this process. Several callables bound at once are several model instances (PyTriton's multi-instance
inference): one Engine each, one intra-op thread each. Defaults, measured on the 2-core machine (wrk, c=1..64):
one instance (two cost ~30-40% more CPU per request: smaller batches, one GIL), a 2 ms queue delay (Triton's
tuning advice: start at 0, raise the delay while latency allows; 2 ms fills batches at c=8..32 for +10-30%
throughput and a lower p99, and costs ~3 ms at c=1 — `--queue-delay-us 0` for no wait), Triton's 8 HTTP threads;
gRPC, metrics and the other frontends off, HTTP on 127.0.0.1 only, so that two servers can run side by side.

    python -m benchmarks.peers.triton_server --port 8001 --backend onnx --onnx-dir DIR

POST /v2/models/puppet/infer (KServe v2 / Triton HTTP protocol) with JSON
    {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["<base64 png>"]}]}
answers outputs `labels` (BYTES, 5), `class_ids` (INT64, 5), `probabilities` (FP64, 5), `depth` (INT64, 1) and
`complexity` (FP64, 1): Engine.classify's top-5, depth and complexity. GET /v2/health/ready (and
/v2/models/puppet/ready) is 200 once the model is loaded; the engines are warmed before Triton starts. (PyTriton
connects its callable to the loaded model right after, polling once a second: the very first request may wait
up to ~1.5 s for that, never fails.)

Run from the repository root with PYTHONPATH at the source tree, in .venv-peers/triton, a venv made from Debian's
/usr/bin/python3.11 (the wheel's Python backend stub loads the system's libpython3.11). SIGTERM or SIGINT stops
Triton (and its stubs) and removes PyTriton's workspace; the stubs and tritonserver also die with this process.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import numpy as np
import pytriton.triton
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy

from benchmarks.peers.common import TOP_K, Engine, arguments

MODEL_NAME = "puppet"
# With several instances, PyTriton's stub of instance 1+ waits only 1 s for instance 0's handshake socket, so on a
# loaded machine the model can fail to load; tritonserver then exits, but PyTriton polls it for its start-up
# timeout (120 s) before it raises. A shorter one (a normal start takes 2-15 s here) and a fresh start instead.
START_ATTEMPTS = 3
pytriton.triton.DEFAULT_TRITON_STARTUP_TIMEOUT_S = 45


class InferFunc:
    """One model instance: its own warmed Engine, called by PyTriton with a batch Triton formed."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @batch
    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        # image: (N, 1) object array of bytes, the base64 text of each request's PNG
        answers = self.engine.classify_b64([row[0] for row in image])
        preds = [a["predictions"] for a in answers]
        return {
            "labels": np.array([[p["label"].encode() for p in ps] for ps in preds], dtype=np.object_),
            "class_ids": np.array([[p["class_id"] for p in ps] for ps in preds], dtype=np.int64),
            "probabilities": np.array([[p["probability"] for p in ps] for ps in preds], dtype=np.float64),
            "depth": np.array([[a["depth"]] for a in answers], dtype=np.int64),
            "complexity": np.array([[a["complexity"]] for a in answers], dtype=np.float64),
        }


def start(args, funcs: list[InferFunc]) -> Triton:
    """Triton with the model loaded (its HTTP endpoint answers only then): tritonserver, one Python backend stub
    per instance, the callables connected."""
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        http_thread_count=args.http_threads,
        allow_grpc=False,  # no gRPC, metrics or GPU/CPU metrics ports: two peers can run side by side
        allow_metrics=False,
        allow_gpu_metrics=False,
        allow_cpu_metrics=False,
        log_verbose=0,
        exit_timeout_secs=5,
    )
    # The model store is written before tritonserver starts and loaded during its start-up, before it opens
    # HTTP, so /v2/health/ready (strict readiness) is never 200 on an empty store.
    triton = Triton(config=config, triton_lifecycle_policy=TritonLifecyclePolicy(local_model_store=True))
    try:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=funcs,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[
                Tensor(name="labels", dtype=np.bytes_, shape=(TOP_K,)),
                Tensor(name="class_ids", dtype=np.int64, shape=(TOP_K,)),
                Tensor(name="probabilities", dtype=np.float64, shape=(TOP_K,)),
                Tensor(name="depth", dtype=np.int64, shape=(1,)),
                Tensor(name="complexity", dtype=np.float64, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
        )
        triton.run()
    except BaseException:
        triton.stop()
        raise
    return triton


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=2000,
        help="DynamicBatcher max_queue_delay_microseconds (Triton's default is 0: never wait for a fuller batch)",
    )
    p.add_argument(
        "--instances", type=int, default=1, help="model instances: inference callables bound, one Engine each"
    )
    p.add_argument("--http-threads", type=int, default=8, help="Triton's --http-thread-count (its default: 8)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    # the engines are built and warmed before Triton starts, so readiness means warm
    funcs = [InferFunc(Engine(args.checkpoint, args.backend, args.onnx_dir)) for _ in range(args.instances)]

    def _stop(signum, _frame):
        raise KeyboardInterrupt  # Triton.serve() stops tritonserver and cleans its workspace on KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    triton = None
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                triton = start(args, funcs)
                break
            except Exception as e:  # see START_ATTEMPTS
                if attempt == START_ATTEMPTS:
                    raise
                print(f"triton peer: start {attempt} failed ({type(e).__name__}: {e}); again", file=sys.stderr)
        print(
            f"triton peer ready on 127.0.0.1:{args.port} in {time.monotonic() - t0:.1f} s "
            f"({args.instances} instance(s), queue delay {args.queue_delay_us} us)",
            file=sys.stderr,
            flush=True,
        )
        triton.serve()  # until SIGTERM/SIGINT, or until tritonserver or the stubs die
    except KeyboardInterrupt:
        pass
    finally:
        if triton is not None:
            triton.stop()  # a no-op once serve() has stopped it


if __name__ == "__main__":
    main()
